// Router of the sparse MoE block on the GPU: softmax over the expert logits in fp32, top-k
// (ties to the lower expert index), the k weights renormalised to sum 1. CPU twin:
// kernels/cpu/moe_gate.cc, which this follows operation by operation.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

constexpr int kMaxExperts = 256;

// One thread per token (a token's experts are few).
__global__ void moe_gate_kernel(int32_t* topk_idx, float* topk_weights, const float* logits,
                                int64_t n_tokens, int64_t n_experts, int64_t k) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n_tokens) return;
  float probs[kMaxExperts];
  bool taken[kMaxExperts];
  const float* l = logits + t * n_experts;
  float max_l = -INFINITY;
  for (int64_t e = 0; e < n_experts; ++e) max_l = fmaxf(max_l, l[e]);
  float sum = 0.f;
  for (int64_t e = 0; e < n_experts; ++e) {
    probs[e] = expf(l[e] - max_l);
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
    topk_idx[t * k + j] = static_cast<int32_t>(best);
    topk_weights[t * k + j] = probs[best];
    chosen_sum += probs[best];
  }
  for (int64_t j = 0; j < k; ++j) topk_weights[t * k + j] /= chosen_sum;
}

}  // namespace

void moe_gate(Tensor topk_idx, Tensor topk_weights, Tensor logits, cudaStream_t stream) {
  const int64_t n_tokens = logits.size(0);
  const int64_t n_experts = logits.size(1);
  const int64_t k = topk_idx.size(1);
  check_tensor(logits, "moe_gate.logits", DType::kF32, {n_tokens, n_experts});
  check_tensor(topk_idx, "moe_gate.topk_idx", DType::kI32, {n_tokens, k});
  check_tensor(topk_weights, "moe_gate.topk_weights", DType::kF32, {n_tokens, k});
  check_on_device("moe_gate", {&topk_idx, &topk_weights, &logits});
  SY_CHECK(k >= 1 && k <= n_experts && n_experts <= kMaxExperts, "moe_gate: top-", k, " of ",
           n_experts, " experts (the GPU router takes at most ", kMaxExperts, ")");
  if (n_tokens == 0) return;
  moe_gate_kernel<<<grid_for(n_tokens, 128), 128, 0, stream>>>(
      topk_idx.i32(), topk_weights.f32(), logits.f32(), n_tokens, n_experts, k);
  check_launch("moe_gate");
}

}  // namespace sy::cuda
