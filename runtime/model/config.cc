// Parsing and validation of ModelConfig (see config.h).
#include "runtime/model/config.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "runtime/model/gguf_model.h"

namespace sy {
namespace {

using json = nlohmann::json;

int64_t get_int(const json& j, const char* key, const std::string& source, bool required,
                int64_t fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    SY_CHECK(!required, source, ": missing field \"", key, "\"");
    return fallback;
  }
  SY_CHECK(it->is_number_integer(), source, ": field \"", key, "\" must be an integer, got ",
           it->dump());
  return it->get<int64_t>();
}

double get_double(const json& j, const char* key, const std::string& source, double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  SY_CHECK(it->is_number(), source, ": field \"", key, "\" must be a number, got ", it->dump());
  return it->get<double>();
}

DType parse_dtype(const std::string& name, const std::string& source) {
  if (name == "bfloat16") return DType::kBF16;
  if (name == "float16") return DType::kF16;
  if (name == "float32") return DType::kF32;
  SY_FAIL(source, ": field \"torch_dtype\" has unsupported value \"", name,
          "\" (bfloat16, float16 or float32)");
}

const char* dtype_json_name(DType d) {
  switch (d) {
    case DType::kBF16:
      return "bfloat16";
    case DType::kF16:
      return "float16";
    default:
      return "float32";
  }
}

}  // namespace

ModelConfig ModelConfig::from_json(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    SY_FAIL(source, ": malformed JSON: ", e.what());
  }
  SY_CHECK(j.is_object(), source, ": expected a JSON object");
  if (auto it = j.find("model_type"); it != j.end() && it->is_string()) {
    SY_CHECK(*it == "mixtral" || *it == "mistral", source, ": model_type \"",
             it->get<std::string>(), "\" is not a Mixtral-architecture model");
  }
  ModelConfig c;
  c.hidden_size = get_int(j, "hidden_size", source, true, 0);
  c.intermediate_size = get_int(j, "intermediate_size", source, true, 0);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", source, true, 0);
  c.num_attention_heads = get_int(j, "num_attention_heads", source, true, 0);
  c.num_key_value_heads = get_int(j, "num_key_value_heads", source, false, c.num_attention_heads);
  int64_t heads = c.num_attention_heads > 0 ? c.num_attention_heads : 1;
  c.head_dim = get_int(j, "head_dim", source, false, c.hidden_size / heads);
  c.num_local_experts = get_int(j, "num_local_experts", source, true, 0);
  c.num_experts_per_tok = get_int(j, "num_experts_per_tok", source, true, 0);
  c.rms_norm_eps = get_double(j, "rms_norm_eps", source, 1e-5);
  // rope_theta: top level (Mixtral checkpoints), or inside transformers 5's rope_parameters.
  c.rope_theta = get_double(j, "rope_theta", source, 0);
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) {
    const std::string type = it->value("rope_type", std::string("default"));
    SY_CHECK(type == "default", source, ": rope_parameters.rope_type \"", type,
             "\" is not supported (only default RoPE)");
    if (c.rope_theta == 0)
      c.rope_theta = get_double(*it, "rope_theta", source + " rope_parameters", 0);
  }
  SY_CHECK(c.rope_theta != 0, source, ": missing field \"rope_theta\"");
  c.sliding_window = get_int(j, "sliding_window", source, false, 0);
  c.max_position_embeddings = get_int(j, "max_position_embeddings", source, false, 32768);
  c.vocab_size = get_int(j, "vocab_size", source, true, 0);
  if (auto it = j.find("tie_word_embeddings"); it != j.end() && !it->is_null()) {
    SY_CHECK(it->is_boolean(), source, ": field \"tie_word_embeddings\" must be a boolean");
    c.tie_word_embeddings = it->get<bool>();
  }
  if (auto it = j.find("torch_dtype"); it != j.end() && it->is_string()) {
    c.torch_dtype = parse_dtype(it->get<std::string>(), source);
  } else if (auto it2 = j.find("dtype"); it2 != j.end() && it2->is_string()) {
    c.torch_dtype = parse_dtype(it2->get<std::string>(), source);
  }
  c.bos_token_id = get_int(j, "bos_token_id", source, false, -1);
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    if (it->is_array()) {
      for (const auto& v : *it) {
        SY_CHECK(v.is_number_integer(), source, ": eos_token_id entries must be integers");
        c.eos_token_ids.push_back(v.get<int64_t>());
      }
    } else {
      SY_CHECK(it->is_number_integer(), source, ": field \"eos_token_id\" must be an integer");
      c.eos_token_ids.push_back(it->get<int64_t>());
    }
  }
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    SY_FAIL(source, ": rope_scaling ", it->dump(), " is not supported");
  }
  c.validate();
  return c;
}

ModelConfig ModelConfig::load(const std::string& model_dir) {
  if (is_gguf_path(model_dir)) return config_from_gguf(GgufModelFiles::open(model_dir));
  std::string path = model_dir + "/config.json";
  std::ifstream in(path);
  SY_CHECK(in.good(), "cannot open ", path);
  std::stringstream text;
  text << in.rdbuf();
  return from_json(text.str(), path);
}

ModelConfig ModelConfig::preset(const std::string& name) {
  ModelConfig c;
  c.num_local_experts = 8;
  c.num_experts_per_tok = 2;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.rope_theta = 1e6;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  if (name == "mixtral-8x7b") {  // Mixtral-8x7B-v0.1
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.num_hidden_layers = 32;
    c.num_attention_heads = 32;
    c.max_position_embeddings = 32768;
    c.vocab_size = 32000;
  } else if (name == "mixtral-8x22b") {  // Mixtral-8x22B-v0.1
    c.hidden_size = 6144;
    c.intermediate_size = 16384;
    c.num_hidden_layers = 56;
    c.num_attention_heads = 48;
    c.max_position_embeddings = 65536;
    c.vocab_size = 32768;
  } else {
    std::ifstream in(name);
    SY_CHECK(in.good(), "--synthetic \"", name,
             "\" is neither mixtral-8x7b, mixtral-8x22b nor a readable config.json");
    std::stringstream text;
    text << in.rdbuf();
    return from_json(text.str(), name);
  }
  c.validate();
  return c;
}

void ModelConfig::validate() const {
  auto positive = [](const char* name, int64_t v) {
    SY_CHECK(v > 0, "config: ", name, " must be positive, got ", v);
  };
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("num_key_value_heads", num_key_value_heads);
  positive("head_dim", head_dim);
  positive("num_local_experts", num_local_experts);
  positive("num_experts_per_tok", num_experts_per_tok);
  positive("max_position_embeddings", max_position_embeddings);
  positive("vocab_size", vocab_size);
  // Bounds keep every derived size (products of these) far from int64 overflow.
  SY_CHECK(hidden_size <= (1 << 20), "config: hidden_size ", hidden_size, " is too large");
  SY_CHECK(intermediate_size <= (1 << 22), "config: intermediate_size ", intermediate_size,
           " is too large");
  SY_CHECK(num_hidden_layers <= 4096, "config: num_hidden_layers ", num_hidden_layers,
           " is too large");
  SY_CHECK(num_attention_heads <= 4096 && head_dim <= 4096, "config: num_attention_heads ",
           num_attention_heads, " x head_dim ", head_dim, " is too large");
  SY_CHECK(num_attention_heads % num_key_value_heads == 0, "config: num_key_value_heads ",
           num_key_value_heads, " does not divide num_attention_heads ", num_attention_heads);
  SY_CHECK(head_dim % 2 == 0, "config: head_dim ", head_dim, " must be even for RoPE");
  SY_CHECK(num_local_experts <= 1024, "config: num_local_experts ", num_local_experts,
           " is too large");
  SY_CHECK(num_experts_per_tok <= num_local_experts, "config: num_experts_per_tok ",
           num_experts_per_tok, " exceeds num_local_experts ", num_local_experts);
  SY_CHECK(vocab_size <= (1 << 24), "config: vocab_size ", vocab_size, " is too large");
  SY_CHECK(max_position_embeddings <= (1 << 24), "config: max_position_embeddings ",
           max_position_embeddings, " is too large");
  SY_CHECK(sliding_window >= 0, "config: sliding_window must be null or positive, got ",
           sliding_window);
  SY_CHECK(rms_norm_eps > 0 && rms_norm_eps < 1, "config: rms_norm_eps ", rms_norm_eps,
           " out of range (0, 1)");
  SY_CHECK(rope_theta > 1, "config: rope_theta ", rope_theta, " must be > 1");
  SY_CHECK(bos_token_id < vocab_size, "config: bos_token_id ", bos_token_id,
           " outside the vocabulary of ", vocab_size);
  for (int64_t e : eos_token_ids)
    SY_CHECK(e >= 0 && e < vocab_size, "config: eos_token_id ", e, " outside the vocabulary of ",
             vocab_size);
}

std::string ModelConfig::to_json() const {
  json j;
  j["architectures"] = {"MixtralForCausalLM"};
  j["model_type"] = "mixtral";
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["num_local_experts"] = num_local_experts;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  j["sliding_window"] = sliding_window > 0 ? json(sliding_window) : json(nullptr);
  j["max_position_embeddings"] = max_position_embeddings;
  j["vocab_size"] = vocab_size;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["torch_dtype"] = dtype_json_name(torch_dtype);
  j["bos_token_id"] = bos_token_id >= 0 ? json(bos_token_id) : json(nullptr);
  if (eos_token_ids.size() == 1)
    j["eos_token_id"] = eos_token_ids[0];
  else
    j["eos_token_id"] = eos_token_ids;
  j["hidden_act"] = "silu";
  j["attention_dropout"] = 0.0;
  j["initializer_range"] = 0.02;
  j["output_router_logits"] = false;
  j["router_aux_loss_coef"] = 0.02;
  j["use_cache"] = true;
  return j.dump(2) + "\n";
}

std::vector<std::pair<std::string, std::string>> ModelConfig::table() const {
  auto s = [](auto v) {
    std::ostringstream o;
    o << v;
    return o.str();
  };
  return {{"hidden_size", s(hidden_size)},
          {"intermediate_size", s(intermediate_size)},
          {"num_hidden_layers", s(num_hidden_layers)},
          {"num_attention_heads", s(num_attention_heads)},
          {"num_key_value_heads", s(num_key_value_heads)},
          {"head_dim", s(head_dim)},
          {"num_local_experts", s(num_local_experts)},
          {"num_experts_per_tok", s(num_experts_per_tok)},
          {"sliding_window", sliding_window > 0 ? s(sliding_window) : "none"},
          {"max_position_embeddings", s(max_position_embeddings)},
          {"vocab_size", s(vocab_size)},
          {"rope_theta", s(rope_theta)},
          {"torch_dtype", dtype_json_name(torch_dtype)}};
}

}  // namespace sy
