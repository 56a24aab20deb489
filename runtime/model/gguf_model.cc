// GGUF Mixtral models (see gguf_model.h).
#include "runtime/model/gguf_model.h"

#include <chrono>
#include <cstring>
#include <optional>
#include <regex>

#include "kernels/cpu/quant.h"

namespace sy {
namespace {

std::string arch_of(const GgufFile& f) {
  const std::string& arch = f.string("general.architecture");
  SY_CHECK(arch == "llama" || arch == "mixtral", f.path(), ": general.architecture is \"", arch,
           "\", not a Mixtral-architecture model (llama with experts)");
  return arch;
}

// An integer key that must fit the config (below 2^31).
int64_t get_int(const GgufFile& f, const std::string& key) {
  const uint64_t v = f.uint(key);
  SY_CHECK(v < (1ull << 31), f.path(), ": ", key, " is ", v, " (too large)");
  return static_cast<int64_t>(v);
}

std::optional<int64_t> find_int(const GgufFile& f, const std::string& key) {
  if (f.find(key) == nullptr) return std::nullopt;
  return get_int(f, key);
}

}  // namespace

ModelConfig config_from_gguf(const GgufModelFiles& files) {
  const GgufFile& f = files.meta();
  const std::string a = arch_of(f) + ".";
  ModelConfig c;
  c.num_hidden_layers = get_int(f, a + "block_count");
  c.max_position_embeddings = get_int(f, a + "context_length");
  c.hidden_size = get_int(f, a + "embedding_length");
  c.intermediate_size = get_int(f, a + "feed_forward_length");
  c.num_attention_heads = get_int(f, a + "attention.head_count");
  c.num_key_value_heads =
      find_int(f, a + "attention.head_count_kv").value_or(c.num_attention_heads);
  SY_CHECK(f.find(a + "expert_count") != nullptr, f.path(), ": ", a,
           "expert_count is missing: not a mixture-of-experts model");
  c.num_local_experts = get_int(f, a + "expert_count");
  c.num_experts_per_tok = get_int(f, a + "expert_used_count");
  const int64_t heads = c.num_attention_heads > 0 ? c.num_attention_heads : 1;
  c.head_dim =
      find_int(f, a + "attention.key_length")
          .value_or(find_int(f, a + "rope.dimension_count").value_or(c.hidden_size / heads));
  if (const auto v = find_int(f, a + "attention.value_length"))
    SY_CHECK(*v == c.head_dim, f.path(), ": ", a, "attention.value_length ", *v,
             " differs from the key length ", c.head_dim);
  if (const auto v = find_int(f, a + "rope.dimension_count"))
    SY_CHECK(*v == c.head_dim, f.path(), ": ", a, "rope.dimension_count ", *v,
             " is not the head size ", c.head_dim, " (partial RoPE is not supported)");
  c.rope_theta = f.find(a + "rope.freq_base") != nullptr ? f.number(a + "rope.freq_base") : 1e4;
  c.rms_norm_eps = f.number(a + "attention.layer_norm_rms_epsilon");
  c.sliding_window = find_int(f, a + "attention.sliding_window").value_or(0);
  SY_CHECK(
      f.find(a + "rope.scaling.type") == nullptr || f.string(a + "rope.scaling.type") == "none",
      f.path(), ": ", a, "rope.scaling.type is not supported");
  if (const auto v = find_int(f, a + "vocab_size")) {
    c.vocab_size = *v;
  } else {
    c.vocab_size = static_cast<int64_t>(f.strings("tokenizer.ggml.tokens").size());
  }
  c.tie_word_embeddings = files.find_tensor("output.weight", nullptr) == nullptr;
  c.torch_dtype = DType::kBF16;
  c.bos_token_id = find_int(f, "tokenizer.ggml.bos_token_id").value_or(-1);
  if (const auto eos = find_int(f, "tokenizer.ggml.eos_token_id")) c.eos_token_ids.push_back(*eos);
  c.validate();
  return c;
}

namespace {

// Where a Hugging Face tensor lies in the GGUF files.
struct Location {
  std::string gguf_name;
  const GgufFile* file = nullptr;
  const GgufTensor* tensor = nullptr;
  int64_t expert = -1;  // index in a merged 3-D expert tensor; -1: none
  int64_t heads = 0;    // rows permuted for interleaved RoPE in this many heads; 0: none
  DType dtype = DType::kF32;
};

class GgufSource final : public WeightSource {
 public:
  GgufSource(GgufModelFiles files, ModelConfig config)
      : files_(std::move(files)), config_(std::move(config)) {}

  DType stored_dtype(const std::string& name, const std::vector<int64_t>& shape) const override {
    return locate(name, shape).dtype;
  }
  uint64_t stored_bytes(const std::string& name, const std::vector<int64_t>& shape,
                        const Slice& slice) const override {
    const Location loc = locate(name, shape);
    const auto [rows, cols] = extents(shape, slice);
    // A column slice reads whole rows (dequantized, then cut).
    const int64_t read_cols = slice.dim == 1 ? shape[1] : cols;
    return static_cast<uint64_t>(rows) * dtype_bytes(loc.dtype, read_cols);
  }
  bool can_read_as(DType dtype, const std::string& name, const std::vector<int64_t>& shape,
                   const Slice& slice) const override {
    if (dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16) return true;
    const Location loc = locate(name, shape);
    if (dtype != loc.dtype) return false;
    const int64_t block = dtype_block_elems(dtype);
    return slice.dim != 1 || (slice.begin % block == 0 && slice.end % block == 0);
  }
  void read(const std::string& name, const std::vector<int64_t>& shape, const Tensor& out,
            const Slice& slice) override;
  void set_progress(std::function<void(const LoadProgress&)> callback,
                    uint64_t bytes_total) override {
    callback_ = std::move(callback);
    progress_ = LoadProgress{};
    progress_.bytes_total = bytes_total;
    start_ = std::chrono::steady_clock::now();
  }
  uint64_t file_bytes() const override { return files_.total_bytes(); }
  bool prefers_stored_dtype() const override { return true; }

 private:
  // Rows and columns of `shape` (a 1-d tensor is one row) after `slice`.
  static std::pair<int64_t, int64_t> extents(const std::vector<int64_t>& shape,
                                             const Slice& slice) {
    int64_t rows = shape.size() == 2 ? shape[0] : 1;
    int64_t cols = shape.back();
    if (slice.dim == 0 && shape.size() == 2) rows = slice.end - slice.begin;
    if (slice.dim == 1 || (slice.dim == 0 && shape.size() == 1)) cols = slice.end - slice.begin;
    return {rows, cols};
  }
  Location locate(const std::string& name, const std::vector<int64_t>& shape) const;
  int64_t source_row(const Location& loc, int64_t row) const;

  GgufModelFiles files_;
  ModelConfig config_;
  std::function<void(const LoadProgress&)> callback_;
  LoadProgress progress_;
  std::chrono::steady_clock::time_point start_;
  std::vector<float> row_;
};

std::string dims_str(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// llama.cpp's name of a Hugging Face tensor, with the expert and permutation it needs.
Location gguf_name_of(const std::string& name, const ModelConfig& c, const std::string& source) {
  static const std::regex layer(R"(model\.layers\.([0-9]+)\.(.*))");
  static const std::regex expert(R"(block_sparse_moe\.experts\.([0-9]+)\.(w[123])\.weight)");
  Location loc;
  if (name == "model.embed_tokens.weight") {
    loc.gguf_name = "token_embd.weight";
  } else if (name == "model.norm.weight") {
    loc.gguf_name = "output_norm.weight";
  } else if (name == "lm_head.weight") {
    loc.gguf_name = "output.weight";
  }
  std::smatch m;
  if (loc.gguf_name.empty() && std::regex_match(name, m, layer)) {
    const std::string blk = "blk." + m[1].str() + ".";
    const std::string rest = m[2].str();
    const std::pair<const char*, const char*> plain[] = {
        {"input_layernorm.weight", "attn_norm.weight"},
        {"self_attn.q_proj.weight", "attn_q.weight"},
        {"self_attn.k_proj.weight", "attn_k.weight"},
        {"self_attn.v_proj.weight", "attn_v.weight"},
        {"self_attn.o_proj.weight", "attn_output.weight"},
        {"post_attention_layernorm.weight", "ffn_norm.weight"},
        {"block_sparse_moe.gate.weight", "ffn_gate_inp.weight"}};
    for (const auto& [hf, gg] : plain)
      if (rest == hf) loc.gguf_name = blk + gg;
    if (rest == "self_attn.q_proj.weight") loc.heads = c.num_attention_heads;
    if (rest == "self_attn.k_proj.weight") loc.heads = c.num_key_value_heads;
    std::smatch e;
    if (std::regex_match(rest, e, expert)) {
      const char* kind = e[2] == "w1" ? "gate" : e[2] == "w2" ? "down" : "up";
      loc.gguf_name = blk + "ffn_" + kind + "_exps.weight";
      loc.expert = std::stoll(e[1].str());  // locate() falls back to the per-expert tensors
    }
  }
  SY_CHECK(!loc.gguf_name.empty(), source, ": no GGUF tensor for ", name);
  return loc;
}

Location GgufSource::locate(const std::string& name, const std::vector<int64_t>& shape) const {
  const std::string& path = files_.meta().path();
  Location loc = gguf_name_of(name, config_, path);
  std::vector<int64_t> want(shape.rbegin(), shape.rend());  // GGUF dims: innermost first
  loc.tensor = files_.find_tensor(loc.gguf_name, &loc.file);
  if (loc.expert >= 0) {
    if (loc.tensor != nullptr) {
      want.push_back(config_.num_local_experts);
    } else {  // blk.N.ffn_gate_exps.weight -> blk.N.ffn_gate.E.weight
      const std::string base = loc.gguf_name.substr(0, loc.gguf_name.size() - 12);
      const std::string per_expert = base + "." + std::to_string(loc.expert) + ".weight";
      loc.tensor = files_.find_tensor(per_expert, &loc.file);
      SY_CHECK(loc.tensor != nullptr, path, ": tensor ", loc.gguf_name, " (or ", per_expert,
               ") for ", name, " is missing");
      loc.gguf_name = per_expert;
      loc.expert = -1;
    }
  }
  SY_CHECK(loc.tensor != nullptr, path, ": tensor ", loc.gguf_name, " for ", name, " is missing");
  SY_CHECK(loc.tensor->dims == want, path, ": tensor ", loc.gguf_name, " has dims ",
           dims_str(loc.tensor->dims), " (innermost first), but the config implies ",
           dims_str(want));
  SY_CHECK(cpu::dtype_of_ggml(loc.tensor->type, &loc.dtype), path, ": tensor ", loc.gguf_name,
           " has GGML type ", static_cast<uint32_t>(loc.tensor->type), " (",
           cpu::ggml_type_info(static_cast<uint32_t>(loc.tensor->type)).name != nullptr
               ? cpu::ggml_type_info(static_cast<uint32_t>(loc.tensor->type)).name
               : "unknown",
           "), which this build does not read (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)");
  return loc;
}

// The GGUF row of Hugging Face row `row` (undoing llama.cpp's RoPE permutation).
int64_t GgufSource::source_row(const Location& loc, int64_t row) const {
  if (loc.heads == 0) return row;
  const int64_t d = config_.head_dim;
  const int64_t head = row / d, j = row % d;
  return head * d + (j < d / 2 ? 2 * j : 2 * (j - d / 2) + 1);
}

void GgufSource::read(const std::string& name, const std::vector<int64_t>& shape, const Tensor& out,
                      const Slice& slice) {
  const Location loc = locate(name, shape);
  const auto [rows, cols] = extents(shape, slice);
  SY_CHECK(out.numel() == rows * cols, "tensor ", name, ": destination ", out.shape_str(),
           " does not hold ", rows, " x ", cols);
  SY_CHECK(can_read_as(out.dtype, name, shape, slice), "tensor ", name, ": cannot be read as ",
           dtype_name(out.dtype));
  const int64_t full_cols = shape.back();
  const int64_t full_rows = shape.size() == 2 ? shape[0] : 1;
  const int64_t row0 = slice.dim == 0 && shape.size() == 2 ? slice.begin : 0;
  const int64_t col0 = slice.dim == 1 || (slice.dim == 0 && shape.size() == 1) ? slice.begin : 0;
  const size_t src_row_bytes = dtype_bytes(loc.dtype, full_cols);
  const uint8_t* base =
      loc.file->data(*loc.tensor) +
      static_cast<size_t>(std::max<int64_t>(loc.expert, 0) * full_rows) * src_row_bytes;
  auto* dst = static_cast<uint8_t*>(out.data);
  const size_t dst_row_bytes = dtype_bytes(out.dtype, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = base + static_cast<size_t>(source_row(loc, row0 + r)) * src_row_bytes;
    uint8_t* d = dst + static_cast<size_t>(r) * dst_row_bytes;
    if (out.dtype == loc.dtype) {
      std::memcpy(d, src + dtype_bytes(loc.dtype, col0), dst_row_bytes);
      continue;
    }
    row_.resize(static_cast<size_t>(full_cols));
    cpu::row_to_f32(loc.dtype, src, row_.data(), full_cols);
    cpu::row_from_f32(out.dtype, row_.data() + col0, d, cols);
  }
  progress_.bytes_read += stored_bytes(name, shape, slice);
  ++progress_.tensors_read;
  progress_.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (callback_) callback_(progress_);
}

}  // namespace

std::unique_ptr<WeightSource> open_gguf_source(const std::string& path) {
  GgufModelFiles files = GgufModelFiles::open(path);
  ModelConfig config = config_from_gguf(files);
  return std::make_unique<GgufSource>(std::move(files), std::move(config));
}

}  // namespace sy
