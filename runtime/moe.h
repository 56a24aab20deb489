// The sparse MoE block in stages: moe_gate -> moe_layout -> dispatch -> expert_ffn -> combine.
// Each stage is a function of its own so it can be tested alone; the vocabulary follows DeepEP
// (topk_idx, topk_weights, n_tokens_per_expert).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/ops.h"
#include "runtime/weights.h"

namespace sy {

// Where each (token, k) routing pair goes, in expert-major order. Host memory, sized once.
struct MoeLayout {
  int64_t n_experts = 0;
  std::vector<int64_t> n_tokens_per_expert;  // [n_experts]
  std::vector<int64_t> expert_offsets;       // [n_experts + 1]: first row of each expert
  std::vector<int32_t> sorted_rows;          // [n_tokens * k]: token of each expert-ordered row
  std::vector<float> sorted_weights;         // [n_tokens * k]: its router weight
  int64_t n_rows = 0;                        // rows in use (= n_tokens * k)

  void reserve(int64_t max_tokens, int64_t k, int64_t n_experts);
};

// Sorts the routing pairs by expert (stable in token order). topk_idx, topk_weights: host
// [n_tokens, k]. Rows of expert e are [expert_offsets[e], expert_offsets[e + 1]).
void moe_layout(MoeLayout& layout, const int32_t* topk_idx, const float* topk_weights,
                int64_t n_tokens, int64_t k, int64_t n_experts);

// Scratch for expert_ffn, on the ops device: sized for `max_rows` routed rows.
struct ExpertScratch {
  Tensor gate;  // [max_rows, hidden_dim]
  Tensor up;    // [max_rows, hidden_dim]
};

// out rows [offsets[i], offsets[i + 1]) = SwiGLU expert i applied to the same rows of `in`, for
// each local expert i. in, out: [n_rows, dim]; offsets: [n_local_experts + 1] on the host.
void expert_ffn(Ops& ops, Tensor out, Tensor in, const std::vector<ExpertWeights>& experts,
                const int64_t* offsets, const ExpertScratch& scratch);

}  // namespace sy
