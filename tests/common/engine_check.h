// The serving engine on a given backend against generate() on the CPU, request by request.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "runtime/engine/engine.h"
#include "runtime/engine/generator.h"
#include "runtime/model/loader.h"
#include "tests/common/collector.h"

namespace sy::test {

// Serves 12 requests of the window_gqa4 fixture on `ops` through the engine, on a thread of its
// own, all submitted at once (continuous batching over a paged cache): prompts of 1 to 30
// tokens, greedy and seeded sampling mixed, one request with logprobs, one with prompt logprobs
// (the same within 1e-4 as a CPU engine's alone, as the logprobs), three with penalties, one
// with logit biases, one whose end-of-sequence token is forced by a bias but held back by
// min_tokens, then a next turn of one of them, which starts from the prefix cache. Each must get
// the tokens generate() gives it alone on the CPU, and the logprobs request the top-3
// log-probabilities a CPU engine gives it alone. Then long requests in a small cache, whose
// blocks are reused as they leave the attention window.
inline void expect_engine_matches_each_request_alone(Ops& ops) {
  const std::string dir = std::string(SY_FIXTURES_DIR) + "/window_gqa4";
  const ModelConfig config = ModelConfig::load(dir);
  auto ckpt = open_weight_source(dir);
  Weights w = Weights::load(*ckpt, config, WeightShard::full(config), ops, false);
  ModelLimits limits;
  limits.block_size = 4;
  limits.max_blocks_per_seq = 32;
  limits.n_blocks = 512;
  limits.max_tokens = 64;
  limits.max_seqs = 16;
  limits.max_logit_rows = 24;  // 8 rows a step for prompt logprobs
  Model model(config, std::move(w), ops, limits);
  auto tokenizer = Tokenizer::load(dir, config.bos_token_id, config.eos_token_ids);
  EngineOptions options;
  options.max_batch_tokens = 24;
  options.max_running = 16;
  Engine engine(model, *tokenizer, options, nullptr);
  std::thread loop([&] { engine.run(); });
  LoadedModel plain = load_model(dir, 128, 64, false);
  auto alone_on_cpu = [&](const RequestParams& p) {
    GenerateOptions o;
    o.max_tokens = p.max_tokens;
    o.ignore_eos = p.ignore_eos;
    o.eos_ids = config.eos_token_ids;
    o.sampling = p.sampling;
    return generate(*plain.model, p.prompt, o).tokens;
  };
  std::vector<std::shared_ptr<Collector>> sinks;
  std::vector<RequestParams> reqs;
  for (int i = 0; i < 12; ++i) {
    RequestParams p;
    p.prompt = {1};
    for (int j = 1; j < 1 + (i * 7) % 30; ++j) p.prompt.push_back(3 + (i * 131 + j * 17) % 380);
    p.max_tokens = 4 + i % 9;
    p.ignore_eos = true;
    if (i % 2) {
      p.sampling.temperature = 0.8f;
      p.sampling.top_k = 30;
      p.sampling.top_p = 0.95f;
      p.sampling.seed = static_cast<uint64_t>(100 + i);
    }
    if (i == 5) p.logprobs = 3;         // sampled, and its logit rows come back for the logprobs
    if (i == 3) p.prompt_logprobs = 2;  // 21 prompt rows, over three steps of 8 rows
    // Penalties, sampled and greedy: on GPUs Ops::penalize on the device. Request 7 a
    // repetition penalty (sampled), 8 all three (greedy), 9 presence and frequency alone (sampled).
    if (i == 7) p.sampling.repetition_penalty = 1.3f;
    if (i == 8) {
      p.sampling.repetition_penalty = 1.2f;
      p.sampling.presence_penalty = 0.6f;
      p.sampling.frequency_penalty = 0.3f;
    }
    if (i == 9) {
      p.sampling.presence_penalty = -0.4f;
      p.sampling.frequency_penalty = 1.1f;
    }
    // Logit biases (on GPUs Ops::bias on the device): request 10 (greedy) pushes token 50 up and
    // bans token 51; request 11 (sampled) forces the end-of-sequence token, which min_tokens 3
    // holds back for three tokens: it ends with the fourth.
    if (i == 10) p.sampling.logit_bias = {{50, 6.f}, {51, -100.f}};
    if (i == 11) {
      p.ignore_eos = false;
      p.sampling.min_tokens = 3;
      p.sampling.logit_bias = {{static_cast<int32_t>(config.eos_token_ids.at(0)), 100.f}};
    }
    reqs.push_back(p);
    sinks.push_back(std::make_shared<Collector>());
    engine.submit(p, sinks.back());
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    sinks[i]->wait();
    EXPECT_EQ(sinks[i]->tokens, alone_on_cpu(reqs[i])) << "request " << i;
  }
  RequestParams unbiased = reqs[10];
  unbiased.sampling.logit_bias.clear();
  EXPECT_NE(sinks[10]->tokens, alone_on_cpu(unbiased)) << "the biases change request 10";
  ASSERT_EQ(sinks[11]->tokens.size(), 4u);
  EXPECT_EQ(sinks[11]->tokens.back(), config.eos_token_ids.at(0));
  EXPECT_EQ(sinks[11]->finish, FinishReason::kStop);
  // A next turn of request 4 (greedy): its prompt, its answer and more. Its leading whole
  // blocks come from the prefix cache, and the tokens are those of computing everything.
  RequestParams turn = reqs[4];
  turn.prompt.insert(turn.prompt.end(), sinks[4]->tokens.begin(), sinks[4]->tokens.end());
  turn.prompt.insert(turn.prompt.end(), {5, 6, 7});
  auto turn_sink = std::make_shared<Collector>();
  engine.submit(turn, turn_sink);
  turn_sink->wait();
  EXPECT_GE(turn_sink->usage.cached_prompt_tokens, 20);
  EXPECT_EQ(turn_sink->tokens, alone_on_cpu(turn));
  engine.drain();
  loop.join();

  // The logprobs request alone through an engine on the CPU: the same tokens and, per token,
  // the same top ids and log-probabilities within 1e-4 (backends of fp32 storage).
  LoadedModel ref_model = load_model(dir, config, limits, false);
  Engine ref(*ref_model.model, *tokenizer, options, nullptr);
  std::thread ref_loop([&] { ref.run(); });
  auto alone = std::make_shared<Collector>();
  ref.submit(reqs[5], alone);
  alone->wait();
  auto alone_prompt = std::make_shared<Collector>();
  ref.submit(reqs[3], alone_prompt);
  alone_prompt->wait();
  ref.drain();
  ref_loop.join();
  ASSERT_EQ(sinks[3]->prompt_logprobs.size(), reqs[3].prompt.size() - 1);
  ASSERT_EQ(alone_prompt->prompt_logprobs.size(), reqs[3].prompt.size() - 1);
  for (size_t t = 0; t < alone_prompt->prompt_logprobs.size(); ++t) {
    const TokenLogprobs &a = sinks[3]->prompt_logprobs[t], &b = alone_prompt->prompt_logprobs[t];
    EXPECT_EQ(a.token_id, reqs[3].prompt[t + 1]);
    EXPECT_EQ(a.token_id, b.token_id);
    EXPECT_NEAR(a.logprob, b.logprob, 1e-4) << "prompt token " << t + 1;
    ASSERT_EQ(a.top.size(), 2u);
    ASSERT_EQ(b.top.size(), 2u);
    for (size_t j = 0; j < 2; ++j) {
      EXPECT_EQ(a.top[j].token_id, b.top[j].token_id) << "prompt token " << t + 1 << " top " << j;
      EXPECT_NEAR(a.top[j].logprob, b.top[j].logprob, 1e-4) << "prompt token " << t + 1;
    }
  }
  const Collector& got = *sinks[5];
  ASSERT_EQ(got.logprobs.size(), got.tokens.size());
  ASSERT_EQ(alone->logprobs.size(), got.logprobs.size());
  for (size_t t = 0; t < got.logprobs.size(); ++t) {
    const TokenLogprobs &a = got.logprobs[t], &b = alone->logprobs[t];
    EXPECT_EQ(a.token_id, got.tokens[t]);
    EXPECT_EQ(a.token_id, b.token_id);
    EXPECT_NEAR(a.logprob, b.logprob, 1e-4) << "token " << t;
    ASSERT_EQ(a.top.size(), 3u);
    ASSERT_EQ(b.top.size(), 3u);
    for (size_t j = 0; j < 3; ++j) {
      EXPECT_EQ(a.top[j].token_id, b.top[j].token_id) << "token " << t << " top " << j;
      EXPECT_NEAR(a.top[j].logprob, b.top[j].logprob, 1e-4) << "token " << t << " top " << j;
    }
  }

  // A cache of 24 blocks and three greedy requests of 80 tokens (20 blocks each): the blocks
  // that leave the 16-token window go back and are reused by the others at once, so a kernel
  // that still read them would change the tokens; none is preempted.
  limits.n_blocks = 24;
  Model small(config, Weights::load(*ckpt, config, WeightShard::full(config), ops, false), ops,
              limits);
  Engine tight(small, *tokenizer, options, nullptr);
  std::thread tight_loop([&] { tight.run(); });
  std::vector<std::shared_ptr<Collector>> long_sinks;
  std::vector<RequestParams> long_reqs;
  for (int i = 0; i < 3; ++i) {
    RequestParams p;
    p.prompt = {1};
    for (int j = 1; j < 30; ++j) p.prompt.push_back(3 + (i * 71 + j * 29) % 380);
    p.max_tokens = 50;
    p.ignore_eos = true;
    long_reqs.push_back(p);
    long_sinks.push_back(std::make_shared<Collector>());
    tight.submit(p, long_sinks.back());
  }
  for (size_t i = 0; i < long_reqs.size(); ++i) {
    long_sinks[i]->wait();
    EXPECT_EQ(long_sinks[i]->tokens, alone_on_cpu(long_reqs[i])) << "long request " << i;
    EXPECT_EQ(long_sinks[i]->usage.preemptions, 0) << "long request " << i;
  }
  tight.drain();
  tight_loop.join();
}

}  // namespace sy::test
