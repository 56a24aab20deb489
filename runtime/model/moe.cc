// MoE stages (see moe.h).
#include "runtime/model/moe.h"

#include "parallel/layout.h"

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
  SY_CHECK(n_tokens * k <= static_cast<int64_t>(layout.sorted_rows.size()),
           "moe_layout: ", n_tokens, " tokens x top-", k, " exceed the reserved ",
           layout.sorted_rows.size(), " rows");
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

void expert_ffn(Ops& ops, Tensor out, Tensor in, const LayerWeights& layer, const int64_t* offsets,
                const ExpertScratch& scratch) {
  SY_CHECK(in.ndim == 2 && out.ndim == 2 && in.size(0) == out.size(0), "expert_ffn: in ",
           in.shape_str(), " out ", out.shape_str());
  const size_t n_experts = layer.w1.size();
  const int64_t begin = offsets[0];
  const int64_t n = offsets[n_experts] - begin;
  if (n == 0) return;
  SY_CHECK(begin >= 0 && begin + n <= in.size(0) && begin + n <= scratch.gate.size(0),
           "expert_ffn: rows [", begin, ", ", begin + n, ") of ", in.size(0));
  const int64_t rows_end = begin + n;
  Tensor gate = scratch.gate.rows(0, rows_end);  // [rows, hidden_dim]
  Tensor up = scratch.up.rows(0, rows_end);      // [rows, hidden_dim]
  Tensor x = in.rows(0, rows_end);
  ops.grouped_matmul(gate, x, layer.w1.data(), offsets, n_experts);
  ops.grouped_matmul(up, x, layer.w3.data(), offsets, n_experts);
  Tensor g = gate.rows(begin, n);
  ops.swiglu(g, g, up.rows(begin, n));
  ops.grouped_matmul(out.rows(0, rows_end), gate, layer.w2.data(), offsets, n_experts);
}

void EpPlan::reserve(int ep_size, int64_t n_experts, int64_t max_rows, size_t n_local_experts) {
  send_counts.assign(static_cast<size_t>(ep_size), 0);
  recv_counts.assign(static_cast<size_t>(ep_size), 0);
  counts.assign(static_cast<size_t>(ep_size * n_experts), 0);
  my_counts.assign(static_cast<size_t>(n_experts), 0);
  expert_order.assign(static_cast<size_t>(max_rows), 0);
  source_order.assign(static_cast<size_t>(max_rows), 0);
  local_offsets.assign(n_local_experts + 1, 0);
  block_start.assign(static_cast<size_t>(ep_size) * n_local_experts, 0);
}

void ep_layout(EpPlan& plan, const MoeLayout& layout, Communicator& ep,
               const std::vector<int64_t>& local_experts) {
  const int E = ep.size();
  const int64_t n_experts = layout.n_experts;
  const int64_t n_local = static_cast<int64_t>(local_experts.size());
  SY_CHECK(static_cast<int64_t>(plan.counts.size()) == E * n_experts &&
               static_cast<int64_t>(plan.local_offsets.size()) == n_local + 1,
           "ep_layout: plan reserved for another layout");
  // Every rank learns how many rows every rank sends to every expert.
  for (int64_t e = 0; e < n_experts; ++e)
    plan.my_counts[e] = static_cast<int32_t>(layout.n_tokens_per_expert[e]);
  ep.all_gather(Tensor(plan.counts.data(), DType::kI32, {E, n_experts}),
                Tensor(plan.my_counts.data(), DType::kI32, {1, n_experts}),
                std::vector<int64_t>(static_cast<size_t>(E), 1));
  // Rows to each peer: the experts it owns form a contiguous id range.
  for (int p = 0; p < E; ++p) {
    plan.send_counts[p] = 0;
    for (int64_t e : experts_of(n_experts, E, p))
      plan.send_counts[p] += layout.n_tokens_per_expert[e];
  }
  // Received rows come grouped by source rank, then by local expert.
  int64_t offset = 0;
  for (int p = 0; p < E; ++p) {
    plan.recv_counts[p] = 0;
    for (int64_t i = 0; i < n_local; ++i) {
      const int64_t n = plan.counts[p * n_experts + local_experts[i]];
      plan.block_start[p * n_local + i] = offset;
      offset += n;
      plan.recv_counts[p] += n;
    }
  }
  plan.n_recv = offset;
  SY_CHECK(plan.n_recv <= static_cast<int64_t>(plan.expert_order.size()),
           "ep_layout: ", plan.n_recv, " rows routed to this rank exceed the reserved ",
           plan.expert_order.size());
  // Expert order: for each local expert, the blocks of every source in rank order.
  int64_t row = 0;
  for (int64_t i = 0; i < n_local; ++i) {
    plan.local_offsets[i] = row;
    for (int p = 0; p < E; ++p) {
      const int64_t n = plan.counts[p * n_experts + local_experts[i]];
      const int64_t start = plan.block_start[p * n_local + i];
      for (int64_t j = 0; j < n; ++j, ++row) {
        plan.expert_order[row] = static_cast<int32_t>(start + j);
        plan.source_order[start + j] = static_cast<int32_t>(row);
      }
    }
  }
  plan.local_offsets[n_local] = row;
}

void ep_dispatch(Communicator& ep, Tensor recv, Tensor send, const EpPlan& plan) {
  ep.all_to_all(recv, plan.recv_counts, send, plan.send_counts);
}

void ep_combine(Communicator& ep, Tensor out, Tensor back, const EpPlan& plan) {
  ep.all_to_all(out, plan.send_counts, back, plan.recv_counts);
}

}  // namespace sy
