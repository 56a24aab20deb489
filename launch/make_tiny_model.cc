// `switchyard make-tiny-model`: a seeded random Mixtral checkpoint in the Hugging Face layout.
#include <cstdio>
#include <string>

#include "launch/commands.h"

extern const char* const kTinyCorpus;
extern const size_t kTinyCorpus_size;

namespace sy::launch {

void add_make_tiny_model(CLI::App& app, MakeTinyModelArgs& a) {
  CLI::App* cmd = app.add_subcommand(
      "make-tiny-model",
      "Write a seeded random Mixtral-architecture checkpoint (Hugging Face layout)");
  ModelConfig& c = a.options.config;
  cmd->add_option("--out", a.out, "Output directory")->required();
  cmd->add_option("--seed", a.options.seed, "Random seed")->capture_default_str();
  cmd->add_option("--hidden-size", c.hidden_size, "hidden_size")->capture_default_str();
  cmd->add_option("--intermediate-size", c.intermediate_size, "intermediate_size (per expert)")
      ->capture_default_str();
  cmd->add_option("--layers", c.num_hidden_layers, "num_hidden_layers")->capture_default_str();
  cmd->add_option("--heads", c.num_attention_heads, "num_attention_heads")->capture_default_str();
  cmd->add_option("--kv-heads", c.num_key_value_heads, "num_key_value_heads")
      ->capture_default_str();
  cmd->add_option("--head-dim", c.head_dim, "head_dim")->capture_default_str();
  cmd->add_option("--experts", c.num_local_experts, "num_local_experts")->capture_default_str();
  cmd->add_option("--experts-per-token", c.num_experts_per_tok, "num_experts_per_tok")
      ->capture_default_str();
  cmd->add_option("--vocab-size", c.vocab_size, "Tokenizer and vocabulary size")
      ->capture_default_str();
  cmd->add_option("--tokenizer", a.options.tokenizer_model,
                  "A sentencepiece tokenizer.model to copy (its piece count must equal "
                  "--vocab-size) instead of training one");
  cmd->add_option("--sliding-window", c.sliding_window, "Attention window in tokens (0 = none)")
      ->capture_default_str();
  cmd->add_option("--max-position", c.max_position_embeddings, "max_position_embeddings")
      ->capture_default_str();
  cmd->add_option("--rope-theta", c.rope_theta, "rope_theta")->capture_default_str();
  cmd->add_flag("--tie-embeddings", c.tie_word_embeddings, "Share embed_tokens with lm_head");
  cmd->add_option("--dtype", a.dtype, "Stored dtype")
      ->check(CLI::IsMember({"bf16", "f16", "f32"}))
      ->capture_default_str();
  cmd->add_option("--shard-mib", a.shard_mib, "Largest safetensors shard in MiB")
      ->capture_default_str();
}

int run_make_tiny_model(const MakeTinyModelArgs& a) {
  TinyModelOptions options = a.options;
  options.config.torch_dtype =
      a.dtype == "f32" ? DType::kF32 : (a.dtype == "f16" ? DType::kF16 : DType::kBF16);
  SY_CHECK(a.shard_mib > 0, "--shard-mib must be positive");
  options.max_shard_bytes = static_cast<uint64_t>(a.shard_mib * (1 << 20));
  write_tiny_model(a.out, options, std::string(kTinyCorpus, kTinyCorpus_size));
  std::printf("wrote %s (seed %llu, %lld layers, hidden %lld, %lld experts, vocab %lld)\n",
              a.out.c_str(), static_cast<unsigned long long>(options.seed),
              static_cast<long long>(options.config.num_hidden_layers),
              static_cast<long long>(options.config.hidden_size),
              static_cast<long long>(options.config.num_local_experts),
              static_cast<long long>(options.config.vocab_size));
  return 0;
}

}  // namespace sy::launch
