// ModelConfig parsing and validation: every Mixtral field, and a clear error for each bad value;
// the rank layout's checks against a model's shapes.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "parallel/layout.h"
#include "runtime/model/config.h"

namespace sy {
namespace {

const char* kMixtral8x7b = R"({
  "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
  "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
  "num_experts_per_tok": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
  "sliding_window": null, "max_position_embeddings": 32768, "vocab_size": 32000,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2
})";

TEST(ModelConfig, ParsesMixtral8x7b) {
  ModelConfig c = ModelConfig::from_json(kMixtral8x7b, "config.json");
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 128);  // derived when absent
  EXPECT_EQ(c.num_local_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.torch_dtype, DType::kBF16);
  EXPECT_EQ(c.bos_token_id, 1);
  ASSERT_EQ(c.eos_token_ids.size(), 1u);
  EXPECT_EQ(c.eos_token_ids[0], 2);
}

TEST(ModelConfig, ExplicitHeadDimWindowAndEosList) {
  auto j = nlohmann::json::parse(kMixtral8x7b);
  j["head_dim"] = 96;
  j["sliding_window"] = 4096;
  j["eos_token_id"] = {2, 7};
  j["tie_word_embeddings"] = true;
  j["torch_dtype"] = "float16";
  ModelConfig c = ModelConfig::from_json(j.dump(), "config.json");
  EXPECT_EQ(c.head_dim, 96);
  EXPECT_EQ(c.q_dim(), 32 * 96);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{2, 7}));
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.torch_dtype, DType::kF16);
  // Round trip through to_json.
  ModelConfig d = ModelConfig::from_json(c.to_json(), "again");
  EXPECT_EQ(d.head_dim, 96);
  EXPECT_EQ(d.sliding_window, 4096);
  EXPECT_EQ(d.eos_token_ids, c.eos_token_ids);
}

TEST(ModelConfig, RopeParametersOfTransformers5) {
  auto j = nlohmann::json::parse(kMixtral8x7b);
  j.erase("rope_theta");
  j.erase("torch_dtype");
  j["dtype"] = "float32";
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 10000.0}};
  ModelConfig c = ModelConfig::from_json(j.dump(), "config.json");
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.torch_dtype, DType::kF32);
  j["rope_parameters"]["rope_type"] = "yarn";
  EXPECT_THROW(ModelConfig::from_json(j.dump(), "config.json"), Error);
  j.erase("rope_parameters");
  try {
    ModelConfig::from_json(j.dump(), "config.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing field \"rope_theta\""), std::string::npos);
  }
}

// Each case: a modification and a fragment the error must contain.
struct BadCase {
  const char* field;
  nlohmann::json value;
  const char* message;
};

TEST(ModelConfig, BadValuesNameTheField) {
  const BadCase cases[] = {
      {"hidden_size", 0, "hidden_size must be positive, got 0"},
      {"hidden_size", "big", "\"hidden_size\" must be an integer"},
      {"num_hidden_layers", -3, "num_hidden_layers must be positive, got -3"},
      {"num_key_value_heads", 5, "num_key_value_heads 5 does not divide num_attention_heads 32"},
      {"num_experts_per_tok", 9, "num_experts_per_tok 9 exceeds num_local_experts 8"},
      {"sliding_window", -1, "sliding_window must be null or positive, got -1"},
      {"rms_norm_eps", 0, "rms_norm_eps 0 out of range"},
      {"torch_dtype", "int8", "torch_dtype\" has unsupported value \"int8\""},
      {"eos_token_id", 32000, "eos_token_id 32000 outside the vocabulary of 32000"},
      {"head_dim", 7, "head_dim 7 must be even"},
      {"vocab_size", nullptr, "missing field \"vocab_size\""},
      {"model_type", "llama", "model_type \"llama\" is not a Mixtral-architecture model"},
      {"rope_scaling", {{"type", "linear"}}, "rope_scaling"},
  };
  for (const BadCase& bad : cases) {
    auto j = nlohmann::json::parse(kMixtral8x7b);
    if (bad.value.is_null())
      j.erase(bad.field);
    else
      j[bad.field] = bad.value;
    try {
      ModelConfig::from_json(j.dump(), "m/config.json");
      ADD_FAILURE() << "accepted bad " << bad.field;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(bad.message), std::string::npos)
          << "field " << bad.field << ": " << e.what();
    }
  }
}

TEST(ModelConfig, MalformedJsonNamesTheFile) {
  try {
    ModelConfig::from_json("{\"hidden_size\": 4", "some/dir/config.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("some/dir/config.json: malformed JSON"),
              std::string::npos);
  }
  EXPECT_THROW(ModelConfig::load("/nonexistent/model"), Error);
}

// The rank layout's exchange choice per step, and its bad values named.
TEST(ParallelConfig, AutoExchangeByRoutedRowsAndBadLayouts) {
  const ModelConfig c = ModelConfig::from_json(kMixtral8x7b, "m/config.json");
  ParallelConfig pc;
  pc.world = 8;
  pc.validate(c.layout_shape());
  EXPECT_EQ(pc.step_exchange(2), MoeExchange::kAllGather);    // decode, batch 1
  EXPECT_EQ(pc.step_exchange(256), MoeExchange::kAllGather);  // decode, batch 128
  EXPECT_EQ(pc.step_exchange(258), MoeExchange::kAllToAll);
  pc.auto_max_routed_rows = 0;
  EXPECT_EQ(pc.step_exchange(2), MoeExchange::kAllToAll);
  pc.exchange = MoeExchange::kAllGather;
  EXPECT_EQ(pc.step_exchange(100000), MoeExchange::kAllGather);
  EXPECT_EQ(parse_moe_exchange("all-to-all"), MoeExchange::kAllToAll);
  EXPECT_STREQ(moe_exchange_name(MoeExchange::kAuto), "auto");

  const auto expect_error = [&](ParallelConfig bad, const std::string& message) {
    try {
      bad.validate(c.layout_shape());
      ADD_FAILURE() << "accepted a layout that should fail with " << message;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << e.what();
    }
  };
  ParallelConfig bad = pc;
  bad.auto_max_routed_rows = -1;
  expect_error(bad, "auto exchange limit of -1 routed rows is negative");
  bad = pc;
  bad.tp = 3;
  expect_error(bad, "--tp 3 must divide the world size 8");
  bad = pc;
  bad.world = 16;
  bad.ep = 16;
  expect_error(bad, "--ep 16 exceeds the 8 experts");
  try {
    parse_moe_exchange("ring");
    ADD_FAILURE() << "accepted --moe-exchange ring";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("\"ring\" is not all-to-all"), std::string::npos);
  }
}

}  // namespace
}  // namespace sy
