// Rank layout: how W ranks split the attention heads (tensor parallel over T ranks), the experts
// (expert parallel over E ranks), the vocabulary, and the tokens of each step.
//
//   rank r = g * T + t      attention group g (W / T replicas), tensor-parallel rank t
//   rank r = h * E + e      expert group h (W / E replicas), expert-parallel rank e
//
// Every rank runs the whole step plan. Attention is computed by every attention group on all
// tokens; after the tensor-parallel reduce-scatter each rank owns a distinct slice of the tokens
// (token_counts), so the MoE block sees every token exactly once across the world.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sy {

// What the layout splits of a model: parallel/ knows these shapes, not the model's config
// (ModelConfig::layout_shape() gives them).
struct LayoutShape {
  int64_t n_heads = 0;     // query heads of one attention layer
  int64_t n_kv_heads = 0;  // key/value heads (grouped-query attention)
  int64_t n_experts = 0;   // experts of one MoE block
  int64_t vocab_size = 0;  // rows of the embedding and of lm_head
};

// How the MoE block reaches the experts of other ranks (docs/architecture.md):
//   kAllToAll  sequence-parallel tokens, dispatched to their experts' ranks and combined back
//   kAllGather every rank routes every token to its own experts; the expert group all-reduces
//   kAuto      per step: all-gather for steps of at most kAutoMaxRoutedRows routed rows (decode
//              batches up to 128 at top-2: no host layout, so on GPUs the step routes on the
//              device and records as a graph, Model::kDeviceRouteMaxRows), all-to-all for larger
//              ones (prefill: each token's row travels to its experts' ranks only)
enum class MoeExchange { kAllToAll, kAllGather, kAuto };
constexpr int64_t kAutoMaxRoutedRows = 256;  // tokens x top-k
const char* moe_exchange_name(MoeExchange exchange);
MoeExchange parse_moe_exchange(const std::string& name);

struct ParallelConfig {
  int world = 1;  // W: ranks in the job
  int rank = 0;   // this rank
  int tp = 1;     // T: ranks sharing one attention layer's heads (divides W and the KV heads)
  int ep = 0;     // E: ranks sharing one set of experts (divides W); 0 = W
  MoeExchange exchange = MoeExchange::kAuto;
  int64_t auto_max_routed_rows = kAutoMaxRoutedRows;  // kAuto's all-gather limit (tests lower it)
  // The exchange a step of `n_routed_rows` (tokens x top-k) uses: kAllToAll or kAllGather.
  MoeExchange step_exchange(int64_t n_routed_rows) const;

  // Throws naming the offending value before any weight is read.
  void validate(const LayoutShape& shape) const;
  int ep_size() const { return ep > 0 ? ep : world; }
  int tp_rank() const { return rank % tp; }
  int tp_group() const { return rank / tp; }
  int ep_rank() const { return rank % ep_size(); }
  int ep_group() const { return rank / ep_size(); }
};

// Contiguous split of `n` items over `parts`: the first n % parts parts get one more.
int64_t split_begin(int64_t n, int64_t parts, int64_t i);
int64_t split_count(int64_t n, int64_t parts, int64_t i);

// Experts of expert-parallel rank `e` of E: a contiguous, possibly uneven, range.
std::vector<int64_t> experts_of(int64_t n_experts, int ep_size, int e);
// The expert-parallel rank (0..E-1) that owns `expert`.
int owner_of_expert(int64_t n_experts, int ep_size, int64_t expert);

// Tokens of one step owned by each rank: split_count(n_tokens, W, r), in rank order.
void token_counts(int64_t n_tokens, int world, std::vector<int64_t>& counts);

// The layout and expert placement as a table for rank 0 to print.
std::string layout_table(const ParallelConfig& p, const LayoutShape& shape);

}  // namespace sy
