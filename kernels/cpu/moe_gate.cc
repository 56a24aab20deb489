// Router of the sparse MoE block, as Hugging Face MixtralSparseMoeBlock: softmax over the expert
// logits in fp32, top-k (ties to the lower expert index, as torch.topk on CPU), the k weights
// renormalised to sum 1.
#include <cmath>

#include "kernels/cpu/ops.h"

namespace sy::cpu {

void moe_gate(Tensor topk_idx, Tensor topk_weights, Tensor logits) {
  const int64_t n_tokens = logits.size(0);
  const int64_t n_experts = logits.size(1);
  const int64_t k = topk_idx.size(1);
  check_tensor(logits, "moe_gate.logits", DType::kF32, {n_tokens, n_experts});
  check_tensor(topk_idx, "moe_gate.topk_idx", DType::kI32, {n_tokens, k});
  check_tensor(topk_weights, "moe_gate.topk_weights", DType::kF32, {n_tokens, k});
  SY_CHECK(k >= 1 && k <= n_experts && n_experts <= 1024, "moe_gate: top-", k, " of ", n_experts,
           " experts");
  float probs[1024];
  bool taken[1024];
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* l = logits.f32() + t * n_experts;
    float max_l = -INFINITY;
    for (int64_t e = 0; e < n_experts; ++e) max_l = std::fmax(max_l, l[e]);
    float sum = 0.f;
    for (int64_t e = 0; e < n_experts; ++e) {
      probs[e] = std::exp(l[e] - max_l);
      sum += probs[e];
      taken[e] = false;
    }
    for (int64_t e = 0; e < n_experts; ++e) probs[e] /= sum;
    float chosen_sum = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < n_experts; ++e)
        if (!taken[e] && (best < 0 || probs[e] > probs[best])) best = e;
      taken[best] = true;
      topk_idx.i32()[t * k + j] = static_cast<int32_t>(best);
      topk_weights.f32()[t * k + j] = probs[best];
      chosen_sum += probs[best];
    }
    for (int64_t j = 0; j < k; ++j) topk_weights.f32()[t * k + j] /= chosen_sum;
  }
}

}  // namespace sy::cpu
