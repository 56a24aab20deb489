// Weights: every tensor of the model this rank holds, as views into one device allocation.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/ops.h"
#include "runtime/formats/safetensors.h"
#include "runtime/model/config.h"

namespace sy {

// Which part of the model a rank holds. The default (WeightShard::full) is the whole model.
struct WeightShard {
  int64_t head_begin = 0;        // first query head held here
  int64_t n_heads = 0;           // query heads held here
  int64_t kv_head_begin = 0;     // first key/value head held here
  int64_t n_kv_heads = 0;        // key/value heads held here
  std::vector<int64_t> experts;  // global ids of the experts held here, ascending
  int64_t vocab_begin = 0;       // first row of embed_tokens / lm_head held here
  int64_t n_vocab = 0;           // rows of embed_tokens / lm_head held here

  static WeightShard full(const ModelConfig& config);
};

struct LayerWeights {
  Tensor input_norm;  // [dim]
  Tensor wq;          // [n_heads * head_dim, dim]     rows of this rank's heads
  Tensor wk;          // [n_kv_heads * head_dim, dim]
  Tensor wv;          // [n_kv_heads * head_dim, dim]
  Tensor wo;          // [dim, n_heads * head_dim]     columns of this rank's heads
  Tensor post_norm;   // [dim]
  Tensor gate;        // [n_experts, dim]              router, replicated
  // This rank's experts, in WeightShard::experts order: [n_local_experts] each.
  std::vector<Tensor> w1;  // [hidden_dim, dim]  gate projection
  std::vector<Tensor> w2;  // [dim, hidden_dim]  down projection
  std::vector<Tensor> w3;  // [hidden_dim, dim]  up projection
};

struct Weights {
  Tensor embed;                      // [n_vocab, dim]   rows [vocab_begin, vocab_begin + n_vocab)
  std::vector<LayerWeights> layers;  // [n_layers]
  Tensor norm;                       // [dim]
  Tensor lm_head;                    // [n_vocab, dim]   the embed rows when tied
  WeightShard shard;
  uint64_t expert_bytes = 0;  // bytes of this rank's experts
  uint64_t total_bytes = 0;   // bytes of everything held here
  DeviceBuffer storage;       // one allocation backing every tensor above

  // Reads this rank's part of `checkpoint` into memory of `ops`' device, checking every tensor's
  // shape against `config`. Norm weights are F32; every other tensor is converted to
  // ops.storage_dtype() (F32 on the CPU, BF16 on the GPU). `show_progress` prints bytes, tensors
  // and rate to stderr.
  static Weights load(Checkpoint& checkpoint, const ModelConfig& config, const WeightShard& shard,
                      Ops& ops, bool show_progress);
  // Seeded random weights of the shapes `config` implies, made in memory with no files (for
  // benchmarks at real model sizes). Linear weights have variance 1/fan_in, norms ~1.
  static Weights synthetic(const ModelConfig& config, const WeightShard& shard, Ops& ops,
                           uint64_t seed);
};

}  // namespace sy
