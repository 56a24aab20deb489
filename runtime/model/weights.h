// Weights: every tensor of the model this rank holds, as views into one device allocation.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
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

// A checkpoint weights are read from, by Hugging Face tensor names and shapes (outermost first):
// safetensors (open_safetensors_source) or GGUF (gguf_model.h).
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  // The dtype `name` is stored in; throws naming the tensor when it is missing or its shape is
  // not `shape`.
  virtual DType stored_dtype(const std::string& name, const std::vector<int64_t>& shape) const = 0;
  // Bytes of `name` restricted to `slice` as stored (for progress and the resident-size check).
  virtual uint64_t stored_bytes(const std::string& name, const std::vector<int64_t>& shape,
                                const Slice& slice) const = 0;
  // Copies tensor `name` of full shape `shape`, restricted to `slice`, into the host tensor
  // `out` (its sliced shape), converted to out.dtype: F32, BF16, F16, or the stored block type
  // itself when the slice keeps whole blocks (can_read_as says which).
  virtual void read(const std::string& name, const std::vector<int64_t>& shape, const Tensor& out,
                    const Slice& slice) = 0;
  // Whether read() can give `dtype` for this tensor and slice.
  virtual bool can_read_as(DType dtype, const std::string& name, const std::vector<int64_t>& shape,
                           const Slice& slice) const = 0;
  virtual void set_progress(std::function<void(const LoadProgress&)> callback,
                            uint64_t bytes_total) = 0;
  // Bytes of the files read from (the resident-size bound of quantized weights).
  virtual uint64_t file_bytes() const = 0;
  // Whether WeightFormat::kAuto keeps the stored dtypes on the CPU (GGUF: yes).
  virtual bool prefers_stored_dtype() const = 0;
};

// The Hugging Face checkpoint directory `model_dir` (formats/safetensors.h).
std::unique_ptr<WeightSource> open_safetensors_source(const std::string& model_dir);

// The dtype the linear weights, embeddings and lm_head are held in. kAuto: the storage dtype of
// the backend, or on the CPU a GGUF file's own (quantized, F16 or BF16) type; F32 for
// safetensors. Otherwise that dtype, quantized at load where the checkpoint holds another
// (quantized types on the CPU backend only). Tensors whose rows do not hold whole blocks of a
// quantized type stay F32; norms and the router are always F32.
enum class WeightFormat { kAuto, kF32, kBF16, kF16, kQ8_0, kQ4_0, kQ4_K };
// "auto", "f32", "bf16", "f16", "q8_0", "q4_0", "q4_k"; throws naming the accepted values.
WeightFormat parse_weight_format(const std::string& name);
const char* weight_format_name(WeightFormat format);

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

  // Reads this rank's part of `source` into memory of `ops`' device, checking every tensor's
  // shape against `config`. Norm weights and the router are F32; every other tensor is held as
  // `format` says. `show_progress` prints bytes, tensors and rate to stderr.
  static Weights load(WeightSource& source, const ModelConfig& config, const WeightShard& shard,
                      Ops& ops, bool show_progress, WeightFormat format = WeightFormat::kAuto);
  // Seeded random weights of the shapes `config` implies, made in memory with no files (for
  // benchmarks at real model sizes). Linear weights have variance 1/fan_in, norms ~1.
  static Weights synthetic(const ModelConfig& config, const WeightShard& shard, Ops& ops,
                           uint64_t seed);
};

}  // namespace sy
