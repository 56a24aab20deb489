// Sampling: greedy, temperature, top-k, top-p, min-p, repetition, presence and frequency
// penalties, logit biases and min_tokens, seeds.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>

#include "kernels/error.h"
#include "kernels/ops.h"
#include "runtime/engine/sampler.h"

namespace sy {
namespace {

std::vector<float> logits_of(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(static_cast<float>(std::log(p)));
  return l;
}

std::map<int32_t, int> histogram(SamplingParams p, const std::vector<float>& logits, int n,
                                 const std::vector<int32_t>& context = {}) {
  Sampler s(p, static_cast<int64_t>(logits.size()), context.size());
  std::map<int32_t, int> h;
  for (int i = 0; i < n; ++i) ++h[s.sample(logits.data(), context)];
  return h;
}

TEST(Sampler, GreedyIsArgmax) {
  SamplingParams p;
  Sampler s(p, 5, 0);
  std::vector<float> l = {0.1f, 2.f, -1.f, 1.9f, 0.f};
  EXPECT_EQ(s.sample(l.data(), {}), 1);
  // A temperature below the epsilon is greedy, with no draw (l / t would overflow), and a NaN
  // logit ranks last.
  p.temperature = 1e-39f;
  p.seed = 3;
  Sampler tiny(p, 5, 0);
  std::vector<float> m = {5.f, NAN, 20.f, 19.f, -1.f};
  EXPECT_EQ(tiny.sample(m.data(), {}), 2);
  float params[Ops::kSampleParams];
  tiny.device_params(params);
  EXPECT_EQ(params[0], 0.f);
  EXPECT_EQ(params[4] + params[5], 0.f) << "no draw";
  std::vector<float> first_nan = {NAN, 1.f, 3.f, 2.f, 0.f};
  EXPECT_EQ(s.sample(first_nan.data(), {}), 2);
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
  Sampler s(p, 3, 2), t(p, 3, 1);
  // 3.0 / 2 = 1.5 < 2.0: token 0 (in context) loses to token 1.
  std::vector<float> l = {3.f, 2.f, -1.f};
  EXPECT_EQ(s.sample(l.data(), {0, 0}), 1);
  // Negative logits are multiplied: -0.5 * 2 = -1 < -0.8.
  std::vector<float> m = {-0.5f, -0.8f, -3.f};
  EXPECT_EQ(t.sample(m.data(), {0}), 1);
  // The context grows between calls; a shorter one is refused.
  EXPECT_THROW(s.sample(l.data(), {0}), Error);
}

// Logit biases are added before the penalties; min_tokens bans the end ids until that many tokens
// were generated, over any bias of theirs.
TEST(Sampler, LogitBiasThenPenaltiesAndMinTokensBans) {
  std::vector<float> l = {1.f, 2.f, 0.5f, 0.f};
  SamplingParams p;
  p.logit_bias = {{2, 1.75f}, {1, -100.f}};
  Sampler s(p, 4, 1);
  EXPECT_EQ(s.sample(l.data(), {3}), 2);  // 0.5 + 1.75 = 2.25 > 1.0; token 1 all but banned
  // The bias comes before the repetition penalty: token 3 (in the context) at -1 + 1.5 = 0.5,
  // halved to 0.25, beats token 2's 0; penalised first it would be -1 * 2 + 1.5 = -0.5.
  std::vector<float> m = {-5.f, -5.f, 0.f, -1.f};
  SamplingParams r;
  r.logit_bias = {{3, 1.5f}};
  r.repetition_penalty = 2.f;
  Sampler u(r, 4, 1);
  EXPECT_EQ(u.sample(m.data(), {3}), 3);
  // min_tokens 2 with end ids {1, 3}: both banned for the first two tokens, even with a bias of
  // +100; the third may end.
  SamplingParams e;
  e.min_tokens = 2;
  e.logit_bias = {{3, 100.f}};
  Sampler v(e, 4, 1, {1, 3, 9});  // 9 is outside the vocabulary: skipped
  EXPECT_EQ(v.bias_list(0).ids, (std::vector<int32_t>{3, 1}));
  EXPECT_TRUE(std::isinf(v.bias_list(0).values[0]) && v.bias_list(0).values[0] < 0);
  EXPECT_EQ(v.bias_list(2).ids, (std::vector<int32_t>{3}));
  EXPECT_EQ(v.bias_list(2).values, (std::vector<float>{100.f}));
  EXPECT_EQ(v.sample(l.data(), {0}), 0);        // 1 and 3 banned: 0 (1.0) beats 2 (0.5)
  EXPECT_EQ(v.sample(l.data(), {0, 0}), 0);     // one generated: still banned
  EXPECT_EQ(v.sample(l.data(), {0, 0, 0}), 3);  // two generated: the bias takes token 3
  SamplingParams w;
  w.temperature = 1.f;
  w.min_tokens = 1;
  w.seed = 4;
  EXPECT_EQ(histogram(w, l, 2000, {}).count(1), 1u) << "no end ids: nothing banned";
  Sampler x(w, 4, 0, {1});
  for (int i = 0; i < 500; ++i) EXPECT_NE(x.sample(l.data(), {}), 1);
}

TEST(Sampler, BadLogitBiasNamesTheToken) {
  auto message = [](SamplingParams p, int64_t vocab = 8) -> std::string {
    try {
      Sampler s(p, vocab, 1);
    } catch (const Error& e) {
      return e.message();
    }
    return "";
  };
  SamplingParams p;
  p.logit_bias = {{3, 101.f}};
  EXPECT_EQ(message(p), "logit_bias: 101 for token 3 outside [-100, 100]");
  p.logit_bias = {{3, NAN}};
  EXPECT_NE(message(p).find("for token 3 outside"), std::string::npos);
  p.logit_bias = {{3, 1.f}, {5, 2.f}, {3, -1.f}};
  EXPECT_EQ(message(p), "logit_bias: token 3 given twice");
  p.logit_bias = {{-2, 1.f}};
  EXPECT_EQ(message(p), "logit_bias: token id -2 is negative");
  p.logit_bias = {{8, 1.f}};
  EXPECT_EQ(message(p), "logit_bias: token id 8 outside the vocabulary of 8");
  p.logit_bias.clear();
  for (int32_t i = 0; i <= SamplingParams::kMaxLogitBias; ++i) p.logit_bias.emplace_back(i, 0.f);
  EXPECT_EQ(message(p, 4096), "logit_bias: 1025 tokens (at most 1024)");
  p.logit_bias.clear();
  p.min_tokens = -1;
  EXPECT_EQ(message(p), "min_tokens -1 must be >= 0");
}

// Presence and frequency penalties as OpenAI's and vLLM's: subtracted from the logits of tokens
// generated so far (after the repetition penalty), never of prompt-only tokens.
TEST(Sampler, PresenceAndFrequencyPenaltiesCountGeneratedTokensOnly) {
  SamplingParams p;
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  Sampler s(p, 4, 3);
  // The prompt {2, 2, 0}: no count; token 2 leads.
  std::vector<float> l = {1.1f, 1.2f, 2.f, 0.f};
  std::vector<int32_t> context = {2, 2, 0};
  EXPECT_EQ(s.sample(l.data(), context), 2);
  // Token 2 generated once: 2 - (0.5 + 0.25) = 1.25 > 1.2, still first.
  context.push_back(2);
  EXPECT_EQ(s.sample(l.data(), context), 2);
  // Twice: 2 - (0.5 + 0.5) = 1.0 < 1.2: token 1.
  context.push_back(2);
  EXPECT_EQ(s.sample(l.data(), context), 1);
  const PenaltyContext& pc = s.penalty_context(context);
  EXPECT_EQ(pc.ids, (std::vector<int32_t>{2, 0}));
  EXPECT_EQ(pc.counts, (std::vector<int32_t>{2, 0}));
  // Token 1 generated three times: 1.2 - (0.5 + 0.75) = -0.05; token 0, a prompt token, is not
  // penalised (1.1), and leads token 2 (1.0).
  for (int i = 0; i < 3; ++i) context.push_back(1);
  EXPECT_EQ(s.sample(l.data(), context), 0);
  EXPECT_EQ(pc.ids, (std::vector<int32_t>{2, 0, 1}));
  EXPECT_EQ(pc.counts, (std::vector<int32_t>{2, 0, 3}));
  // A negative presence penalty encourages the tokens generated.
  SamplingParams q;
  q.presence_penalty = -1.f;
  Sampler e(q, 4, 1);
  EXPECT_EQ(e.sample(l.data(), {3, 1}), 1);  // 1.2 + 1 = 2.2 > 2.0
  // The repetition penalty first, on prompt tokens too: token 2 (generated) (2 / 2) - 0.5 = 0.5,
  // token 0 (prompt) 1.1 / 2 = 0.55; token 1 (1.2) leads.
  SamplingParams r;
  r.repetition_penalty = 2.f;
  r.presence_penalty = 0.5f;
  Sampler t(r, 4, 2);
  EXPECT_EQ(t.sample(l.data(), {0, 3, 2}), 1);
}

// The device path of a penalised sampler (penalty_context and penalty_params, Ops::penalize,
// then Ops::sample with device_params) gives sample()'s tokens, step by step of a growing
// context: here on the CPU backend's ops, on the GPU in the engine checks.
TEST(Sampler, PenaltyContextAndOpsMatchTheHostSampler) {
  auto ops = make_cpu_ops();
  const int64_t vocab = 50;
  for (float temperature : {0.f, 0.8f}) {
    SamplingParams p;
    p.repetition_penalty = 1.7f;
    p.presence_penalty = 0.3f;
    p.frequency_penalty = 0.2f;
    p.temperature = temperature;
    p.top_k = 20;
    p.seed = 9;
    std::vector<int32_t> context = {1, 7, 7, 3, 1, 49};
    const size_t n_prompt = context.size();
    Sampler host_side(p, vocab, n_prompt), device_side(p, vocab, n_prompt);
    std::vector<float> logits(vocab), scratch(vocab), params(Ops::kSampleParams);
    for (int step = 0; step < 40; ++step) {
      for (int64_t v = 0; v < vocab; ++v)
        logits[v] = std::sin(static_cast<float>(v * 13 + step)) * 3.f;
      const int32_t want = host_side.sample(logits.data(), context);
      const PenaltyContext& pc = device_side.penalty_context(context);
      std::set<int32_t> distinct(context.begin(), context.end());
      ASSERT_EQ(pc.ids.size(), distinct.size()) << "step " << step;
      ASSERT_EQ(std::set<int32_t>(pc.ids.begin(), pc.ids.end()), distinct) << "step " << step;
      for (size_t j = 0; j < pc.ids.size(); ++j)
        ASSERT_EQ(pc.counts[j], std::count(context.begin() + static_cast<std::ptrdiff_t>(n_prompt),
                                           context.end(), pc.ids[j]))
            << "step " << step << ", id " << pc.ids[j];
      scratch = logits;
      std::vector<int32_t> offsets = {0, static_cast<int32_t>(pc.ids.size())};
      std::vector<int32_t> id_copy = pc.ids, count_copy = pc.counts;
      float penalty[Ops::kPenaltyParams];
      device_side.penalty_params(penalty);
      int32_t got = -1;
      device_side.device_params(params.data());
      ops->penalize(Tensor(scratch.data(), DType::kF32, {1, vocab}),
                    Tensor(offsets.data(), DType::kI32, {2}),
                    Tensor(id_copy.data(), DType::kI32, {offsets[1]}),
                    Tensor(count_copy.data(), DType::kI32, {offsets[1]}),
                    Tensor(penalty, DType::kF32, {1, Ops::kPenaltyParams}));
      ops->sample(Tensor(&got, DType::kI32, {1}), Tensor(scratch.data(), DType::kF32, {1, vocab}),
                  Tensor(params.data(), DType::kF32, {1, Ops::kSampleParams}));
      ASSERT_EQ(got, want) << "step " << step << ", temperature " << temperature;
      context.push_back(want);
    }
    // The context only grows: a shorter one is refused.
    EXPECT_THROW(device_side.penalty_context({1, 2}), Error);
  }
}

TEST(Sampler, SameSeedSameTokens) {
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_p = 0.95f;
  p.seed = 42;
  std::vector<float> l(100);
  for (int i = 0; i < 100; ++i) l[i] = std::sin(i * 0.7f) * 3.f;
  Sampler a(p, 100, 0), b(p, 100, 0);
  std::vector<int32_t> ta, tb;
  for (int i = 0; i < 50; ++i) {
    ta.push_back(a.sample(l.data(), ta));
    tb.push_back(b.sample(l.data(), tb));
  }
  EXPECT_EQ(ta, tb);
  p.seed = 43;
  Sampler c(p, 100, 0);
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
  p.presence_penalty = 2.5f;
  expect_error(p, "presence_penalty");
  p = {};
  p.frequency_penalty = -3.f;
  expect_error(p, "frequency_penalty");
  p = {};
  p.frequency_penalty = NAN;
  expect_error(p, "frequency_penalty");
  p = {};
  p.temperature = NAN;
  expect_error(p, "temperature");
}

}  // namespace
}  // namespace sy
