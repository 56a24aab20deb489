// The serving engine on a given backend against generate() on the CPU, request by request.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "runtime/engine.h"
#include "runtime/generator.h"
#include "tests/common/collector.h"

namespace sy::test {

// Serves 12 requests of the window_gqa4 fixture on `ops` through the engine, on a thread of its
// own, all submitted at once (continuous batching over a small paged cache): prompts of 1 to 30
// tokens, greedy and seeded sampling mixed, one request with logprobs. Each must get the tokens
// generate() gives it alone on the CPU.
inline void expect_engine_matches_each_request_alone(Ops& ops) {
  const std::string dir = std::string(SY_FIXTURES_DIR) + "/window_gqa4";
  const ModelConfig config = ModelConfig::load(dir);
  Checkpoint ckpt = Checkpoint::open(dir);
  Weights w = Weights::load(ckpt, config, WeightShard::full(config), ops, false);
  ModelLimits limits;
  limits.block_size = 4;
  limits.max_blocks_per_seq = 32;
  limits.n_blocks = 512;
  limits.max_tokens = 64;
  limits.max_seqs = 16;
  limits.max_logit_rows = 16;
  Model model(config, std::move(w), ops, limits);
  auto tokenizer = Tokenizer::load(dir, config.bos_token_id, config.eos_token_ids);
  EngineOptions options;
  options.max_batch_tokens = 24;
  options.max_running = 16;
  Engine engine(model, *tokenizer, options, nullptr);
  std::thread loop([&] { engine.run(); });
  LoadedModel plain = load_model(dir, 128, 64, false);
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
    if (i == 5) p.logprobs = 2;  // its steps sample on the host
    reqs.push_back(p);
    sinks.push_back(std::make_shared<Collector>());
    engine.submit(p, sinks.back());
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    sinks[i]->wait();
    GenerateOptions o;
    o.max_tokens = reqs[i].max_tokens;
    o.ignore_eos = true;
    o.sampling = reqs[i].sampling;
    EXPECT_EQ(sinks[i]->tokens, generate(*plain.model, reqs[i].prompt, o).tokens)
        << "request " << i;
  }
  engine.drain();
  loop.join();
}

}  // namespace sy::test
