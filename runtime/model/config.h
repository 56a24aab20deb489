// ModelConfig: the Mixtral fields of a Hugging Face `config.json`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/tensor.h"
#include "parallel/layout.h"

namespace sy {

struct ModelConfig {
  int64_t hidden_size = 0;              // dim: width of the residual stream
  int64_t intermediate_size = 0;        // hidden_dim: width of each expert's SwiGLU
  int64_t num_hidden_layers = 0;        // decoder layers
  int64_t num_attention_heads = 0;      // query heads
  int64_t num_key_value_heads = 0;      // key/value heads (GQA); divides num_attention_heads
  int64_t head_dim = 0;                 // per-head width; hidden_size / heads when absent
  int64_t num_local_experts = 0;        // experts per MoE block
  int64_t num_experts_per_tok = 0;      // top-k of the router
  double rms_norm_eps = 1e-5;           // RMSNorm epsilon
  double rope_theta = 1e6;              // RoPE base
  int64_t sliding_window = 0;           // attention window in tokens; 0 = none (json null)
  int64_t max_position_embeddings = 0;  // context limit in tokens
  int64_t vocab_size = 0;               // rows of embed_tokens and lm_head
  bool tie_word_embeddings = false;     // lm_head shares embed_tokens
  DType torch_dtype = DType::kBF16;     // dtype the checkpoint was saved in
  int64_t bos_token_id = 1;             // beginning of sequence; -1 when null
  std::vector<int64_t> eos_token_ids;   // end of sequence ids (an int or a list in json)

  // Parses `config.json` text; `source` names the file in errors.
  static ModelConfig from_json(const std::string& text, const std::string& source);
  // model_dir/config.json, or the metadata of a GGUF file (gguf_model.h) when it names one.
  static ModelConfig load(const std::string& model_dir);
  // The shapes of a published model by name (mixtral-8x7b, mixtral-8x22b), or a config.json path.
  static ModelConfig preset(const std::string& name_or_path);
  std::string to_json() const;
  // Throws sy::Error naming the first offending field and its value.
  void validate() const;
  // Rows of the config as "name value" pairs, for the start-up table.
  std::vector<std::pair<std::string, std::string>> table() const;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  // The shapes a rank layout splits (parallel/layout.h).
  LayoutShape layout_shape() const {
    return {num_attention_heads, num_key_value_heads, num_local_experts, vocab_size};
  }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
};

}  // namespace sy
