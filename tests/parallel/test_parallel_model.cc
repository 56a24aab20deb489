// The expert- and tensor-parallel forward pass under mpiexec -n W, on the transformers fixtures:
// for every (tp, ep) layout the world allows and both MoE exchanges (and auto, which switches
// between them by step size), logits at every prompt
// position within 1e-4 relative of the single-rank run and of transformers, and identical greedy
// tokens. Decode steps of one token leave most ranks with no tokens; a zeroed router sends every
// token to experts 0 and 1, so one rank's experts receive everything and the others nothing.
// Sampling from the gathered vocabulary slices gives the tokens of sampling the host's logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "kernels/cpu/ops.h"
#include "parallel/context.h"
#include "runtime/engine/generator.h"
#include "runtime/engine/sampling.h"
#include "runtime/model/loader.h"
#include "tests/common/fixtures.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

using test::fixture_dirs;
using test::load_prompts;
using Prompt = test::FixturePrompt;

// Logits outside 1e-4 of the row's largest |reference| (prints the first few).
int64_t n_wrong_logits(const std::vector<float>& got, const std::vector<float>& want, int64_t vocab,
                       const std::string& what) {
  int64_t n_wrong = 0;
  for (size_t r = 0; r * vocab < want.size(); ++r) {
    double scale = 0;
    for (int64_t v = 0; v < vocab; ++v)
      scale = std::max(scale, std::fabs(double(want[r * vocab + v])));
    for (int64_t v = 0; v < vocab; ++v) {
      const double err = std::fabs(double(got[r * vocab + v]) - want[r * vocab + v]) / scale;
      if (!(err <= 1e-4) && n_wrong++ < 5)
        std::printf("  %s row %zu vocab %lld: got %g want %g\n", what.c_str(), r, (long long)v,
                    got[r * vocab + v], want[r * vocab + v]);
    }
  }
  return n_wrong;
}

std::unique_ptr<Model> build(const fs::path& dir, const ModelConfig& config, Ops& ops,
                             const ParallelContext* par, bool skew) {
  auto ckpt = open_weight_source(dir.string());
  Weights w = Weights::load(*ckpt, config, shard_for(config, par), ops, false);
  if (skew)  // all router logits 0: top-k picks experts 0..k-1 for every token
    for (LayerWeights& L : w.layers) ops.fill_zero(L.gate);
  ModelLimits limits;
  limits.block_size = 4;
  limits.max_blocks_per_seq = 16;
  limits.n_blocks = 16;
  limits.max_tokens = 64;
  limits.max_logit_rows = 64;
  return std::make_unique<Model>(config, std::move(w), ops, limits, par);
}

class ParallelModel : public ::testing::Test {
 protected:
  void SetUp() override { world_ = make_mpi_world_communicator(); }

  // Runs every prompt through the layout; returns wrong logits + wrong tokens on this rank.
  int64_t check_layout(const fs::path& dir, const ParallelConfig& pc, bool skew,
                       ForwardProfile* profile = nullptr) {
    const ModelConfig config = ModelConfig::load(dir.string());
    auto par = ParallelContext::create(pc, *world_);
    auto ops = make_cpu_ops();
    auto model = build(dir, config, *ops, par.get(), skew);
    model->set_profile(profile);
    auto single = skew ? build(dir, config, *ops, nullptr, true) : nullptr;
    const std::string what = dir.filename().string() + " tp " + std::to_string(pc.tp) + " ep " +
                             std::to_string(pc.ep_size()) + " " + moe_exchange_name(pc.exchange) +
                             (skew ? " skewed" : "");
    int64_t n_wrong = 0;
    for (const Prompt& p : load_prompts(dir, config.vocab_size)) {
      GenerateOptions o;
      o.max_tokens = static_cast<int64_t>(p.greedy.size());
      o.ignore_eos = true;
      o.all_prompt_logits = true;
      GenerateResult got = generate(*model, p.ids, o);
      if (!skew) {
        n_wrong += n_wrong_logits(got.prompt_logits, p.logits, config.vocab_size, what);
        n_wrong += got.tokens != p.greedy;
      } else {
        GenerateResult want = generate(*single, p.ids, o);
        n_wrong += n_wrong_logits(got.prompt_logits, want.prompt_logits, config.vocab_size, what);
        n_wrong += got.tokens != want.tokens;
      }
    }
    if (n_wrong) std::printf("%s: %lld wrong\n", what.c_str(), (long long)n_wrong);
    return n_wrong;
  }

  std::unique_ptr<Communicator> world_;
};

int64_t total(Communicator& world, int64_t n) {
  float v = static_cast<float>(n);
  world.all_reduce_sum(Tensor(&v, DType::kF32, {1}));
  return static_cast<int64_t>(v);
}

TEST_F(ParallelModel, EveryLayoutMatchesSingleRankAndTransformers) {
  const auto dirs = fixture_dirs();
  ASSERT_GE(dirs.size(), 3u);
  int64_t n_wrong = 0;
  int n_layouts = 0;
  for (const auto& dir : dirs) {
    const ModelConfig config = ModelConfig::load(dir.string());
    for (const ParallelConfig& pc :
         test::parallel_layouts(world_->size(), world_->rank(), config)) {
      n_wrong += check_layout(dir, pc, false);
      ++n_layouts;
    }
  }
  if (world_->rank() == 0)
    std::printf("checked %d layouts on %d ranks\n", n_layouts, world_->size());
  EXPECT_EQ(total(*world_, n_wrong), 0);
}

// The auto exchange: every (tp, ep) layout on every fixture matches transformers, and over the
// prompts (up to 40 tokens, prefilled in one step: 80 routed rows) and their decode steps it took
// both paths: dispatch bytes (all-to-all, the prefill steps) and expert-group all-reduce bytes
// (all-gather, the decode steps) wherever experts are split. The fixtures' prompts are shorter
// than the default limit, so the test lowers it to 64 routed rows.
TEST_F(ParallelModel, AutoExchangeTakesAllToAllForPrefillAndAllGatherForDecode) {
  int64_t n_wrong = 0, n_missing = 0, n_both = 0;
  for (const auto& dir : fixture_dirs()) {
    const ModelConfig config = ModelConfig::load(dir.string());
    // A prompt whose prefill step routes more rows than the all-gather path takes.
    size_t longest = 0;
    for (const Prompt& p : load_prompts(dir, config.vocab_size))
      longest = std::max(longest, p.ids.size());
    constexpr int64_t kLimit = 64;
    static_assert(kLimit < kAutoMaxRoutedRows);
    const bool large_step = static_cast<int64_t>(longest) * config.num_experts_per_tok > kLimit;
    for (ParallelConfig pc : test::parallel_layouts(world_->size(), world_->rank(), config)) {
      if (pc.exchange != MoeExchange::kAllToAll) continue;  // one per (tp, ep)
      pc.exchange = MoeExchange::kAuto;
      pc.auto_max_routed_rows = kLimit;
      ForwardProfile profile;
      n_wrong += check_layout(dir, pc, false, &profile);
      if (pc.ep_size() == 1) continue;
      const int64_t dispatched = total(*world_, profile.bytes[ForwardProfile::kDispatchBytes] > 0);
      const int64_t reduced = total(*world_, profile.bytes[ForwardProfile::kEpReduce] > 0);
      n_missing += (dispatched > 0) != large_step || reduced == 0;
      n_both += dispatched > 0 && reduced > 0;
    }
  }
  if (world_->size() > 1) {
    EXPECT_GT(n_both, 0);  // some layout took both paths
  }
  EXPECT_EQ(total(*world_, n_wrong), 0);
  EXPECT_EQ(n_missing, 0);
}

TEST_F(ParallelModel, SkewedRoutingOneRankGetsEverything) {
  const fs::path dir = fixture_dirs().front();
  const ModelConfig config = ModelConfig::load(dir.string());
  int64_t n_wrong = 0;
  for (const ParallelConfig& pc : test::parallel_layouts(world_->size(), world_->rank(), config))
    n_wrong += check_layout(dir, pc, true);
  EXPECT_EQ(total(*world_, n_wrong), 0);
}

TEST_F(ParallelModel, EachRankHoldsItsShareOfTheExperts) {
  const fs::path dir = fixture_dirs().front();
  const ModelConfig config = ModelConfig::load(dir.string());
  ParallelConfig pc;
  pc.world = world_->size();
  pc.rank = world_->rank();
  auto par = ParallelContext::create(pc, *world_);
  auto ops = make_cpu_ops();
  auto ckpt = open_weight_source(dir.string());
  Weights w = Weights::load(*ckpt, config, shard_for(config, par.get()), *ops, false);
  const uint64_t per_expert =
      static_cast<uint64_t>(3 * config.hidden_size * config.intermediate_size *
                            config.num_hidden_layers) *
      sizeof(float);
  const int64_t mine = split_count(config.num_local_experts, pc.world, pc.rank);
  EXPECT_EQ(w.expert_bytes, per_expert * mine);
  // The shares add up to the whole model's experts exactly once.
  EXPECT_EQ(total(*world_, mine), config.num_local_experts);
}

namespace {

// A payload of `n` rows of these sample parameters, with no biases, penalties or logprobs.
SamplePayload plain_payload(const std::vector<float>& params, int64_t n) {
  SamplePayload p;
  p.params.assign(params.begin(), params.begin() + n * Ops::kSampleParams);
  p.bias_offsets.assign(static_cast<size_t>(n + 1), 0);
  p.penalty_offsets.assign(static_cast<size_t>(n + 1), 0);
  for (int64_t i = 0; i < n; ++i) p.penalty_params.insert(p.penalty_params.end(), {1.f, 0.f, 0.f});
  p.forced.assign(static_cast<size_t>(n), -1);
  return p;
}

}  // namespace

// The step's sampler on W ranks samples the whole rows of step_logits (the vocabulary slices
// gathered and interleaved on the device): the same tokens, on every rank, as sampling
// forward()'s host logits of the same step (the step run twice writes the same KV entries).
// Rows mix greedy, temperature with top-k, top-p and min-p, and draws across [0, 1), so a row
// assembled from the wrong columns picks other tokens.
TEST_F(ParallelModel, SamplingGatheredLogitsMatchesSamplingTheHostLogits) {
  const fs::path dir = fixture_dirs().front();
  const ModelConfig config = ModelConfig::load(dir.string());
  std::vector<Prompt> prompts = load_prompts(dir, config.vocab_size);
  const Prompt p =
      *std::max_element(prompts.begin(), prompts.end(),
                        [](const auto& a, const auto& b) { return a.ids.size() < b.ids.size(); });
  const int64_t n = static_cast<int64_t>(p.ids.size());
  for (const ParallelConfig& pc : test::parallel_layouts(world_->size(), world_->rank(), config)) {
    auto par = ParallelContext::create(pc, *world_);
    auto ops = make_cpu_ops();
    auto model = build(dir, config, *ops, par.get(), false);
    StepSampler sampler(*model);
    StepBatch batch;
    batch.n_seqs = 1;
    for (int64_t b = 0; b < model->limits().max_blocks_per_seq; ++b)
      batch.block_tables.push_back(static_cast<int32_t>(b));
    std::vector<float> params;
    for (int64_t t = 0; t < n; ++t) {
      batch.tokens.push_back(p.ids[static_cast<size_t>(t)]);
      batch.positions.push_back(static_cast<int32_t>(t));
      batch.token_seq.push_back(0);
      batch.logit_rows.push_back(static_cast<int32_t>(t));
      const float u = static_cast<float>(std::fmod(0.137 * static_cast<double>(t + 1), 1.0));
      const int kind = static_cast<int>(t % 4);
      params.insert(params.end(), {kind == 0 ? 0.f : 0.9f, kind == 1 ? 20.f : 0.f,
                                   kind == 2 ? 0.9f : 1.f, kind == 3 ? 0.05f : 0.f, u, 0.f});
    }
    std::vector<float> logits(static_cast<size_t>(n * config.vocab_size));
    model->forward(batch, logits.data());
    std::vector<int32_t> want(static_cast<size_t>(n)), got(static_cast<size_t>(n), -1);
    ops->sample(Tensor(want.data(), DType::kI32, {n}),
                Tensor(logits.data(), DType::kF32, {n, config.vocab_size}),
                Tensor(params.data(), DType::kF32, {n, Ops::kSampleParams}));
    const std::string what =
        detail::concat("tp ", pc.tp, " ep ", pc.ep_size(), " ", moe_exchange_name(pc.exchange));
    auto step = [&](const SamplePayload& payload, std::vector<int32_t>& out) {
      model->forward(batch);
      sampler.run(*model, payload, out.data());
    };
    SamplePayload plain = plain_payload(params, n);
    step(plain, got);
    EXPECT_EQ(got, want) << what;
    // Fewer logit rows (the first half: another row permutation), then all of them again.
    batch.logit_rows.resize(static_cast<size_t>(n / 2));
    std::vector<int32_t> half(static_cast<size_t>(n / 2), -1);
    step(plain_payload(params, n / 2), half);
    EXPECT_EQ(half, std::vector<int32_t>(want.begin(), want.begin() + n / 2)) << what << " half";
    for (int64_t t = n / 2; t < n; ++t) batch.logit_rows.push_back(static_cast<int32_t>(t));
    std::fill(got.begin(), got.end(), -1);
    // The logprobs of row 1 (top 5, for the token sampled there): those of forward()'s logits.
    const int64_t V = config.vocab_size;
    std::vector<float> want_lp(6);
    std::vector<int32_t> want_ids(5), order;
    auto expect_logprobs = [&](int32_t token, const std::string& when) {
      cpu::logprobs_row(logits.data() + V, V, token, 5, want_lp.data(), want_ids.data(), order);
      const TokenLogprobs lp = sampler.logprobs(1, 5);
      EXPECT_EQ(lp.token_id, token) << what << when;
      EXPECT_EQ(lp.logprob, want_lp[0]) << what << when;
      ASSERT_EQ(lp.top.size(), 5u) << what << when;
      for (size_t k = 0; k < 5; ++k) {
        EXPECT_EQ(lp.top[k].token_id, want_ids[k]) << what << when << " top " << k;
        EXPECT_EQ(lp.top[k].logprob, want_lp[1 + k]) << what << when << " top " << k;
      }
    };
    SamplePayload with_lp = plain;
    with_lp.logprob_rows = {1};
    with_lp.top = 5;
    step(with_lp, got);
    EXPECT_EQ(got, want) << what << " again";
    expect_logprobs(want[1], " logprobs");
    // Refused: rows that do not increase, a row past the step, a top past the limit.
    for (const auto& [rows, top] : {std::pair<std::vector<int32_t>, int64_t>{{1, 1}, 5},
                                    {{static_cast<int32_t>(n)}, 5},
                                    {{1}, StepSampler::kMaxTopLogprobs + 1}}) {
      SamplePayload bad = with_lp;
      bad.logprob_rows = rows;
      bad.top = top;
      EXPECT_THROW(sampler.run(*model, bad, got.data()), Error) << what << " top " << top;
    }

    // Penalties on the odd rows below 16 (repetition, presence and frequency over the distinct
    // tokens of each one's last 8 prompt tokens, every third one counted as generated: within the
    // 64 ids of one sequence's context here): the tokens of sampling the penalised host logits,
    // and row 1's logprobs still the model's own.
    SamplePayload pen = with_lp;
    pen.penalty_offsets = {0};
    pen.penalty_params.clear();
    std::vector<float> penalised = logits;
    for (int64_t t = 0; t < n; ++t) {
      std::vector<int32_t>& ids = pen.penalty_ids;
      const size_t first = ids.size();
      if (t % 2 == 1 && t < 16)
        for (int64_t j = std::max<int64_t>(0, t - 7); j <= t; ++j) {
          const int32_t id = p.ids[static_cast<size_t>(j)];
          if (std::find(ids.begin() + static_cast<std::ptrdiff_t>(first), ids.end(), id) ==
              ids.end())
            ids.push_back(id);
        }
      pen.penalty_offsets.push_back(static_cast<int32_t>(ids.size()));
      // Every third id generated (t % 4 + 1 times), the others prompt-only.
      for (size_t j = first; j < ids.size(); ++j)
        pen.penalty_counts.push_back(j % 3 == 0 ? static_cast<int32_t>(t % 4 + 1) : 0);
      const bool on = t % 2 == 1;
      pen.penalty_params.insert(pen.penalty_params.end(),
                                {on ? 1.3f + 0.4f * static_cast<float>(t % 3) : 1.f,
                                 on ? 0.4f : 0.f, on ? -0.15f * static_cast<float>(t % 3) : 0.f});
      const float* v = pen.penalty_params.data() + t * Ops::kPenaltyParams;
      cpu::penalize_row(penalised.data() + t * V, V, ids.data() + first,
                        pen.penalty_counts.data() + first, static_cast<int64_t>(ids.size() - first),
                        v[0], v[1], v[2]);
    }
    std::vector<int32_t> want_penalised(static_cast<size_t>(n));
    ops->sample(Tensor(want_penalised.data(), DType::kI32, {n}),
                Tensor(penalised.data(), DType::kF32, {n, V}),
                Tensor(params.data(), DType::kF32, {n, Ops::kSampleParams}));
    EXPECT_NE(want_penalised, want) << what << ": the penalties change no token";
    step(pen, got);
    EXPECT_EQ(got, want_penalised) << what << " penalised";
    expect_logprobs(want_penalised[1], " logprobs after penalties");
    // Malformed penalties are refused before anything runs.
    SamplePayload decreasing = pen;
    decreasing.penalty_offsets[2] = decreasing.penalty_offsets[1] - 1;
    EXPECT_THROW(sampler.run(*model, decreasing, got.data()), Error);
    SamplePayload no_penalty = pen;
    no_penalty.penalty_params[1 * Ops::kPenaltyParams] = 0.f;
    EXPECT_THROW(sampler.run(*model, no_penalty, got.data()), Error);
    SamplePayload infinite = pen;
    infinite.penalty_params[1 * Ops::kPenaltyParams + 2] = INFINITY;
    EXPECT_THROW(sampler.run(*model, infinite, got.data()), Error);
  }
}

TEST_F(ParallelModel, ImpossibleLayoutIsAClearError) {
  const ModelConfig config = ModelConfig::load(fixture_dirs().front().string());
  ParallelConfig pc;
  pc.world = world_->size();
  pc.rank = world_->rank();
  pc.tp = config.num_key_value_heads + 1;
  EXPECT_THROW(pc.validate(config.layout_shape()), Error);
  pc.tp = 1;
  pc.ep = config.num_local_experts + 1;
  EXPECT_THROW(pc.validate(config.layout_shape()), Error);
}

}  // namespace
}  // namespace sy
