// The serving engine on one rank: continuous batching gives each request exactly the tokens it
// gets alone, also when the KV cache is too small and requests are preempted and recomputed;
// validation, admission, cancellation, deadlines, stop strings and ids, logprobs, draining.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <map>
#include <thread>

#include "kernels/cpu/ops.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/generator.h"
#include "runtime/model/loader.h"
#include "tests/common/collector.h"

namespace sy {
namespace {

const std::string kModel = std::string(SY_FIXTURES_DIR) + "/window_gqa4";  // a 16-token window
const std::string kNoWindow = std::string(SY_FIXTURES_DIR) + "/sharded_bf16_tied";

using test::Collector;

struct Served {
  std::unique_ptr<Ops> ops;
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Engine> engine;
  std::thread loop;

  Served(int64_t n_blocks, EngineOptions options = {}, bool start = true,
         const std::string& path = kModel, WeightFormat format = WeightFormat::kAuto) {
    ModelConfig config = ModelConfig::load(path);
    ops = make_cpu_ops();
    auto ckpt = open_weight_source(path);
    Weights w = Weights::load(*ckpt, config, WeightShard::full(config), *ops, false, format);
    ModelLimits limits;
    limits.block_size = 4;
    limits.max_blocks_per_seq = 32;  // 128 tokens
    limits.n_blocks = n_blocks;
    limits.max_tokens = 64;
    limits.max_seqs = 16;
    limits.max_logit_rows = 16;
    model = std::make_unique<Model>(config, std::move(w), *ops, limits);
    tokenizer = Tokenizer::load(path, config.bos_token_id, config.eos_token_ids);
    options.max_batch_tokens = std::min<int64_t>(options.max_batch_tokens, 64);
    options.max_running = std::min<int64_t>(options.max_running, 16);
    engine = std::make_unique<Engine>(*model, *tokenizer, options, nullptr);
    if (start) this->start();
  }
  void start() {
    loop = std::thread([this] { engine->run(); });
  }
  ~Served() {
    engine->drain();
    if (loop.joinable()) loop.join();
  }
};

RequestParams request(std::vector<int32_t> prompt, int64_t max_tokens) {
  RequestParams p;
  p.prompt = std::move(prompt);
  p.max_tokens = max_tokens;
  p.ignore_eos = true;
  return p;
}

RequestParams with_priority(RequestParams p, int32_t priority) {
  p.priority = priority;
  return p;
}

std::vector<int32_t> prompt_of(int n, int seed) {
  std::vector<int32_t> p = {1};
  for (int i = 1; i < n; ++i) p.push_back(3 + (seed * 131 + i * 17) % 380);
  return p;
}

// What a request produces alone (the single-sequence generate path).
std::vector<int32_t> alone(const std::vector<int32_t>& prompt, int64_t max_tokens,
                           const std::string& path = kModel,
                           WeightFormat format = WeightFormat::kAuto) {
  static std::map<std::pair<std::string, WeightFormat>, LoadedModel> models;
  auto it = models.find({path, format});
  if (it == models.end())
    it = models
             .emplace(std::make_pair(path, format),
                      load_model(path, 128, 64, false, nullptr, nullptr, format))
             .first;
  LoadedModel& m = it->second;
  GenerateOptions o;
  o.max_tokens = max_tokens;
  o.ignore_eos = true;
  return generate(*m.model, prompt, o).tokens;
}

// Submits prompts[i] for lengths[i] tokens each; one sink each.
std::vector<std::shared_ptr<Collector>> submit_all(Served& s,
                                                   const std::vector<std::vector<int32_t>>& prompts,
                                                   const std::vector<int64_t>& lengths) {
  std::vector<std::shared_ptr<Collector>> sinks;
  for (size_t i = 0; i < prompts.size(); ++i) {
    sinks.push_back(std::make_shared<Collector>());
    s.engine->submit(request(prompts[i], lengths[i]), sinks.back());
  }
  return sinks;
}

// Waits for every request, which must end at its length with the tokens it gets alone.
void expect_each_alone(const std::vector<std::shared_ptr<Collector>>& sinks,
                       const std::vector<std::vector<int32_t>>& prompts,
                       const std::vector<int64_t>& lengths) {
  for (size_t i = 0; i < sinks.size(); ++i) {
    sinks[i]->wait();
    EXPECT_EQ(sinks[i]->finish, FinishReason::kLength) << "request " << i;
    EXPECT_EQ(sinks[i]->tokens, alone(prompts[i], lengths[i])) << "request " << i;
  }
}

// A Collector that runs `at_token` once (on the engine's thread) when its `trigger`-th token
// has arrived, and appends `index` to `*finished` when the request ends.
struct Watched : Collector {
  size_t trigger = 0;
  std::function<void()> at_token;
  std::vector<int>* finished = nullptr;
  int index = -1;
  void on_event(RequestEvent e) override {
    if (e.finish != FinishReason::kNone && finished != nullptr) finished->push_back(index);
    Collector::on_event(std::move(e));
    if (at_token && tokens.size() >= trigger) std::exchange(at_token, nullptr)();
  }
};

// Returns the engine's counters at the end.
EngineStats check_batched_equals_alone(int64_t n_blocks, int n_requests, bool prefix_caching = true,
                                       WeightFormat format = WeightFormat::kAuto) {
  EngineOptions options;
  options.max_batch_tokens = 24;  // forces chunked prefill
  options.prefix_caching = prefix_caching;
  Served s(n_blocks, options, true, kModel, format);
  std::vector<std::shared_ptr<Collector>> sinks;
  std::vector<std::pair<std::vector<int32_t>, int64_t>> reqs;
  for (int i = 0; i < n_requests; ++i) {
    reqs.emplace_back(prompt_of(1 + (i * 7) % 45, i), 1 + (i * 5) % 30);
    sinks.push_back(std::make_shared<Collector>());
    s.engine->submit(request(reqs.back().first, reqs.back().second), sinks.back());
  }
  int64_t preemptions = 0;
  for (int i = 0; i < n_requests; ++i) {
    sinks[i]->wait();
    EXPECT_EQ(sinks[i]->finish, FinishReason::kLength) << "request " << i;
    EXPECT_EQ(sinks[i]->tokens, alone(reqs[i].first, reqs[i].second, kModel, format))
        << "request " << i;
    preemptions += sinks[i]->usage.preemptions;
  }
  EXPECT_EQ(s.engine->stats().requests_completed, n_requests);  // preemption ends none
  EXPECT_EQ(s.engine->stats().requests_cancelled, 0);
  const EngineStats st = s.engine->stats();
  std::printf("%d requests, %lld KV blocks: %lld preemptions, %lld prompt tokens from the cache\n",
              n_requests, (long long)n_blocks, (long long)preemptions,
              (long long)st.prefix_cache_hit_tokens);
  if (n_blocks < 64) {
    EXPECT_GT(preemptions, 0);
  }
  EXPECT_EQ(st.kv_blocks_used, 0);
  return st;
}

TEST(Engine, ConcurrentRequestsMatchEachAlone) {
  check_batched_equals_alone(512, 32);
}

// Quantized weights: activations are quantized per row and every row's dot products are
// summed in the same order however many rows a step holds, so batching changes no token.
TEST(Engine, ConcurrentRequestsMatchEachAloneWithQ8_0Weights) {
  check_batched_equals_alone(512, 32, true, WeightFormat::kQ8_0);
}

// With the prefix cache, a preempted request finds its own blocks again where they were not
// reused meanwhile (no two of these prompts begin alike: every hit is such a return); without
// it, it recomputes everything.
TEST(Engine, PreemptionWhenBlocksRunOutKeepsTokensRight) {
  EXPECT_GT(check_batched_equals_alone(24, 24, true).prefix_cache_hit_tokens, 0);
  EXPECT_EQ(check_batched_equals_alone(24, 24, false).prefix_cache_hit_tokens, 0);
}

// A request whose tokens begin with whole blocks that an earlier request computed starts past
// them: it gets the tokens (and the logprobs) of computing everything, and its usage and the
// engine's counters say how many tokens came from the cache. With prefix caching off, none do.
TEST(Engine, PrefixCacheReusesWholeBlocksOfEarlierRequests) {
  for (bool caching : {true, false}) {
    SCOPED_TRACE(caching ? "prefix caching" : "no prefix caching");
    EngineOptions options;
    options.max_batch_tokens = 24;
    options.prefix_caching = caching;
    Served s(64, options);
    auto run = [&](const std::vector<int32_t>& prompt, int64_t n) {
      auto c = std::make_shared<Collector>();
      RequestParams p = request(prompt, n);
      p.logprobs = 2;
      s.engine->submit(p, c);
      c->wait();
      EXPECT_EQ(c->tokens, alone(prompt, n)) << prompt.size() << " prompt tokens";
      return c;
    };
    const std::vector<int32_t> prompt = prompt_of(30, 5);
    auto first = run(prompt, 8);
    EXPECT_EQ(first->usage.cached_prompt_tokens, 0);
    // The same prompt: its 7 whole blocks of 4 tokens short of the last token.
    auto same = run(prompt, 8);
    EXPECT_EQ(same->usage.cached_prompt_tokens, caching ? 28 : 0);
    ASSERT_EQ(same->logprobs.size(), first->logprobs.size());
    for (size_t t = 0; t < same->logprobs.size(); ++t)
      EXPECT_NEAR(same->logprobs[t].logprob, first->logprobs[t].logprob, 1e-4) << "token " << t;
    // 21 tokens in common: 5 whole blocks.
    std::vector<int32_t> fork(prompt.begin(), prompt.begin() + 21);
    fork.insert(fork.end(), {7, 8, 9});
    EXPECT_EQ(run(fork, 6)->usage.cached_prompt_tokens, caching ? 20 : 0);
    // One token changed in the second block: only the first block is the same.
    std::vector<int32_t> changed = prompt;
    changed[6] = 99;
    EXPECT_EQ(run(changed, 4)->usage.cached_prompt_tokens, caching ? 4 : 0);
    // A next turn: the first prompt, its answer and more. The answer's blocks were recorded too:
    // 37 tokens have keys and values (the last generated one was never fed back), 9 blocks.
    std::vector<int32_t> turn = prompt;
    turn.insert(turn.end(), first->tokens.begin(), first->tokens.end());
    turn.insert(turn.end(), {10, 11, 12});
    EXPECT_EQ(run(turn, 4)->usage.cached_prompt_tokens, caching ? 36 : 0);
    // A prompt of one block and a token, and one of exactly one block: the last token is always
    // computed, for its logits.
    const std::vector<int32_t> head(prompt.begin(), prompt.begin() + 5);
    EXPECT_EQ(run(head, 3)->usage.cached_prompt_tokens, caching ? 4 : 0);
    const std::vector<int32_t> block(prompt.begin(), prompt.begin() + 4);
    EXPECT_EQ(run(block, 3)->usage.cached_prompt_tokens, 0);

    const EngineStats st = s.engine->stats();
    EXPECT_EQ(st.prefix_cache_queried_tokens, 30 + 30 + 24 + 30 + 41 + 5 + 4);
    EXPECT_EQ(st.prefix_cache_hit_tokens, caching ? 28 + 20 + 4 + 36 + 4 : 0);
    EXPECT_EQ(st.kv_blocks_used, 0);
    if (caching)
      EXPECT_GT(st.kv_blocks_cached, 0);
    else
      EXPECT_EQ(st.kv_blocks_cached, 0);
  }
}

// Requests that arrive while another with the same first tokens still runs share its blocks,
// the ones its prompt filled and the ones its answer filled since, and every request gets the
// tokens it gets alone.
TEST(Engine, RequestsShareTheBlocksOfARequestStillRunning) {
  EngineOptions options;
  options.max_batch_tokens = 24;
  Served s(64, options);
  const std::vector<int32_t> prompt = prompt_of(30, 5);
  // The long request's sink submits the others from the engine's thread when its third token
  // arrives: 32 tokens have keys and values then (8 whole blocks), and 37 tokens are to come.
  auto longest = std::make_shared<Watched>();
  std::vector<int32_t> follow;  // the prompt, the first two tokens of the answer, and more
  auto follower = std::make_shared<Collector>(), same = std::make_shared<Collector>();
  longest->trigger = 3;
  longest->at_token = [&] {
    follow = prompt;
    follow.insert(follow.end(), longest->tokens.begin(), longest->tokens.begin() + 2);
    follow.insert(follow.end(), {7, 8, 9});
    s.engine->submit(request(follow, 8), follower);
    s.engine->submit(request(prompt, 8), same);
  };
  s.engine->submit(request(prompt, 40), longest);
  longest->wait();
  follower->wait();
  same->wait();
  EXPECT_EQ(longest->tokens, alone(prompt, 40));
  EXPECT_EQ(follower->tokens, alone(follow, 8));
  EXPECT_EQ(same->tokens, alone(prompt, 8));
  EXPECT_EQ(longest->usage.cached_prompt_tokens, 0);
  EXPECT_EQ(follower->usage.cached_prompt_tokens, 32);
  EXPECT_EQ(same->usage.cached_prompt_tokens, 28);
  EXPECT_EQ(s.engine->stats().kv_blocks_used, 0);
}

// Requests that arrive together with the same new prefix compute it once: the first computes
// it, the others wait for its blocks and take them from the cache. With a budget of 64 tokens a
// step all three fit in the first step; without the wait none would find anything cached.
TEST(Engine, RequestsThatArriveTogetherComputeASharedPrefixOnce) {
  for (bool caching : {true, false}) {
    SCOPED_TRACE(caching ? "prefix caching" : "no prefix caching");
    EngineOptions options;
    options.max_batch_tokens = 64;
    options.prefix_caching = caching;
    Served s(64, options, false);
    const std::vector<int32_t> prompt = prompt_of(30, 5);
    std::vector<int32_t> other = prompt;  // the first 5 blocks in common
    other[21] = 99;
    const std::vector<std::vector<int32_t>> prompts = {prompt, prompt, other, prompt_of(20, 6)};
    const std::vector<int64_t> lengths(prompts.size(), 6);
    auto sinks = submit_all(s, prompts, lengths);
    s.start();  // all four arrive in the first step
    expect_each_alone(sinks, prompts, lengths);
    const std::vector<int64_t> cached = {0, 28, 20, 0};
    for (size_t i = 0; i < prompts.size(); ++i)
      EXPECT_EQ(sinks[i]->usage.cached_prompt_tokens, caching ? cached[i] : 0) << "request " << i;
    EXPECT_EQ(s.engine->stats().prefix_cache_hit_tokens, caching ? 48 : 0);
  }
}

// When other requests need the blocks, a cached prefix is reused from its end: a request that
// comes back finds the first blocks still there, computes the rest, and gets the same tokens.
// (A model without a sliding window: with one, a request gives back its first blocks as they
// leave the window, and those go first.)
TEST(Engine, ACachedPrefixShortensFromItsEnd) {
  EngineOptions options;
  options.max_batch_tokens = 24;
  Served s(16, options, true, kNoWindow);  // 64 tokens
  auto run = [&](const std::vector<int32_t>& prompt, int64_t n) {
    auto c = std::make_shared<Collector>();
    s.engine->submit(request(prompt, n), c);
    c->wait();
    EXPECT_EQ(c->tokens, alone(prompt, n, kNoWindow)) << prompt.size() << " prompt tokens";
    return c->usage.cached_prompt_tokens;
  };
  const std::vector<int32_t> prompt = prompt_of(30, 5);
  // 37 tokens with keys and values in 10 blocks: 9 whole ones recorded and cached; the tenth
  // and the 6 never used are free.
  EXPECT_EQ(run(prompt, 8), 0);
  EXPECT_EQ(s.engine->stats().kv_blocks_cached, 9);
  // 47 tokens in 12 blocks: the 7 free ones and the last 5 cached ones.
  EXPECT_EQ(run(prompt_of(40, 9), 8), 0);
  EXPECT_EQ(run(prompt, 8), 16);
}

// With a sliding window of 16 tokens a sequence reads only its last 4 or 5 blocks, and gives
// back the ones before: three requests of 80 tokens, 20 blocks each without it, run together in
// 24 blocks without a preemption, and get the tokens they get alone (whose blocks, reused by
// the others meanwhile, would change them if a kernel still read them).
TEST(Engine, BlocksThatLeaveTheWindowGoBack) {
  for (bool caching : {true, false}) {
    SCOPED_TRACE(caching ? "prefix caching" : "no prefix caching");
    EngineOptions options;
    options.max_batch_tokens = 24;
    options.prefix_caching = caching;
    Served s(24, options, false);
    std::vector<std::vector<int32_t>> prompts = {prompt_of(30, 1), prompt_of(30, 2),
                                                 prompt_of(30, 1)};
    prompts[2][29] = 5;  // shares 7 blocks with the first, which it gives back too
    const std::vector<int64_t> lengths(prompts.size(), 50);
    auto sinks = submit_all(s, prompts, lengths);
    s.start();
    expect_each_alone(sinks, prompts, lengths);
    for (size_t i = 0; i < prompts.size(); ++i)
      EXPECT_EQ(sinks[i]->usage.preemptions, 0) << "request " << i;
    EXPECT_EQ(sinks[2]->usage.cached_prompt_tokens, caching ? 28 : 0);
    EXPECT_EQ(s.engine->stats().kv_blocks_used, 0);
  }
}

// With the sliding window, a request longer than the whole cache runs: 16 blocks hold the
// window (4 blocks), a step of 24 tokens and the ends, so the context limit is the block
// table's (128 tokens), not the cache's (64). Two such requests at once, and a next turn of
// one, get the tokens they get alone. Below that many blocks the cache bounds the context.
TEST(Engine, WithAWindowARequestLongerThanTheCacheRuns) {
  for (bool caching : {true, false}) {
    SCOPED_TRACE(caching ? "prefix caching" : "no prefix caching");
    EngineOptions options;
    options.max_batch_tokens = 24;
    options.prefix_caching = caching;
    Served s(16, options);
    EXPECT_EQ(s.engine->context_limit(), 128);
    const std::vector<std::vector<int32_t>> prompts = {prompt_of(30, 3), prompt_of(45, 4)};
    const std::vector<int64_t> lengths = {90, 70};
    auto sinks = submit_all(s, prompts, lengths);
    expect_each_alone(sinks, prompts, lengths);
    std::vector<int32_t> turn = prompts[0];
    turn.insert(turn.end(), sinks[0]->tokens.begin(), sinks[0]->tokens.end());
    turn.insert(turn.end(), {5, 6});
    auto next = std::make_shared<Collector>();
    s.engine->submit(request(turn, 6), next);
    next->wait();
    EXPECT_EQ(next->tokens, alone(turn, 6));
    EXPECT_EQ(s.engine->stats().kv_blocks_used, 0);
  }
  EngineOptions options;
  options.max_batch_tokens = 24;
  Served small(12, options, false);
  EXPECT_EQ(small.engine->context_limit(), 48);
  Served no_window(16, options, false, kNoWindow);
  EXPECT_EQ(no_window.engine->context_limit(), 64);
}

// Waiting requests are served by priority (lower first), then by arrival: with one running slot,
// requests queued together finish in that order, each with the tokens it gets alone.
TEST(Engine, WaitingRequestsAreServedByPriorityThenArrival) {
  EngineOptions options;
  options.max_running = 1;
  Served s(64, options, false);
  const std::vector<int32_t> priorities = {5, 0, 3, 0, -2};
  std::vector<int> finished;
  std::vector<std::shared_ptr<Watched>> sinks;
  std::vector<std::vector<int32_t>> prompts;
  for (size_t i = 0; i < priorities.size(); ++i) {
    prompts.push_back(prompt_of(6 + static_cast<int>(i), static_cast<int>(i)));
    sinks.push_back(std::make_shared<Watched>());
    sinks.back()->finished = &finished;
    sinks.back()->index = static_cast<int>(i);
    s.engine->submit(with_priority(request(prompts.back(), 5), priorities[i]), sinks.back());
  }
  s.start();
  for (size_t i = 0; i < sinks.size(); ++i) {
    sinks[i]->wait();
    EXPECT_EQ(sinks[i]->tokens, alone(prompts[i], 5)) << "request " << i;
  }
  EXPECT_EQ(finished, (std::vector<int>{4, 1, 3, 2, 0}));
}

// Submits `first`, and `second` from the engine's thread when the first's third token arrives
// (after `at_submit`); waits for both, which must end with the tokens each gets alone.
void run_with_newcomer(Served& s, const std::string& path, const RequestParams& first,
                       const std::shared_ptr<Watched>& first_sink, const RequestParams& second,
                       const std::shared_ptr<Watched>& second_sink,
                       const std::function<void()>& at_submit = nullptr) {
  first_sink->trigger = 3;
  first_sink->at_token = [&] {
    if (at_submit) at_submit();
    s.engine->submit(second, second_sink);
  };
  s.engine->submit(first, first_sink);
  first_sink->wait();
  second_sink->wait();
  EXPECT_EQ(first_sink->tokens, alone(first.prompt, first.max_tokens, path));
  EXPECT_EQ(second_sink->tokens, alone(second.prompt, second.max_tokens, path));
}

// A request of a lower priority value that arrives while the running slot is taken takes it:
// the running request is preempted, finishes after it and still gets the tokens it gets alone.
// Of equal priority the newcomer waits.
TEST(Engine, AHigherPriorityRequestTakesTheRunningSlot) {
  for (int32_t newcomer : {0, 1}) {
    SCOPED_TRACE("newcomer priority " + std::to_string(newcomer));
    EngineOptions options;
    options.max_running = 1;
    Served s(64, options);
    std::vector<int> finished;
    auto running = std::make_shared<Watched>(), urgent = std::make_shared<Watched>();
    running->finished = urgent->finished = &finished;
    running->index = 0;
    urgent->index = 1;
    run_with_newcomer(s, kModel, with_priority(request(prompt_of(10, 1), 40), 1), running,
                      with_priority(request(prompt_of(8, 2), 6), newcomer), urgent);
    EXPECT_EQ(finished, (newcomer == 0 ? std::vector<int>{1, 0} : std::vector<int>{0, 1}));
    EXPECT_EQ(running->usage.preemptions, newcomer == 0 ? 1 : 0);
    EXPECT_EQ(urgent->usage.preemptions, 0);
  }
}

// When the KV cache runs out, the running sequence of the highest priority value is preempted,
// not the newest: here a request of 70 tokens of priority 1 and one of 50 that arrives when the
// first has 33: together they outgrow 20 blocks of 4 tokens (no window). Of equal priority the
// newer one is preempted; of priority 0 the older one.
TEST(Engine, WhenBlocksRunOutTheLowestPriorityIsPreempted) {
  for (int32_t newcomer : {1, 0}) {
    SCOPED_TRACE("newcomer priority " + std::to_string(newcomer));
    Served s(20, EngineOptions{}, true, kNoWindow);
    auto running = std::make_shared<Watched>(), later = std::make_shared<Watched>();
    run_with_newcomer(s, kNoWindow, with_priority(request(prompt_of(30, 3), 40), 1), running,
                      with_priority(request(prompt_of(20, 4), 30), newcomer), later);
    EXPECT_EQ(running->usage.preemptions > 0, newcomer == 0);
    EXPECT_EQ(later->usage.preemptions > 0, newcomer == 1);
    EXPECT_EQ(s.engine->stats().kv_blocks_used, 0);
  }
}

// A request of a lower priority value takes the step tokens it needs from running requests of
// higher values: arriving while one decodes, a 64-token prompt (the whole step budget) runs in
// one step, the decoding request idle for it; of equal priority it takes two steps.
TEST(Engine, AHigherPriorityRequestTakesTheStepTokens) {
  for (int32_t newcomer : {0, 1}) {
    SCOPED_TRACE("newcomer priority " + std::to_string(newcomer));
    EngineOptions options;
    options.max_batch_tokens = 64;
    Served s(64, options, true, kNoWindow);
    auto running = std::make_shared<Watched>(), urgent = std::make_shared<Watched>();
    int64_t submitted_in = -1, first_token_in = -1;
    urgent->trigger = 1;
    urgent->at_token = [&] { first_token_in = s.engine->stats().steps; };
    run_with_newcomer(s, kNoWindow, with_priority(request(prompt_of(6, 5), 30), 1), running,
                      with_priority(request(prompt_of(64, 6), 4), newcomer), urgent,
                      [&] { submitted_in = s.engine->stats().steps; });
    // Steps are counted after they run: a sink sees the index of its own step.
    EXPECT_EQ(first_token_in - submitted_in, newcomer == 0 ? 1 : 2);
    EXPECT_EQ(running->usage.preemptions + urgent->usage.preemptions, 0);
  }
}

TEST(Engine, ValidationNamesTheField) {
  Served s(64, {}, false);
  auto expect = [&](RequestParams p, const char* field) {
    try {
      s.engine->submit(std::move(p), std::make_shared<Collector>());
      ADD_FAILURE() << "accepted bad " << field;
    } catch (const RequestError& e) {
      EXPECT_EQ(e.code(), RequestError::Code::kInvalidArgument);
      EXPECT_NE(e.message().find(field), std::string::npos) << e.message();
      EXPECT_EQ(e.message().find(".cc:"), std::string::npos)
          << "a source location in " << e.message();
    }
  };
  expect(request({}, 4), "prompt");
  expect(request({1, 384}, 4), "prompt[1]: token id 384 outside the vocabulary of 384 tokens");
  expect(request({1, 2}, 127), "exceeds the context limit of 128");
  auto p = request({1}, 4);
  p.sampling.temperature = -1;
  expect(p, "temperature");
  p = request({1}, 4);
  p.sampling.top_p = 2;
  expect(p, "top_p");
  p = request({1}, 4);
  p.stop.assign(17, "x");
  expect(p, "stop: 17 stop strings (at most 16)");
  p = request({1}, 4);
  p.logprobs = 21;
  expect(p, "logprobs");
  p = request({1}, 4);
  p.sampling.min_tokens = 5;
  expect(p, "min_tokens: 5 exceeds max_tokens 4");
  p = request({1}, 4);
  p.sampling.logit_bias = {{384, 1.f}};
  expect(p, "logit_bias: token id 384 outside the vocabulary of 384");
  p = request({1}, 4);
  p.sampling.logit_bias = {{3, -101.f}};
  expect(p, "sampling: logit_bias: -101 for token 3 outside [-100, 100]");
}

TEST(Engine, PromptLargerThanTheQueueIsInvalidNotExhausted) {
  EngineOptions options;
  options.max_queue_tokens = 4;
  Served s(64, options, false);
  try {
    s.engine->submit(request({1, 5, 6, 7, 8}, 2), std::make_shared<Collector>());
    FAIL() << "admitted";
  } catch (const RequestError& e) {
    EXPECT_EQ(e.code(), RequestError::Code::kInvalidArgument) << e.message();
  }
}

TEST(Engine, FullQueueIsResourceExhausted) {
  EngineOptions options;
  options.max_queue_requests = 3;
  Served s(64, options, false);  // the loop is not running: nothing leaves the queue
  for (int i = 0; i < 3; ++i) s.engine->submit(request({1, 5}, 4), std::make_shared<Collector>());
  try {
    s.engine->submit(request({1, 5}, 4), std::make_shared<Collector>());
    FAIL() << "a fourth request was admitted";
  } catch (const RequestError& e) {
    EXPECT_EQ(e.code(), RequestError::Code::kResourceExhausted);
  }
  EXPECT_EQ(s.engine->stats().queue_depth, 3);
  s.start();  // now the accepted ones complete
}

// The completions of one call are queued together or not at all.
TEST(Engine, CompletionsAreQueuedAllOrNone) {
  EngineOptions options;
  options.max_queue_requests = 3;
  options.max_queue_tokens = 8;
  options.max_completions = 4;
  Served s(64, options, false);  // nothing leaves the queue
  auto submit_n = [&](int n, std::vector<int32_t> prompt) {
    std::vector<RequestParams> params(static_cast<size_t>(n), request(prompt, 4));
    std::vector<std::shared_ptr<RequestSink>> sinks;
    std::vector<std::shared_ptr<Collector>> collectors;
    for (int i = 0; i < n; ++i) {
      collectors.push_back(std::make_shared<Collector>());
      sinks.push_back(collectors.back());
    }
    s.engine->submit_all(std::move(params), std::move(sinks));
    return collectors;
  };
  auto refusal = [&](int n, std::vector<int32_t> prompt) {
    try {
      submit_n(n, std::move(prompt));
    } catch (const RequestError& e) {
      return std::make_pair(e.code(), e.message());
    }
    return std::make_pair(RequestError::Code::kUnavailable, std::string("admitted"));
  };
  auto first = submit_n(1, {1, 5});
  // Two more would fit the 3 requests, three do not: none of them is queued.
  auto [code, message] = refusal(3, {1, 5});
  EXPECT_EQ(code, RequestError::Code::kResourceExhausted) << message;
  EXPECT_EQ(s.engine->stats().queue_depth, 1);
  EXPECT_EQ(s.engine->stats().queued_tokens, 2);
  // Their prompt tokens count once per completion: 2 + 3 x 3 > 8.
  std::tie(code, message) = refusal(2, {1, 5, 6, 7});
  EXPECT_EQ(code, RequestError::Code::kResourceExhausted) << message;
  EXPECT_EQ(s.engine->stats().queue_depth, 1);
  // More than a call may ask, or than the queue could ever hold: invalid, naming n.
  std::tie(code, message) = refusal(5, {1, 5});
  EXPECT_EQ(code, RequestError::Code::kInvalidArgument);
  EXPECT_EQ(message, "n: 5 completions (at most 4, --max-completions)");
  std::tie(code, message) = refusal(4, {1, 5});
  EXPECT_EQ(code, RequestError::Code::kInvalidArgument);
  EXPECT_EQ(message,
            "n: 4 completions exceed the admission limit of 3 requests "
            "(--max-queue-requests)");
  std::tie(code, message) = refusal(3, {1, 5, 6});
  EXPECT_EQ(code, RequestError::Code::kInvalidArgument);
  EXPECT_EQ(message,
            "n: 3 completions of 3 prompt tokens exceed the admission limit of 8 "
            "prompt tokens (--max-queue-tokens)");
  // One invalid completion refuses them all.
  std::vector<RequestParams> mixed = {request({1, 5}, 4), request({1, 5}, 0)};
  EXPECT_THROW(s.engine->submit_all(std::move(mixed),
                                    {std::make_shared<Collector>(), std::make_shared<Collector>()}),
               RequestError);
  EXPECT_EQ(s.engine->stats().queue_depth, 1);
  auto two = submit_n(2, {1, 5});
  EXPECT_EQ(s.engine->stats().queue_depth, 3);
  s.start();
  for (auto* group : {&first, &two})
    for (const auto& c : *group) {
      c->wait();
      EXPECT_EQ(c->tokens, alone({1, 5}, 4));
    }
}

// Cancels its request (for `reason`) when its first token arrives (sinks are called without the
// engine's lock), so the cancellation lands while the request runs however fast the steps are.
class CancelOnFirstToken : public Collector,
                           public std::enable_shared_from_this<CancelOnFirstToken> {
 public:
  explicit CancelOnFirstToken(FinishReason reason = FinishReason::kCancelled) : reason_(reason) {}
  uint64_t submit(Engine& engine, const RequestParams& p) {
    std::lock_guard<std::mutex> lock(id_mu_);  // events wait until the id is known
    engine_ = &engine;
    id_ = engine.submit(p, shared_from_this());
    return id_;
  }
  void on_event(RequestEvent e) override {
    const bool first = !e.token_ids.empty() && !cancelled_;
    Collector::on_event(std::move(e));
    if (first) {
      std::lock_guard<std::mutex> lock(id_mu_);
      engine_->cancel(id_, reason_);
      cancelled_ = true;
    }
  }

 private:
  std::mutex id_mu_;
  FinishReason reason_;
  Engine* engine_ = nullptr;
  uint64_t id_ = 0;
  bool cancelled_ = false;  // touched by the engine's thread only
};

TEST(Engine, CancelAndDeadlineFreeBlocks) {
  Served s(64);
  auto a = std::make_shared<CancelOnFirstToken>();
  a->submit(*s.engine, request(prompt_of(20, 1), 100));
  a->wait();
  EXPECT_EQ(a->finish, FinishReason::kCancelled);
  EXPECT_LT(a->tokens.size(), 100u);
  auto b = std::make_shared<Collector>();
  auto p = request(prompt_of(20, 2), 100);
  p.deadline = std::chrono::steady_clock::now();
  s.engine->submit(p, b);
  b->wait();
  EXPECT_EQ(b->finish, FinishReason::kDeadline);
  // Each ending is counted once, under its own reason.
  EngineStats st = s.engine->stats();
  EXPECT_EQ(st.requests_cancelled, 1);
  EXPECT_EQ(st.requests_deadline_exceeded, 1);
  EXPECT_EQ(st.requests_completed, 0);
  // Blocks return to idle, and serving goes on.
  for (int i = 0; i < 100 && s.engine->stats().kv_blocks_used != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(s.engine->stats().kv_blocks_used, 0);
  auto c = std::make_shared<Collector>();
  s.engine->submit(request({1, 7}, 5), c);
  c->wait();
  EXPECT_EQ(c->tokens, alone({1, 7}, 5));
  st = s.engine->stats();
  EXPECT_EQ(st.requests_completed, 1);
  EXPECT_EQ(st.requests_cancelled, 1);
  EXPECT_EQ(st.requests_deadline_exceeded, 1);
  // A cancel the transport made at the call's deadline ends the request as past it (made from
  // the first token's event: a cancel right after submit() can come after all 100 tokens on a
  // loaded machine).
  auto d = std::make_shared<CancelOnFirstToken>(FinishReason::kDeadline);
  const uint64_t id = d->submit(*s.engine, request(prompt_of(20, 3), 100));
  d->wait();
  EXPECT_EQ(d->finish, FinishReason::kDeadline);
  EXPECT_EQ(s.engine->stats().requests_deadline_exceeded, 2);
  EXPECT_THROW(s.engine->cancel(id, FinishReason::kStop), Error);
}

TEST(Engine, StopStringsStopIdsAndLogprobs) {
  Served s(64);
  const std::vector<int32_t> prompt = prompt_of(9, 3);
  auto full = std::make_shared<Collector>();
  s.engine->submit(request(prompt, 24), full);
  full->wait();
  ASSERT_GE(full->text.size(), 6u);
  // A stop string from the middle of the text: the output ends right before it.
  const size_t at = full->text.size() / 2;
  const std::string stop = full->text.substr(at, 3);
  auto a = std::make_shared<Collector>();
  auto p = request(prompt, 24);
  p.stop = {stop};
  s.engine->submit(p, a);
  a->wait();
  EXPECT_EQ(a->finish, FinishReason::kStop);
  EXPECT_EQ(a->text, full->text.substr(0, full->text.find(stop)));
  // A stop id: output ends with its first occurrence.
  const int32_t stop_id = full->tokens[5];
  auto b = std::make_shared<Collector>();
  p = request(prompt, 24);
  p.stop_token_ids = {stop_id};
  s.engine->submit(p, b);
  b->wait();
  EXPECT_EQ(b->finish, FinishReason::kStop);
  const auto first = std::find(full->tokens.begin(), full->tokens.end(), stop_id);
  EXPECT_EQ(b->tokens, std::vector<int32_t>(full->tokens.begin(), first + 1));
  // Logprobs: best first, the greedy token is the best, probabilities sum to at most 1.
  auto c = std::make_shared<Collector>();
  p = request(prompt, 6);
  p.logprobs = 5;
  s.engine->submit(p, c);
  c->wait();
  ASSERT_EQ(c->logprobs.size(), 6u);
  for (const TokenLogprobs& l : c->logprobs) {
    ASSERT_EQ(l.top.size(), 5u);
    EXPECT_EQ(l.top[0].token_id, l.token_id);
    EXPECT_FLOAT_EQ(l.top[0].logprob, l.logprob);
    double mass = 0;
    for (size_t i = 0; i < l.top.size(); ++i) {
      if (i > 0) {
        EXPECT_LE(l.top[i].logprob, l.top[i - 1].logprob);
      }
      mass += std::exp(l.top[i].logprob);
    }
    EXPECT_LE(mass, 1.0 + 1e-5);
  }
  EXPECT_EQ(c->usage.prompt_tokens, 9);
  EXPECT_EQ(c->usage.completion_tokens, 6);
}

// min_tokens: the end-of-sequence token and stop ids (here forced by a bias of +100) are not
// sampled, and stop strings are not looked for, before that many tokens.
TEST(Engine, MinTokensHoldsBackEndTokensAndStopStrings) {
  Served s(64);
  const int32_t eos = static_cast<int32_t>(ModelConfig::load(kModel).eos_token_ids.at(0));
  const std::vector<int32_t> prompt = prompt_of(9, 5);
  auto run = [&](RequestParams p) {
    auto c = std::make_shared<Collector>();
    s.engine->submit(std::move(p), c);
    c->wait();
    return c;
  };
  RequestParams p = request(prompt, 12);
  p.ignore_eos = false;
  p.sampling.logit_bias = {{eos, 100.f}};
  auto a = run(p);
  EXPECT_EQ(a->tokens, std::vector<int32_t>{eos});
  EXPECT_EQ(a->finish, FinishReason::kStop);
  p.sampling.min_tokens = 4;
  auto b = run(p);
  ASSERT_EQ(b->tokens.size(), 5u);
  EXPECT_EQ(b->tokens.back(), eos);
  EXPECT_EQ(std::count(b->tokens.begin(), b->tokens.end(), eos), 1);
  EXPECT_EQ(b->finish, FinishReason::kStop);
  // The first four are the greedy tokens with the end-of-sequence token banned.
  RequestParams banned = request(prompt, 4);
  banned.sampling.logit_bias = {{eos, -100.f}};
  EXPECT_EQ(std::vector<int32_t>(b->tokens.begin(), b->tokens.end() - 1), run(banned)->tokens);
  // A stop id, with ignore_eos: the same.
  p = request(prompt, 12);
  p.stop_token_ids = {7};
  p.sampling.logit_bias = {{7, 100.f}};
  p.sampling.min_tokens = 2;
  auto c = run(p);
  ASSERT_EQ(c->tokens.size(), 3u);
  EXPECT_EQ(c->tokens.back(), 7);
  EXPECT_EQ(c->finish, FinishReason::kStop);
  // A stop string that the text begins with: it ends the output at once without min_tokens;
  // with min_tokens 6 the output runs on, to its length or a later occurrence.
  auto full = run(request(prompt, 12));
  ASSERT_GE(full->text.size(), 2u);
  p = request(prompt, 12);
  p.stop = {full->text.substr(0, 2)};
  auto d = run(p);
  EXPECT_EQ(d->text, "");
  EXPECT_EQ(d->finish, FinishReason::kStop);
  p.sampling.min_tokens = 6;
  auto e = run(p);
  ASSERT_GE(e->tokens.size(), 6u);
  EXPECT_EQ(e->tokens,
            std::vector<int32_t>(full->tokens.begin(), full->tokens.begin() + e->tokens.size()));
  EXPECT_EQ(e->text.substr(0, 2), full->text.substr(0, 2));
}

// Expects `got` to hold the top-1 prompt logprobs of `prompt` computed from its whole prompt's
// logits in one pass on `path`'s model, each prompt token after the first once, in one event.
void expect_prompt_logprobs(const Collector& got, const std::vector<int32_t>& prompt,
                            const std::string& path) {
  LoadedModel plain = load_model(path, 128, 64, false);
  GenerateOptions o;
  o.max_tokens = 1;
  o.all_prompt_logits = true;
  const std::vector<float> logits = generate(*plain.model, prompt, o).prompt_logits;
  const int64_t vocab = plain.config.vocab_size;
  EXPECT_EQ(got.prompt_logprob_events, 1);
  ASSERT_EQ(got.prompt_logprobs.size(), prompt.size() - 1);
  std::vector<float> lp(2);
  std::vector<int32_t> ids(1), order;
  for (size_t t = 1; t < prompt.size(); ++t) {
    const TokenLogprobs& l = got.prompt_logprobs[t - 1];
    cpu::logprobs_row(logits.data() + (t - 1) * vocab, vocab, prompt[t], 1, lp.data(), ids.data(),
                      order);
    EXPECT_EQ(l.token_id, prompt[t]);
    EXPECT_NEAR(l.logprob, lp[0], 1e-5) << "token " << t;
    ASSERT_EQ(l.top.size(), 1u);
    EXPECT_EQ(l.top[0].token_id, ids[0]) << "token " << t;
    EXPECT_NEAR(l.top[0].logprob, lp[1], 1e-5) << "token " << t;
  }
}

// Prompt logprobs from 8 logit rows a step (16 rows for 8 running sequences): a 30-token prompt
// takes several steps beside other requests (another asking them waits for rows), with the
// prompt's blocks in the prefix cache (not used, as it computes its whole prompt).
TEST(Engine, PromptLogprobsAreThoseOfTheWholePromptsLogits) {
  const std::vector<int32_t> prompt = prompt_of(30, 8);
  EngineOptions options;
  options.max_running = 8;
  {
    Served s(64, options);
    ASSERT_EQ(s.engine->prompt_logit_rows(), 8);
    auto warm = std::make_shared<Collector>();  // leaves the prompt's blocks in the cache
    s.engine->submit(request(prompt, 2), warm);
    warm->wait();
    std::vector<std::shared_ptr<Collector>> sinks;
    for (int i = 0; i < 4; ++i) {
      RequestParams p = request(i == 0 ? prompt : prompt_of(30, 20 + i), 20);
      if (i < 2) p.prompt_logprobs = 1 + 2 * i;
      sinks.push_back(std::make_shared<Collector>());
      s.engine->submit(p, sinks.back());
    }
    for (auto& c : sinks) c->wait();
    EXPECT_EQ(sinks[0]->tokens, alone(prompt, 20));
    EXPECT_EQ(sinks[0]->usage.cached_prompt_tokens, 0) << "it computes its whole prompt";
    expect_prompt_logprobs(*sinks[0], prompt, kModel);
    EXPECT_EQ(sinks[1]->prompt_logprobs.size(), 29u);
    EXPECT_EQ(sinks[1]->prompt_logprobs.at(5).top.size(), 3u);
    EXPECT_TRUE(sinks[2]->prompt_logprobs.empty());
    for (int i = 1; i < 4; ++i)
      EXPECT_EQ(sinks[i]->tokens, alone(prompt_of(30, 20 + i), 20)) << "request " << i;
  }
  // Preempted half way through its prompt, in a 13-block cache of the fixture without a window:
  // a request of priority 0 takes 8 blocks, this one (priority 1) 2 more a step, and in its third
  // step it is the one preempted. It computes again the 16 tokens it had, asking no rows for
  // them, once the other has ended.
  {
    Served s(13, options, false, kNoWindow);
    auto other = std::make_shared<Collector>(), a = std::make_shared<Collector>();
    s.engine->submit(request(prompt_of(30, 21), 20), other);
    RequestParams p = with_priority(request(prompt, 20), 1);
    p.prompt_logprobs = 1;
    s.engine->submit(p, a);
    s.start();
    other->wait();
    a->wait();
    EXPECT_EQ(a->usage.preemptions, 1);
    EXPECT_EQ(a->tokens, alone(prompt, 20, kNoWindow));
    expect_prompt_logprobs(*a, prompt, kNoWindow);
  }
  // Without rows beyond one per running sequence, and beyond 20, they are refused.
  Served s(64);
  RequestParams p = request(prompt, 2);
  p.prompt_logprobs = 1;
  EXPECT_THROW(s.engine->submit(p, std::make_shared<Collector>()), RequestError);
  p.prompt_logprobs = 21;
  EXPECT_THROW(s.engine->submit(p, std::make_shared<Collector>()), RequestError);
}

TEST(Engine, DrainRefusesNewWorkAndFinishesOld) {
  Served s(64);
  auto a = std::make_shared<Collector>();
  s.engine->submit(request(prompt_of(10, 4), 30), a);
  s.engine->drain();
  try {
    s.engine->submit(request({1}, 2), std::make_shared<Collector>());
    FAIL();
  } catch (const RequestError& e) {
    EXPECT_EQ(e.code(), RequestError::Code::kUnavailable);
  }
  a->wait();
  EXPECT_EQ(a->finish, FinishReason::kLength);
  EXPECT_EQ(a->tokens.size(), 30u);
}

}  // namespace
}  // namespace sy
