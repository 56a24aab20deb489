// Sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeds.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>

#include "kernels/error.h"
#include "kernels/ops.h"
#include "runtime/sampler.h"

namespace sy {
namespace {

std::vector<float> logits_of(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(static_cast<float>(std::log(p)));
  return l;
}

std::map<int32_t, int> histogram(SamplingParams p, const std::vector<float>& logits, int n,
                                 const std::vector<int32_t>& context = {}) {
  Sampler s(p, static_cast<int64_t>(logits.size()));
  std::map<int32_t, int> h;
  for (int i = 0; i < n; ++i) ++h[s.sample(logits.data(), context)];
  return h;
}

TEST(Sampler, GreedyIsArgmax) {
  SamplingParams p;
  Sampler s(p, 5);
  std::vector<float> l = {0.1f, 2.f, -1.f, 1.9f, 0.f};
  EXPECT_EQ(s.sample(l.data(), {}), 1);
}

TEST(Sampler, TemperatureFollowsTheDistribution) {
  SamplingParams p;
  p.temperature = 1.f;
  p.seed = 3;
  auto h = histogram(p, logits_of({0.5, 0.3, 0.2}), 20000);
  EXPECT_NEAR(h[0] / 20000.0, 0.5, 0.02);
  EXPECT_NEAR(h[1] / 20000.0, 0.3, 0.02);
  EXPECT_NEAR(h[2] / 20000.0, 0.2, 0.02);
}

TEST(Sampler, TopKTopPMinPRestrictTheSupport) {
  const auto l = logits_of({0.4, 0.3, 0.2, 0.06, 0.04});
  SamplingParams p;
  p.temperature = 1.f;
  p.top_k = 2;
  auto h = histogram(p, l, 4000);
  EXPECT_EQ(h.size(), 2u);
  EXPECT_NEAR(h[0] / 4000.0, 0.4 / 0.7, 0.03);
  p = SamplingParams{};
  p.temperature = 1.f;
  p.top_p = 0.85f;  // 0.4 + 0.3 + 0.2 = 0.9 >= 0.85: three tokens
  h = histogram(p, l, 4000);
  EXPECT_EQ(h.size(), 3u);
  p = SamplingParams{};
  p.temperature = 1.f;
  p.min_p = 0.4f;  // threshold 0.16: tokens 0, 1, 2
  h = histogram(p, l, 4000);
  EXPECT_EQ(h.size(), 3u);
  EXPECT_EQ(h.count(3), 0u);
}

TEST(Sampler, RepetitionPenaltyAsHuggingFace) {
  SamplingParams p;
  p.repetition_penalty = 2.f;
  Sampler s(p, 3), t(p, 3);
  // 3.0 / 2 = 1.5 < 2.0: token 0 (in context) loses to token 1.
  std::vector<float> l = {3.f, 2.f, -1.f};
  EXPECT_EQ(s.sample(l.data(), {0, 0}), 1);
  // Negative logits are multiplied: -0.5 * 2 = -1 < -0.8.
  std::vector<float> m = {-0.5f, -0.8f, -3.f};
  EXPECT_EQ(t.sample(m.data(), {0}), 1);
  // The context grows between calls; a shorter one is refused.
  EXPECT_THROW(s.sample(l.data(), {0}), Error);
}

// The device path of a penalised sampler (penalty_ids, Ops::repetition_penalty, then Ops::sample
// with device_params) gives sample()'s tokens, step by step of a growing context: here on the
// CPU backend's ops, on the GPU in the engine checks.
TEST(Sampler, PenaltyIdsAndOpsMatchTheHostSampler) {
  auto ops = make_cpu_ops();
  const int64_t vocab = 50;
  for (float temperature : {0.f, 0.8f}) {
    SamplingParams p;
    p.repetition_penalty = 1.7f;
    p.temperature = temperature;
    p.top_k = 20;
    p.seed = 9;
    Sampler host_side(p, vocab), device_side(p, vocab);
    std::vector<int32_t> context = {1, 7, 7, 3, 1, 49};
    std::vector<float> logits(vocab), scratch(vocab), params(Ops::kSampleParams);
    for (int step = 0; step < 40; ++step) {
      for (int64_t v = 0; v < vocab; ++v)
        logits[v] = std::sin(static_cast<float>(v * 13 + step)) * 3.f;
      const int32_t want = host_side.sample(logits.data(), context);
      const std::vector<int32_t>& ids = device_side.penalty_ids(context);
      std::set<int32_t> distinct(context.begin(), context.end());
      ASSERT_EQ(ids.size(), distinct.size()) << "step " << step;
      ASSERT_EQ(std::set<int32_t>(ids.begin(), ids.end()), distinct) << "step " << step;
      scratch = logits;
      std::vector<int32_t> offsets = {0, static_cast<int32_t>(ids.size())};
      std::vector<int32_t> id_copy = ids;
      float penalty = p.repetition_penalty;
      int32_t got = -1;
      device_side.device_params(params.data());
      ops->repetition_penalty(
          Tensor(scratch.data(), DType::kF32, {1, vocab}), Tensor(offsets.data(), DType::kI32, {2}),
          Tensor(id_copy.data(), DType::kI32, {offsets[1]}), Tensor(&penalty, DType::kF32, {1}));
      ops->sample(Tensor(&got, DType::kI32, {1}), Tensor(scratch.data(), DType::kF32, {1, vocab}),
                  Tensor(params.data(), DType::kF32, {1, Ops::kSampleParams}));
      ASSERT_EQ(got, want) << "step " << step << ", temperature " << temperature;
      context.push_back(want);
    }
    // The context only grows: a shorter one is refused.
    EXPECT_THROW(device_side.penalty_ids({1, 2}), Error);
  }
}

TEST(Sampler, SameSeedSameTokens) {
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_p = 0.95f;
  p.seed = 42;
  std::vector<float> l(100);
  for (int i = 0; i < 100; ++i) l[i] = std::sin(i * 0.7f) * 3.f;
  Sampler a(p, 100), b(p, 100);
  std::vector<int32_t> ta, tb;
  for (int i = 0; i < 50; ++i) {
    ta.push_back(a.sample(l.data(), ta));
    tb.push_back(b.sample(l.data(), tb));
  }
  EXPECT_EQ(ta, tb);
  p.seed = 43;
  Sampler c(p, 100);
  std::vector<int32_t> tc;
  for (int i = 0; i < 50; ++i) tc.push_back(c.sample(l.data(), tc));
  EXPECT_NE(ta, tc);
}

TEST(Sampler, InvalidParamsNameTheField) {
  auto expect_error = [](SamplingParams p, const char* what) {
    try {
      p.validate();
      ADD_FAILURE() << "accepted " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  SamplingParams p;
  p.temperature = -1.f;
  expect_error(p, "temperature");
  p = {};
  p.top_p = 0.f;
  expect_error(p, "top_p");
  p = {};
  p.min_p = 1.5f;
  expect_error(p, "min_p");
  p = {};
  p.top_k = -2;
  expect_error(p, "top_k");
  p = {};
  p.repetition_penalty = 0.f;
  expect_error(p, "repetition_penalty");
  p = {};
  p.temperature = NAN;
  expect_error(p, "temperature");
}

}  // namespace
}  // namespace sy
