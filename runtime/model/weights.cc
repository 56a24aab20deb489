// Loading a rank's weights from a Hugging Face Mixtral checkpoint (see weights.h).
#include "runtime/model/weights.h"

#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "kernels/cpu/quant.h"

namespace sy {

WeightFormat parse_weight_format(const std::string& name) {
  std::string lower;
  for (char ch : name)
    lower.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(ch))));
  for (WeightFormat f :
       {WeightFormat::kAuto, WeightFormat::kF32, WeightFormat::kBF16, WeightFormat::kF16,
        WeightFormat::kQ8_0, WeightFormat::kQ4_0, WeightFormat::kQ4_K})
    if (lower == weight_format_name(f)) return f;
  SY_FAIL("weights format \"", name, "\" is not one of auto, f32, bf16, f16, q8_0, q4_0, q4_k");
}

const char* weight_format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::kAuto:
      return "auto";
    case WeightFormat::kF32:
      return "f32";
    case WeightFormat::kBF16:
      return "bf16";
    case WeightFormat::kF16:
      return "f16";
    case WeightFormat::kQ8_0:
      return "q8_0";
    case WeightFormat::kQ4_0:
      return "q4_0";
    case WeightFormat::kQ4_K:
      return "q4_k";
  }
  return "?";
}

namespace {

// A Hugging Face checkpoint directory as a WeightSource.
class SafetensorsSource final : public WeightSource {
 public:
  explicit SafetensorsSource(const std::string& dir) : ckpt_(Checkpoint::open(dir)) {}
  DType stored_dtype(const std::string& name, const std::vector<int64_t>& shape) const override {
    const SafetensorsEntry& entry = ckpt_.entry(name);
    SY_CHECK(entry.shape == shape, "tensor ", name, ": shape does not match config.json");
    return entry.dtype;
  }
  uint64_t stored_bytes(const std::string& name, const std::vector<int64_t>& shape,
                        const Slice& slice) const override {
    int64_t n = 1;
    for (size_t d = 0; d < shape.size(); ++d)
      n *= static_cast<int>(d) == slice.dim ? slice.end - slice.begin : shape[d];
    return dtype_bytes(ckpt_.entry(name).dtype, n);
  }
  void read(const std::string& name, const std::vector<int64_t>& shape, const Tensor& out,
            const Slice& slice) override {
    ckpt_.read(name, shape, out, slice);
  }
  bool can_read_as(DType dtype, const std::string&, const std::vector<int64_t>&,
                   const Slice&) const override {
    return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16;
  }
  void set_progress(std::function<void(const LoadProgress&)> callback,
                    uint64_t bytes_total) override {
    ckpt_.set_progress(std::move(callback), bytes_total);
  }
  uint64_t file_bytes() const override { return ckpt_.file_bytes(); }
  bool prefers_stored_dtype() const override { return false; }

 private:
  Checkpoint ckpt_;
};

}  // namespace

std::unique_ptr<WeightSource> open_safetensors_source(const std::string& model_dir) {
  return std::make_unique<SafetensorsSource>(model_dir);
}

WeightShard WeightShard::full(const ModelConfig& config) {
  WeightShard s;
  s.n_heads = config.num_attention_heads;
  s.n_kv_heads = config.num_key_value_heads;
  for (int64_t e = 0; e < config.num_local_experts; ++e) s.experts.push_back(e);
  s.n_vocab = config.vocab_size;
  return s;
}

namespace {

// One tensor to read: its checkpoint name, full shape, slice, and destination.
struct Planned {
  std::string name;
  std::vector<int64_t> shape;
  Slice slice;
  Tensor* dst;
  std::vector<int64_t> dst_shape;
  bool fp32 = false;  // held in F32 whatever the storage dtype (the router)
};

class ProgressPrinter {
 public:
  explicit ProgressPrinter(bool enabled) : enabled_(enabled), tty_(isatty(2) != 0) {}
  void operator()(const LoadProgress& p) {
    if (!enabled_) return;
    const bool done = p.bytes_total > 0 && p.bytes_read >= p.bytes_total;
    if (!done && p.seconds - last_ < (tty_ ? 0.1 : 2.0)) return;
    last_ = p.seconds;
    const double mib = static_cast<double>(p.bytes_read) / (1 << 20);
    const double total = static_cast<double>(p.bytes_total) / (1 << 20);
    const double rate = p.seconds > 0 ? mib / p.seconds : 0;
    std::fprintf(stderr, "%sloading weights: %8.1f / %.1f MiB  %5lld tensors  %7.1f MiB/s%s",
                 tty_ ? "\r" : "", mib, total, static_cast<long long>(p.tensors_read), rate,
                 tty_ && !done ? "" : "\n");
    std::fflush(stderr);
  }

 private:
  bool enabled_;
  bool tty_;
  double last_ = -1;
};

void check_shard(const ModelConfig& c, const WeightShard& shard) {
  SY_CHECK(shard.head_begin >= 0 && shard.n_heads > 0 &&
               shard.head_begin + shard.n_heads <= c.num_attention_heads,
           "weight shard: heads [", shard.head_begin, ", ", shard.head_begin + shard.n_heads,
           ") outside ", c.num_attention_heads);
  SY_CHECK(shard.kv_head_begin >= 0 && shard.n_kv_heads > 0 &&
               shard.kv_head_begin + shard.n_kv_heads <= c.num_key_value_heads,
           "weight shard: KV heads outside ", c.num_key_value_heads);
  SY_CHECK(shard.vocab_begin >= 0 && shard.n_vocab > 0 &&
               shard.vocab_begin + shard.n_vocab <= c.vocab_size,
           "weight shard: vocabulary rows outside ", c.vocab_size);
  for (int64_t e : shard.experts)
    SY_CHECK(e >= 0 && e < c.num_local_experts, "weight shard: expert ", e, " outside ",
             c.num_local_experts);
}

// The tensors of layer `l`: attention (this rank's heads), norms, router, this rank's experts.
void plan_layer(const ModelConfig& c, const WeightShard& shard, int64_t l, LayerWeights& L,
                std::vector<Planned>& plan) {
  const int64_t dim = c.hidden_size;
  const int64_t hidden_dim = c.intermediate_size;
  const int64_t head_dim = c.head_dim;
  const int64_t n_experts = c.num_local_experts;
  const Slice all;
  const Slice q_rows{0, shard.head_begin * head_dim, (shard.head_begin + shard.n_heads) * head_dim};
  const Slice kv_rows{0, shard.kv_head_begin * head_dim,
                      (shard.kv_head_begin + shard.n_kv_heads) * head_dim};
  const Slice o_cols{1, q_rows.begin, q_rows.end};
  const int64_t q_shard = shard.n_heads * head_dim, kv_shard = shard.n_kv_heads * head_dim;
  const std::string p = "model.layers." + std::to_string(l) + ".";
  plan.push_back({p + "input_layernorm.weight", {dim}, all, &L.input_norm, {dim}});
  plan.push_back({p + "self_attn.q_proj.weight", {c.q_dim(), dim}, q_rows, &L.wq, {q_shard, dim}});
  plan.push_back(
      {p + "self_attn.k_proj.weight", {c.kv_dim(), dim}, kv_rows, &L.wk, {kv_shard, dim}});
  plan.push_back(
      {p + "self_attn.v_proj.weight", {c.kv_dim(), dim}, kv_rows, &L.wv, {kv_shard, dim}});
  plan.push_back({p + "self_attn.o_proj.weight", {dim, c.q_dim()}, o_cols, &L.wo, {dim, q_shard}});
  plan.push_back({p + "post_attention_layernorm.weight", {dim}, all, &L.post_norm, {dim}});
  plan.push_back(
      {p + "block_sparse_moe.gate.weight", {n_experts, dim}, all, &L.gate, {n_experts, dim}, true});
  L.w1.resize(shard.experts.size());  // sized before their elements' addresses are taken
  L.w2.resize(shard.experts.size());
  L.w3.resize(shard.experts.size());
  for (size_t i = 0; i < shard.experts.size(); ++i) {
    const std::string e = p + "block_sparse_moe.experts." + std::to_string(shard.experts[i]) + ".";
    plan.push_back({e + "w1.weight", {hidden_dim, dim}, all, &L.w1[i], {hidden_dim, dim}});
    plan.push_back({e + "w2.weight", {dim, hidden_dim}, all, &L.w2[i], {dim, hidden_dim}});
    plan.push_back({e + "w3.weight", {hidden_dim, dim}, all, &L.w3[i], {hidden_dim, dim}});
  }
}

// Every tensor a rank holds: checkpoint name, full shape, slice, and the view it fills. Checks
// the shard against the config.
std::vector<Planned> plan_weights(const ModelConfig& c, const WeightShard& shard, Weights& w) {
  check_shard(c, shard);
  const int64_t dim = c.hidden_size;
  w.shard = shard;
  w.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  std::vector<Planned> plan;
  const Slice vocab_rows{0, shard.vocab_begin, shard.vocab_begin + shard.n_vocab};
  plan.push_back({"model.embed_tokens.weight",
                  {c.vocab_size, dim},
                  vocab_rows,
                  &w.embed,
                  {shard.n_vocab, dim}});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    plan_layer(c, shard, l, w.layers[static_cast<size_t>(l)], plan);
  plan.push_back({"model.norm.weight", {dim}, Slice{}, &w.norm, {dim}});
  if (!c.tie_word_embeddings)
    plan.push_back(
        {"lm_head.weight", {c.vocab_size, dim}, vocab_rows, &w.lm_head, {shard.n_vocab, dim}});
  return plan;
}

// The dtype a format other than kAuto names.
DType format_dtype(WeightFormat format) {
  switch (format) {
    case WeightFormat::kF32:
      return DType::kF32;
    case WeightFormat::kBF16:
      return DType::kBF16;
    case WeightFormat::kF16:
      return DType::kF16;
    case WeightFormat::kQ8_0:
      return DType::kQ8_0;
    case WeightFormat::kQ4_0:
      return DType::kQ4_0;
    case WeightFormat::kQ4_K:
      return DType::kQ4_K;
    case WeightFormat::kAuto:
      break;
  }
  SY_FAIL("weights format auto names no dtype");
}

// Dtype a planned tensor is held in: norm weights (1-d) and the router in F32; the rest as
// `format` says (see weights.h), F32 where a quantized type's blocks do not fit its rows.
DType held_dtype(const Planned& t, DType stored, bool prefer_stored, WeightFormat format,
                 const Ops& ops) {
  if (t.fp32 || t.dst_shape.size() == 1) return DType::kF32;
  DType want = ops.storage_dtype();
  if (format != WeightFormat::kAuto)
    want = format_dtype(format);
  else if (ops.device() == Device::kCpu && prefer_stored)
    want = stored;
  if (dtype_is_quantized(want) && t.dst_shape.back() % dtype_block_elems(want) != 0)
    return DType::kF32;
  return want;
}

// Carves the views of `plan` (their dtypes in `held`) out of one allocation on `ops`' device.
void allocate(std::vector<Planned>& plan, const std::vector<DType>& held, Weights& w, Ops& ops) {
  uint64_t n_bytes = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : plan[i].dst_shape) n *= d;
    n_bytes += (dtype_bytes(held[i], n) + 63) / 64 * 64;
  }
  w.storage = DeviceBuffer(ops, n_bytes);
  w.total_bytes = n_bytes;
  char* cursor = static_cast<char*>(w.storage.get());
  for (size_t i = 0; i < plan.size(); ++i) {
    Planned& t = plan[i];
    Tensor view;
    view.data = cursor;
    view.dtype = held[i];
    view.device = ops.device();
    view.ndim = static_cast<int>(t.dst_shape.size());
    for (int d = 0; d < view.ndim; ++d) view.shape[d] = t.dst_shape[static_cast<size_t>(d)];
    *t.dst = view;
    cursor += (view.bytes() + 63) / 64 * 64;
  }
}

// Reads one planned tensor into `host` (a host view of its held dtype): directly when the source
// gives that dtype, else through F32 rows quantized here.
void read_planned(WeightSource& source, const Planned& t, const Tensor& host,
                  std::vector<float>& staging) {
  if (source.can_read_as(host.dtype, t.name, t.shape, t.slice)) {
    source.read(t.name, t.shape, host, t.slice);
    return;
  }
  SY_CHECK(dtype_is_quantized(host.dtype), "tensor ", t.name, ": cannot be read as ",
           dtype_name(host.dtype));
  staging.resize(static_cast<size_t>(host.numel()));
  Tensor f32 = host;
  f32.dtype = DType::kF32;
  f32.data = staging.data();
  source.read(t.name, t.shape, f32, t.slice);
  const int64_t cols = host.shape[host.ndim - 1];
  const int64_t rows = host.numel() / cols;
  auto* out = static_cast<uint8_t*>(host.data);
  const size_t row_bytes = dtype_bytes(host.dtype, cols);
  for (int64_t r = 0; r < rows; ++r)
    cpu::row_from_f32(host.dtype, staging.data() + r * cols, out + r * row_bytes, cols);
}

void finish_weights(const ModelConfig& c, Weights& w) {
  if (c.tie_word_embeddings) w.lm_head = w.embed;
  w.expert_bytes = 0;
  for (const LayerWeights& L : w.layers)
    for (size_t i = 0; i < L.w1.size(); ++i)
      w.expert_bytes += L.w1[i].bytes() + L.w2[i].bytes() + L.w3[i].bytes();
}

}  // namespace

Weights Weights::load(WeightSource& source, const ModelConfig& c, const WeightShard& shard,
                      Ops& ops, bool show_progress, WeightFormat format) {
  SY_CHECK(ops.device() == Device::kCpu || format == WeightFormat::kAuto ||
               format_dtype(format) == ops.storage_dtype(),
           "--weights ", weight_format_name(format), ": the CUDA backend holds weights in ",
           dtype_name(ops.storage_dtype()),
           dtype_is_quantized(format_dtype(format))
               ? " (quantized weights run on --device cpu only)"
               : "");
  Weights w;
  std::vector<Planned> plan = plan_weights(c, shard, w);
  // Every tensor exists with the shape the config implies, before anything is allocated.
  uint64_t source_bytes = 0;
  std::vector<DType> held;
  for (const Planned& t : plan) {
    const DType stored = source.stored_dtype(t.name, t.shape);
    DType h = held_dtype(t, stored, source.prefers_stored_dtype(), format, ops);
    // A quantized tensor whose slice splits its blocks, or that the source cannot give as h
    // without quantizing it again, is held dequantized.
    if (dtype_is_quantized(stored) && !source.can_read_as(h, t.name, t.shape, t.slice))
      h = DType::kF32;
    held.push_back(h);
    source_bytes += source.stored_bytes(t.name, t.shape, t.slice);
  }
  allocate(plan, held, w, ops);
  ProgressPrinter printer(show_progress);
  source.set_progress(std::ref(printer), source_bytes);
  std::vector<char> staging;
  std::vector<float> rows;
  for (const Planned& t : plan) {
    const Tensor& view = *t.dst;
    if (ops.device() == Device::kCpu) {
      read_planned(source, t, view, rows);
    } else {
      staging.resize(view.bytes());
      Tensor host = view;
      host.data = staging.data();
      host.device = Device::kCpu;
      read_planned(source, t, host, rows);  // converted to the held dtype on the host
      ops.copy_from_host(view.data, staging.data(), view.bytes());
    }
  }
  source.set_progress(nullptr, 0);
  finish_weights(c, w);
  return w;
}

Weights Weights::synthetic(const ModelConfig& c, const WeightShard& shard, Ops& ops,
                           uint64_t seed) {
  Weights w;
  std::vector<Planned> plan = plan_weights(c, shard, w);
  std::vector<DType> held;
  for (const Planned& t : plan)
    held.push_back(t.fp32 || t.dst_shape.size() == 1 ? DType::kF32 : ops.storage_dtype());
  allocate(plan, held, w, ops);
  std::vector<float> staging;
  std::vector<uint16_t> staging16;
  uint64_t tensor_index = 0;
  for (const Planned& t : plan) {
    const Tensor& view = *t.dst;
    // Norm weights near 1, embeddings ~ unit scale, linear weights ~ 1/sqrt(fan_in): activations
    // stay O(1). Uniform values (the same variance) are ~10x cheaper to make than normal ones.
    const bool norm = view.ndim == 1;
    const bool embed = t.name == "model.embed_tokens.weight";
    const float std = norm    ? 0.1f
                      : embed ? 1.f
                              : 1.f / std::sqrt(static_cast<float>(t.shape.back()));
    const float mean = norm ? 1.f : 0.f;
    const float half_width = std * std::sqrt(3.f);
    // Each tensor's values depend only on (seed, its name's position), not on the shard, for
    // full tensors; sliced tensors differ across layouts, which a benchmark does not mind.
    uint64_t state = seed * 0x9e3779b97f4a7c15ull + (++tensor_index) * 0xbf58476d1ce4e5b9ull + 1;
    const bool direct = ops.device() == Device::kCpu && view.dtype == DType::kF32;
    float* dst = direct ? view.f32() : nullptr;
    if (!direct) {
      staging.resize(static_cast<size_t>(view.numel()));
      dst = staging.data();
    }
    for (int64_t i = 0; i < view.numel(); ++i) {
      state ^= state << 13;
      state ^= state >> 7;
      state ^= state << 17;
      const float u = static_cast<float>(state >> 40) * 0x1.0p-24f;  // [0, 1)
      dst[i] = mean + half_width * (2.f * u - 1.f);
    }
    if (!direct) {
      const void* src = dst;
      if (view.dtype == DType::kBF16) {
        staging16.resize(static_cast<size_t>(view.numel()));
        for (int64_t i = 0; i < view.numel(); ++i) staging16[i] = f32_to_bf16(dst[i]);
        src = staging16.data();
      } else {
        SY_CHECK(view.dtype == DType::kF32, "synthetic weights: ", dtype_name(view.dtype));
      }
      if (ops.device() == Device::kCpu)
        std::memcpy(view.data, src, view.bytes());
      else
        ops.copy_from_host(view.data, src, view.bytes());
    }
  }
  finish_weights(c, w);
  return w;
}

}  // namespace sy
