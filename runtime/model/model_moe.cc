// The MoE block of the forward pass (see model.h): the router, the layout of routed rows in
// expert order (on the host, or on the device for small steps), and the exchange of rows with
// the ranks that hold their experts (all-to-all) or this rank's experts alone (all-gather).
#include "runtime/model/model.h"

#include <chrono>

namespace sy {

void Model::moe_block(int64_t layer, Tensor out, Tensor xn, Tensor x, bool all_to_all) {
  const LayerWeights& L = weights_.layers[static_cast<size_t>(layer)];
  const int64_t n_tokens = xn.size(0);
  const int64_t k = config_.num_experts_per_tok;
  const int64_t n_experts = config_.num_local_experts;
  const int64_t n_rows = n_tokens * k;
  Tensor router_logits = router_logits_.rows(0, n_tokens);  // [n_tokens, n_experts]
  Tensor topk_idx = topk_idx_.rows(0, n_tokens);            // [n_tokens, k]
  Tensor topk_weights = topk_weights_.rows(0, n_tokens);    // [n_tokens, k]
  // The router in fp32: its weights are F32, and so is its input (a second norm of x when the
  // experts take a rounded one), so that rounding does not decide between near-tied experts.
  Tensor router_in = xn;
  if (xn.dtype != DType::kF32) {
    router_in = router_in_.rows(0, n_tokens);
    ops_.rmsnorm(router_in, x, L.post_norm, static_cast<float>(config_.rms_norm_eps));
  }
  ops_.matmul(router_logits, router_in, L.gate);
  ops_.moe_gate(topk_idx, topk_weights, router_logits);
  if (routing_trace_ != nullptr) {
    const size_t at = routing_trace_->size();
    routing_trace_->resize(at + static_cast<size_t>(n_tokens * k));
    ops_.copy_to_host(routing_trace_->data() + at, topk_idx.data, topk_idx.bytes());
  }
  if (routes_on_device(n_rows, all_to_all)) return moe_block_on_device(layer, out, xn);
  // The layout on the host: rows in expert order, and their weights.
  ops_.copy_to_host(host_topk_idx_.data(), topk_idx.data, topk_idx.bytes());
  ops_.copy_to_host(host_topk_weights_.data(), topk_weights.data, topk_weights.bytes());
  moe_layout(layout_, host_topk_idx_.data(), host_topk_weights_.data(), n_tokens, k, n_experts);
  ops_.copy_from_host(sorted_rows_.data, layout_.sorted_rows.data(),
                      static_cast<size_t>(n_rows) * 4);
  ops_.copy_from_host(sorted_weights_.data, layout_.sorted_weights.data(),
                      static_cast<size_t>(n_rows) * 4);
  Tensor rows = sorted_rows_.rows(0, n_rows);        // [n_rows]
  Tensor weights = sorted_weights_.rows(0, n_rows);  // [n_rows]
  ops_.fill_zero(out);
  // Routed pairs of the tokens this rank owns (with the all-gather exchange every rank sees every
  // token, so rank 0 alone counts them).
  if (all_to_all || rank_ == 0) {
    int64_t* counted = moe_counters_.expert_tokens.data() + layer * n_experts;
    for (int64_t e = 0; e < n_experts; ++e) {
      counted[e] += layout_.n_tokens_per_expert[e];
      if (profile_ != nullptr)
        profile_->expert_tokens[layer * n_experts + e] += layout_.n_tokens_per_expert[e];
    }
  }
  if (all_to_all)
    moe_exchange(layer, out, xn, rows, weights);
  else
    moe_local(layer, out, xn, rows, weights);
}

// layout -> dispatch -> expert FFN -> combine, over this rank's expert group.
void Model::moe_exchange(int64_t layer, Tensor out, Tensor xn, Tensor rows, Tensor weights) {
  const LayerWeights& L = weights_.layers[static_cast<size_t>(layer)];
  Communicator& ep = *par_->ep;
  ep_layout(ep_plan_, layout_, ep, weights_.shard.experts);
  lap(ForwardProfile::kRouter);
  count_exchange_bytes();
  const int64_t n_recv = ep_plan_.n_recv;
  Tensor send = moe_send_.rows(0, rows.size(0));  // [n_rows, dim] expert order
  Tensor recv = moe_recv_.rows(0, n_recv);        // [n_recv, dim] by source
  Tensor in = moe_in_.rows(0, n_recv);            // [n_recv, dim] by expert
  Tensor y = moe_out_.rows(0, n_recv);            // [n_recv, dim] by expert
  ops_.gather_rows(send, xn, rows);
  auto t0 = std::chrono::steady_clock::now();
  ep_dispatch(ep, recv, send, ep_plan_);
  moe_counters_.dispatch_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  Tensor perm = perm_.rows(0, n_recv);  // [n_recv]
  ops_.copy_from_host(perm.data, ep_plan_.expert_order.data(), perm.bytes());
  ops_.gather_rows(in, recv, perm);
  lap(ForwardProfile::kDispatch);
  expert_ffn(ops_, y, in, L, ep_plan_.local_offsets.data(), expert_scratch_);
  lap(ForwardProfile::kExpert);
  ops_.copy_from_host(perm.data, ep_plan_.source_order.data(), perm.bytes());
  ops_.gather_rows(recv, y, perm);  // back in received order
  t0 = std::chrono::steady_clock::now();
  ep_combine(ep, send, recv, ep_plan_);  // [n_rows, dim] expert order
  moe_counters_.combine_seconds +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ops_.scatter_add_weighted(out, send, rows, weights);  // combine
  lap(ForwardProfile::kCombine);
}

void Model::count_exchange_bytes() {
  const Communicator& ep = *par_->ep;
  const uint64_t row_bytes =
      static_cast<uint64_t>(config_.hidden_size) * dtype_size(ops_.storage_dtype());
  int64_t sent = 0, back = 0;
  for (int p = 0; p < ep.size(); ++p) {
    if (p == ep.rank()) continue;
    sent += ep_plan_.send_counts[p];
    back += ep_plan_.recv_counts[p];
  }
  moe_counters_.dispatch_bytes += static_cast<int64_t>(sent * row_bytes);
  moe_counters_.combine_bytes += static_cast<int64_t>(back * row_bytes);
  if (profile_ == nullptr) return;
  profile_->bytes[ForwardProfile::kDispatchBytes] += sent * row_bytes;
  profile_->bytes[ForwardProfile::kCombineBytes] += back * row_bytes;
}

// Local experts only: their rows are contiguous in expert order (experts are placed in ranges).
void Model::moe_local(int64_t layer, Tensor out, Tensor xn, Tensor rows, Tensor weights) {
  const LayerWeights& L = weights_.layers[static_cast<size_t>(layer)];
  const std::vector<int64_t>& experts = weights_.shard.experts;
  lap(ForwardProfile::kRouter);
  const int64_t first = layout_.expert_offsets[experts.front()];
  const int64_t n_local_rows = layout_.expert_offsets[experts.back() + 1] - first;
  for (size_t i = 0; i <= experts.size(); ++i)
    local_offsets_[i] = (i < experts.size() ? layout_.expert_offsets[experts[i]]
                                            : layout_.expert_offsets[experts.back() + 1]) -
                        first;
  Tensor local_rows = rows.rows(first, n_local_rows);  // [n_local_rows]
  Tensor in = moe_in_.rows(0, n_local_rows);           // [n_local_rows, dim]
  Tensor y = moe_out_.rows(0, n_local_rows);           // [n_local_rows, dim]
  ops_.gather_rows(in, xn, local_rows);                // dispatch (local)
  lap(ForwardProfile::kDispatch);
  expert_ffn(ops_, y, in, L, local_offsets_.data(), expert_scratch_);
  lap(ForwardProfile::kExpert);
  ops_.scatter_add_weighted(out, y, local_rows, weights.rows(first, n_local_rows));  // combine
  reduce_expert_partials(out);
  lap(ForwardProfile::kCombine);
}

// The MoE block with the layout made on the device (Ops::moe_route) and the experts' row ranges
// read from device memory: no copy to the host, so the step can be a graph. Every routed row is
// gathered (rows of other ranks' experts as zeros) and the grouped GEMMs compute only the rows of
// this rank's experts; the combine skips the others (row -1).
void Model::moe_block_on_device(int64_t layer, Tensor out, Tensor xn) {
  const LayerWeights& L = weights_.layers[static_cast<size_t>(layer)];
  const int64_t n_tokens = xn.size(0);
  const int64_t n_rows = n_tokens * config_.num_experts_per_tok;
  const int64_t n_experts = config_.num_local_experts;
  const std::vector<int64_t>& experts = weights_.shard.experts;
  Tensor rows = sorted_rows_.rows(0, n_rows);        // [n_rows] token, or -1
  Tensor weights = sorted_weights_.rows(0, n_rows);  // [n_rows]
  ops_.moe_route(rows, weights, expert_offsets_, topk_idx_.rows(0, n_tokens),
                 topk_weights_.rows(0, n_tokens), experts.front(), experts.back() + 1);
  // Every rank routes every token here: rank 0 alone tallies them.
  if (rank_ == 0)
    ops_.count_routed(routed_counts_.reshape({config_.num_hidden_layers, n_experts})
                          .rows(layer, 1)
                          .reshape({n_experts}),
                      expert_offsets_);
  if (profile_ != nullptr && rank_ == 0) {
    std::vector<int32_t> offsets(static_cast<size_t>(n_experts + 1));
    ops_.copy_to_host(offsets.data(), expert_offsets_.data, expert_offsets_.bytes());
    for (int64_t e = 0; e < n_experts; ++e)
      profile_->expert_tokens[layer * n_experts + e] += offsets[e + 1] - offsets[e];
  }
  lap(ForwardProfile::kRouter);
  Tensor in = moe_in_.rows(0, n_rows);  // [n_rows, dim] expert order
  Tensor y = moe_out_.rows(0, n_rows);  // [n_rows, dim]
  ops_.gather_rows(in, xn, rows);       // dispatch (local)
  lap(ForwardProfile::kDispatch);
  Tensor gate = expert_scratch_.gate.rows(0, n_rows);  // [n_rows, hidden_dim]
  Tensor up = expert_scratch_.up.rows(0, n_rows);      // [n_rows, hidden_dim]
  const size_t n_local = experts.size();
  ops_.grouped_matmul_offsets(gate, in, L.w1.data(), expert_offsets_, experts.front(), n_local);
  ops_.grouped_matmul_offsets(up, in, L.w3.data(), expert_offsets_, experts.front(), n_local);
  ops_.swiglu(gate, gate, up);  // also on rows of other experts: their values are never used
  ops_.grouped_matmul_offsets(y, gate, L.w2.data(), expert_offsets_, experts.front(), n_local);
  lap(ForwardProfile::kExpert);
  ops_.fill_zero(out);
  ops_.scatter_add_weighted(out, y, rows, weights);  // combine
  reduce_expert_partials(out);
  lap(ForwardProfile::kCombine);
}

// With experts split over ranks (all-gather exchange), each rank holds the sum over its own
// experts: the expert group adds them up.
void Model::reduce_expert_partials(Tensor out) {
  if (par_ == nullptr || par_->ep->size() == 1) return;
  const int E = par_->ep->size();
  par_->ep->all_reduce_sum(out);
  if (profile_ != nullptr)
    profile_->bytes[ForwardProfile::kEpReduce] += 2 * out.bytes() * (E - 1) / E;
}

}  // namespace sy
