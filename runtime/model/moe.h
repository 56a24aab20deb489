// The sparse MoE block in stages: moe_gate -> moe_layout -> dispatch -> expert_ffn -> combine.
// Each stage is a function of its own so it can be tested alone; the vocabulary follows DeepEP
// (topk_idx, topk_weights, n_tokens_per_expert).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/ops.h"
#include "parallel/communicator.h"
#include "runtime/model/weights.h"

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

// out rows [offsets[i], offsets[i + 1]) = SwiGLU expert i of `layer` applied to the same rows of
// `in`, for each local expert i: one grouped GEMM per projection (gate, up, down) and one SwiGLU
// over all rows. in, out: [n_rows, dim] (storage dtype); offsets: [n_local_experts + 1] on the
// host.
void expert_ffn(Ops& ops, Tensor out, Tensor in, const LayerWeights& layer, const int64_t* offsets,
                const ExpertScratch& scratch);

// The expert-parallel exchange of one MoE block over the E ranks of an expert group. Rows leave
// each rank in expert order (so in destination-rank order, experts being placed contiguously);
// they arrive grouped by source rank, then expert; expert_ffn needs them grouped by expert.
struct EpPlan {
  std::vector<int64_t> send_counts;    // [E] rows this rank sends to each peer
  std::vector<int64_t> recv_counts;    // [E] rows this rank receives from each peer
  std::vector<int32_t> counts;         // [E, n_experts] rows each rank sends to each expert
  std::vector<int32_t> expert_order;   // [n_recv] received row of each expert-ordered row
  std::vector<int32_t> source_order;   // [n_recv] expert-ordered row of each received row
  std::vector<int64_t> local_offsets;  // [n_local_experts + 1] expert-ordered row ranges
  std::vector<int32_t> my_counts;      // [n_experts] this rank's row of `counts`
  std::vector<int64_t> block_start;    // [E, n_local_experts] first received row of each block
  int64_t n_recv = 0;

  void reserve(int ep_size, int64_t n_experts, int64_t max_rows, size_t n_local_experts);
};

// Exchanges the per-expert counts (an all-gather over `ep`, host buffers) and builds the plan.
// Collective. `local_experts` are the ascending global ids held by this rank; experts are placed
// contiguously over the ranks of `ep` (parallel/layout.h, experts_of).
void ep_layout(EpPlan& plan, const MoeLayout& layout, Communicator& ep,
               const std::vector<int64_t>& local_experts);

// Sends `send` rows (expert order, layout.n_rows) to their experts' ranks; `recv` receives
// plan.n_recv rows grouped by source rank. Collective over `ep`.
void ep_dispatch(Communicator& ep, Tensor recv, Tensor send, const EpPlan& plan);
// The way back: `back` (rows grouped by source rank, as received) returns to each source, which
// gets its rows in its original expert order in `out`. Collective over `ep`.
void ep_combine(Communicator& ep, Tensor out, Tensor back, const EpPlan& plan);

}  // namespace sy
