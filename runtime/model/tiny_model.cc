// Seeded random Mixtral checkpoints (see tiny_model.h).
#include "runtime/model/tiny_model.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/formats/chat_template.h"
#include "runtime/formats/safetensors.h"
#include "runtime/formats/tokenizer.h"

namespace sy {

TinyModelOptions TinyModelOptions::defaults() {
  TinyModelOptions o;
  ModelConfig& c = o.config;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 8;
  c.head_dim = 16;
  c.num_local_experts = 8;
  c.num_experts_per_tok = 2;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 1e6;
  c.sliding_window = 256;
  c.max_position_embeddings = 4096;
  c.vocab_size = 512;
  c.tie_word_embeddings = false;
  c.torch_dtype = DType::kBF16;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return o;
}

namespace {

// Deterministic normal samples on every platform (std::normal_distribution is not specified).
class Normal {
 public:
  explicit Normal(uint64_t seed) : rng_(seed) {}
  float operator()() {
    const double u1 = (static_cast<double>(rng_() >> 11) + 0.5) * 0x1.0p-53;
    const double u2 = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
  }

 private:
  std::mt19937_64 rng_;
};

struct Owned {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<uint16_t> half;  // bf16 / f16 data
  std::vector<float> full;     // f32 data
};

// tokenizer.model: trained on `corpus`, or the given one copied (its size checked).
void write_tokenizer(const std::string& dir, const TinyModelOptions& options,
                     const std::string& corpus) {
  const ModelConfig& c = options.config;
  if (options.tokenizer_model.empty()) {
    train_tokenizer(corpus, static_cast<int>(c.vocab_size), dir + "/tokenizer.model");
  } else {
    SY_CHECK(std::filesystem::is_regular_file(options.tokenizer_model), "--tokenizer ",
             options.tokenizer_model, ": no such file");
    std::filesystem::copy_file(options.tokenizer_model, dir + "/tokenizer.model",
                               std::filesystem::copy_options::overwrite_existing);
    const int64_t pieces = Tokenizer::load(dir, c.bos_token_id, c.eos_token_ids)->vocab_size();
    SY_CHECK(pieces == c.vocab_size, "the tokenizer ", options.tokenizer_model, " has ", pieces,
             " pieces, but the vocabulary is ", c.vocab_size, "; give --vocab-size ", pieces);
  }
}

}  // namespace

namespace {

// config.json, generation_config.json and tokenizer_config.json of the checkpoint.
void write_configs(const std::string& dir, const ModelConfig& c) {
  auto write_text = [&dir](const std::string& name, const std::string& text) {
    std::ofstream out(dir + "/" + name);
    out << text;
    SY_CHECK(out.good(), "cannot write ", dir, "/", name);
  };
  write_text("config.json", c.to_json());
  std::string eos = c.eos_token_ids.empty() ? "null" : std::to_string(c.eos_token_ids[0]);
  write_text("generation_config.json", "{\n  \"bos_token_id\": " + std::to_string(c.bos_token_id) +
                                           ",\n  \"eos_token_id\": " + eos + "\n}\n");
  // As Mixtral-8x7B-Instruct's, with its chat template, so that the tiny model serves chat.
  const nlohmann::ordered_json tokenizer_config = {
      {"tokenizer_class", "LlamaTokenizer"},
      {"bos_token", "<s>"},
      {"eos_token", "</s>"},
      {"unk_token", "<unk>"},
      {"add_bos_token", true},
      {"add_eos_token", false},
      {"legacy", true},
      {"chat_template", ChatTemplate::mixtral_instruct()}};
  write_text("tokenizer_config.json", tokenizer_config.dump(2) + "\n");
}

}  // namespace

void write_tiny_model(const std::string& dir, const TinyModelOptions& options,
                      const std::string& corpus) {
  const ModelConfig& c = options.config;
  c.validate();
  std::filesystem::create_directories(dir);
  // The tokenizer first: a vocabulary too small for it fails before any weight is written.
  write_tokenizer(dir, options, corpus);
  Normal normal(options.seed);
  const DType dtype = c.torch_dtype;
  std::vector<Owned> tensors;
  // Linear weights ~ N(0, 1/fan_in) keep activations O(1) through the layers; norm weights
  // near 1; embeddings ~ N(0, 1).
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float mean, float std) {
    Owned t;
    t.name = name;
    t.shape = shape;
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    if (dtype == DType::kF32)
      t.full.resize(static_cast<size_t>(n));
    else
      t.half.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const float v = mean + std * normal();
      if (dtype == DType::kF32)
        t.full[i] = v;
      else if (dtype == DType::kBF16)
        t.half[i] = f32_to_bf16(v);
      else
        t.half[i] = f32_to_f16(v);
    }
    tensors.push_back(std::move(t));
  };
  const int64_t dim = c.hidden_size;
  const float s_dim = 1.f / std::sqrt(static_cast<float>(dim));
  const float s_q = 1.f / std::sqrt(static_cast<float>(c.q_dim()));
  const float s_hidden = 1.f / std::sqrt(static_cast<float>(c.intermediate_size));
  add("model.embed_tokens.weight", {c.vocab_size, dim}, 0.f, 1.f);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {dim}, 1.f, 0.1f);
    add(p + "self_attn.q_proj.weight", {c.q_dim(), dim}, 0.f, s_dim);
    add(p + "self_attn.k_proj.weight", {c.kv_dim(), dim}, 0.f, s_dim);
    add(p + "self_attn.v_proj.weight", {c.kv_dim(), dim}, 0.f, s_dim);
    add(p + "self_attn.o_proj.weight", {dim, c.q_dim()}, 0.f, s_q);
    add(p + "post_attention_layernorm.weight", {dim}, 1.f, 0.1f);
    add(p + "block_sparse_moe.gate.weight", {c.num_local_experts, dim}, 0.f, s_dim);
    for (int64_t e = 0; e < c.num_local_experts; ++e) {
      const std::string q = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      add(q + "w1.weight", {c.intermediate_size, dim}, 0.f, s_dim);
      add(q + "w2.weight", {dim, c.intermediate_size}, 0.f, s_hidden);
      add(q + "w3.weight", {c.intermediate_size, dim}, 0.f, s_dim);
    }
  }
  add("model.norm.weight", {dim}, 1.f, 0.1f);
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, dim}, 0.f, s_dim);

  std::vector<TensorToWrite> to_write;
  for (const Owned& t : tensors) {
    to_write.push_back({t.name, dtype, t.shape,
                        dtype == DType::kF32 ? static_cast<const void*>(t.full.data())
                                             : static_cast<const void*>(t.half.data())});
  }
  write_checkpoint(dir, to_write, options.max_shard_bytes);

  write_configs(dir, c);
}

}  // namespace sy
