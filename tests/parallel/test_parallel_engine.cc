// The engine across ranks: rank 0 schedules and samples, the others execute broadcast step
// plans. Concurrent requests give the tokens each gets alone on one rank, for several layouts,
// also when they start from blocks in the prefix cache; idle ranks sleep instead of spinning.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <cstdio>

#include <thread>

#include "parallel/context.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/generator.h"
#include "runtime/model/loader.h"
#include "tests/common/collector.h"

namespace sy {
namespace {

const std::string kModel = std::string(SY_FIXTURES_DIR) + "/window_gqa4";

using test::Collector;

double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// Runs `n` mixed requests through a served model of layout `pc`; returns wrong requests on rank 0.
int64_t serve_and_check(Communicator& world, const ParallelConfig& pc, int n, bool idle_check) {
  const ModelConfig config = ModelConfig::load(kModel);
  auto par = ParallelContext::create(pc, world);
  auto ops = make_cpu_ops();
  auto ckpt = open_weight_source(kModel);
  Weights w = Weights::load(*ckpt, config, shard_for(config, par.get()), *ops, false);
  ModelLimits limits;
  limits.block_size = 4;
  limits.max_blocks_per_seq = 32;
  limits.n_blocks = 40;  // small: some requests are preempted
  limits.max_tokens = 32;
  limits.max_seqs = 8;
  limits.max_logit_rows = 8;
  Model model(config, std::move(w), *ops, limits, par.get());
  if (world.rank() != 0) {
    const double before = cpu_seconds();
    Engine::run_worker(model, world);
    // With idle_check, rank 0 submits nothing for 1.5 s: a spinning worker would burn ~1.5 s.
    if (idle_check) {
      EXPECT_LT(cpu_seconds() - before, 0.3) << "an idle worker kept a core busy";
    }
    return 0;
  }
  auto tokenizer = Tokenizer::load(kModel, config.bos_token_id, config.eos_token_ids);
  EngineOptions options;
  options.max_batch_tokens = 32;
  options.max_running = 8;
  Engine engine(model, *tokenizer, options, &world);
  std::thread loop([&] { engine.run(); });
  if (idle_check) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    engine.drain();
    loop.join();
    return 0;
  }
  LoadedModel single = load_model(kModel, 128, 64, false);
  int64_t n_wrong = 0, second_round_cached = 0;
  for (int round = 0; round < 2; ++round) {
    std::vector<std::shared_ptr<Collector>> sinks;
    std::vector<RequestParams> reqs;
    // The second round goes newest first: the blocks the first round released last are the
    // ones still cached.
    for (int k = 0; k < n; ++k) {
      const int i = round == 0 ? k : n - 1 - k;
      RequestParams p;
      p.prompt = {1};
      for (int j = 1; j < 1 + (i * 11 + round) % 40; ++j)
        p.prompt.push_back(3 + (i * 37 + j * 13) % 380);
      p.max_tokens = 1 + (i * 7) % 25;
      p.ignore_eos = true;
      reqs.push_back(p);
      sinks.push_back(std::make_shared<Collector>());
      engine.submit(p, sinks.back());
    }
    for (int i = 0; i < n; ++i) {
      sinks[i]->wait();
      GenerateOptions o;
      o.max_tokens = reqs[i].max_tokens;
      o.ignore_eos = true;
      if (sinks[i]->tokens != generate(*single.model, reqs[i].prompt, o).tokens) ++n_wrong;
      if (round == 1) second_round_cached += sinks[i]->usage.cached_prompt_tokens;
    }
  }
  EXPECT_EQ(engine.stats().kv_blocks_used, 0);
  // The second round's prompts extend the first's by one token: their whole blocks, where
  // still cached, come from the prefix cache on every rank. (A request's usage counts what it
  // found at its first admission, not what a preempted request finds of its own blocks again.)
  std::printf("second round: %lld prompt tokens from the cache\n", (long long)second_round_cached);
  EXPECT_GT(second_round_cached, 0);
  engine.drain();
  loop.join();
  return n_wrong;
}

TEST(ParallelEngine, ConcurrentRequestsMatchSingleRankAlone) {
  auto world = make_mpi_world_communicator();
  const int W = world->size();
  int64_t n_wrong = 0;
  for (int tp : {1, 2}) {
    if (W % tp) continue;
    for (MoeExchange ex : {MoeExchange::kAllToAll, MoeExchange::kAllGather}) {
      ParallelConfig pc;
      pc.world = W;
      pc.rank = world->rank();
      pc.tp = tp;
      pc.exchange = ex;
      n_wrong += serve_and_check(*world, pc, 16, false);
    }
  }
  EXPECT_EQ(n_wrong, 0);
}

TEST(ParallelEngine, IdleRanksDoNotSpin) {
  auto world = make_mpi_world_communicator();
  ParallelConfig pc;
  pc.world = world->size();
  pc.rank = world->rank();
  serve_and_check(*world, pc, 0, true);
}

}  // namespace
}  // namespace sy
