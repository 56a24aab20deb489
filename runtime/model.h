// The Mixtral forward pass over a batch of sequences with a paged KV cache.
//
// One step runs any mix of prefill chunks and decode tokens: the tokens of every sequence are
// flattened into one batch, each with its position and sequence index; attention reads each
// sequence's keys and values through its block table. Every buffer is sized once from
// ModelLimits; forward() allocates nothing.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/ops.h"
#include "runtime/config.h"
#include "runtime/moe.h"
#include "runtime/weights.h"

namespace sy {

// Capacity of the engine, fixed at start-up.
struct ModelLimits {
  int64_t max_tokens = 512;          // tokens in one step (prefill chunk budget)
  int64_t max_seqs = 1;              // sequences in one step
  int64_t max_blocks_per_seq = 0;    // block-table width: ceil(context limit / block_size)
  int64_t n_blocks = 0;              // KV blocks in the cache
  int64_t block_size = 16;           // tokens per KV block
  int64_t max_logit_rows = 512;      // rows of logits one step may ask for

  void validate() const;
};

// One step's input on the host: the tensor part of a step plan.
struct StepBatch {
  std::vector<int32_t> tokens;        // [n_tokens]
  std::vector<int32_t> positions;     // [n_tokens] position of each token in its sequence
  std::vector<int32_t> token_seq;     // [n_tokens] row of each token's sequence in block_tables
  std::vector<int32_t> block_tables;  // [n_seqs, max_blocks_per_seq] physical block ids
  int64_t n_seqs = 0;
  std::vector<int32_t> logit_rows;    // token rows whose logits are wanted, in output order

  int64_t n_tokens() const { return static_cast<int64_t>(tokens.size()); }
  void clear();
};

// Hands out KV blocks. Owned by the scheduler; every rank sees the same block ids.
class BlockAllocator {
 public:
  explicit BlockAllocator(int64_t n_blocks);
  // Appends `n` free blocks to `table`; false (and nothing taken) when too few are free.
  bool allocate(int64_t n, std::vector<int32_t>& table);
  void release(std::vector<int32_t>& table);  // returns every block of `table` and clears it
  int64_t n_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t n_total() const { return n_total_; }

 private:
  int64_t n_total_;
  std::vector<int32_t> free_;
};

class Model {
 public:
  Model(const ModelConfig& config, Weights weights, Ops& ops, const ModelLimits& limits);

  // Runs one step. `logits` (host, F32) receives [batch.logit_rows.size(), vocab] rows.
  void forward(const StepBatch& batch, float* logits);

  const ModelConfig& config() const { return config_; }
  const ModelLimits& limits() const { return limits_; }
  const Weights& weights() const { return weights_; }
  // Bytes of the KV cache on this rank.
  uint64_t kv_cache_bytes() const { return kv_storage_.bytes(); }

 private:
  void attention_block(int64_t layer, int64_t n_tokens, const AttentionMeta& meta);
  void moe_block(int64_t layer, int64_t n_tokens);

  ModelConfig config_;
  Weights weights_;
  Ops& ops_;
  ModelLimits limits_;

  // ---- run state (device), sized for limits_.max_tokens = N ----------------------------------
  DeviceBuffer state_storage_;
  Tensor x_;              // [N, dim]            residual stream
  Tensor xn_;             // [N, dim]            normed input of attention / MoE
  Tensor q_;              // [N, n_heads, head_dim]
  Tensor k_;              // [N, n_kv_heads, head_dim]
  Tensor v_;              // [N, n_kv_heads, head_dim]
  Tensor attn_;           // [N, n_heads, head_dim]
  Tensor o_;              // [N, dim]            attention output / MoE output
  Tensor router_logits_;  // [N, n_experts]
  Tensor topk_idx_;       // I32 [N, k]
  Tensor topk_weights_;   // [N, k]
  Tensor moe_in_;         // [N * k, dim]        token rows in expert order
  Tensor moe_out_;        // [N * k, dim]
  Tensor sorted_rows_;    // I32 [N * k]
  Tensor sorted_weights_; // [N * k]
  ExpertScratch expert_scratch_;  // [N * k, hidden_dim] x 2
  Tensor ids_;            // I32 [N]
  Tensor positions_;      // I32 [N]
  Tensor token_seq_;      // I32 [N]
  Tensor block_tables_;   // I32 [max_seqs, max_blocks_per_seq]
  Tensor logit_rows_;     // I32 [max_logit_rows]
  Tensor logit_x_;        // [max_logit_rows, dim]
  Tensor logits_;         // [max_logit_rows, n_vocab]

  // ---- KV cache (device): per layer [n_blocks, block_size, n_kv_heads, head_dim] -------------
  DeviceBuffer kv_storage_;
  std::vector<Tensor> k_cache_;  // [n_layers]
  std::vector<Tensor> v_cache_;  // [n_layers]

  // ---- host scratch ----------------------------------------------------------------------------
  MoeLayout layout_;
  std::vector<int32_t> host_topk_idx_;     // [N * k]
  std::vector<float> host_topk_weights_;   // [N * k]
  std::vector<int64_t> local_offsets_;     // [n_local_experts + 1]
};

}  // namespace sy
