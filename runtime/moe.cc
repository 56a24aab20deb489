// MoE stages (see moe.h).
#include "runtime/moe.h"

namespace sy {

void MoeLayout::reserve(int64_t max_tokens, int64_t k, int64_t n_experts_) {
  n_experts = n_experts_;
  n_tokens_per_expert.assign(static_cast<size_t>(n_experts), 0);
  expert_offsets.assign(static_cast<size_t>(n_experts + 1), 0);
  sorted_rows.assign(static_cast<size_t>(max_tokens * k), 0);
  sorted_weights.assign(static_cast<size_t>(max_tokens * k), 0.f);
}

void moe_layout(MoeLayout& layout, const int32_t* topk_idx, const float* topk_weights,
                int64_t n_tokens, int64_t k, int64_t n_experts) {
  SY_CHECK(layout.n_experts == n_experts, "moe_layout: layout sized for ", layout.n_experts,
           " experts, called with ", n_experts);
  SY_CHECK(n_tokens * k <= static_cast<int64_t>(layout.sorted_rows.size()), "moe_layout: ",
           n_tokens, " tokens x top-", k, " exceed the reserved ", layout.sorted_rows.size(), " rows");
  std::fill(layout.n_tokens_per_expert.begin(), layout.n_tokens_per_expert.end(), 0);
  for (int64_t i = 0; i < n_tokens * k; ++i) {
    const int32_t e = topk_idx[i];
    SY_CHECK(e >= 0 && e < n_experts, "moe_layout: expert id ", e, " outside [0, ", n_experts, ")");
    ++layout.n_tokens_per_expert[static_cast<size_t>(e)];
  }
  layout.expert_offsets[0] = 0;
  for (int64_t e = 0; e < n_experts; ++e)
    layout.expert_offsets[e + 1] = layout.expert_offsets[e] + layout.n_tokens_per_expert[e];
  // Counting sort: fill each expert's rows in token order.
  std::vector<int64_t>& cursor = layout.n_tokens_per_expert;  // reused, restored below
  for (int64_t e = 0; e < n_experts; ++e) cursor[e] = layout.expert_offsets[e];
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = topk_idx[t * k + j];
      const int64_t row = cursor[e]++;
      layout.sorted_rows[row] = static_cast<int32_t>(t);
      layout.sorted_weights[row] = topk_weights[t * k + j];
    }
  }
  for (int64_t e = 0; e < n_experts; ++e)
    cursor[e] = layout.expert_offsets[e + 1] - layout.expert_offsets[e];
  layout.n_rows = n_tokens * k;
}

void expert_ffn(Ops& ops, Tensor out, Tensor in, const std::vector<ExpertWeights>& experts,
                const int64_t* offsets, const ExpertScratch& scratch) {
  SY_CHECK(in.ndim == 2 && out.ndim == 2 && in.size(0) == out.size(0), "expert_ffn: in ",
           in.shape_str(), " out ", out.shape_str());
  for (size_t i = 0; i < experts.size(); ++i) {
    const int64_t begin = offsets[i];
    const int64_t n = offsets[i + 1] - begin;
    if (n == 0) continue;
    SY_CHECK(begin >= 0 && begin + n <= in.size(0) && n <= scratch.gate.size(0),
             "expert_ffn: rows [", begin, ", ", begin + n, ") of ", in.size(0));
    const ExpertWeights& E = experts[i];
    Tensor x = in.rows(begin, n);                // [n, dim]
    Tensor gate = scratch.gate.rows(0, n);       // [n, hidden_dim]
    Tensor up = scratch.up.rows(0, n);           // [n, hidden_dim]
    ops.matmul(gate, x, E.w1);                   // [n, hidden_dim]
    ops.matmul(up, x, E.w3);                     // [n, hidden_dim]
    ops.swiglu(gate, gate, up);                  // [n, hidden_dim]
    ops.matmul(out.rows(begin, n), gate, E.w2);  // [n, dim]
  }
}

}  // namespace sy
