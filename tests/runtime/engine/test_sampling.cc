// The step's sampling: the payload builder, and StepSampler against Sampler::sample (the host
// reference) on the model's own logits.
#include "runtime/engine/sampling.h"

#include <gtest/gtest.h>

#include <cmath>
#include <memory>

#include "kernels/cpu/ops.h"
#include "runtime/model/loader.h"

namespace sy {
namespace {

const std::string kModel = std::string(SY_FIXTURES_DIR) + "/sharded_bf16_tied";

// A one-sequence step over `prompt` with a logit row at each of its tokens.
struct Step {
  LoadedModel loaded;
  const ModelConfig& config;
  Model& model;
  StepBatch batch;

  explicit Step(const std::vector<int32_t>& prompt)
      : loaded(load_model(kModel, 32, 16, false)), config(loaded.config), model(*loaded.model) {
    const ModelLimits& limits = model.limits();
    std::vector<int32_t> table(static_cast<size_t>(limits.max_blocks_per_seq));
    for (size_t b = 0; b < table.size(); ++b) table[b] = static_cast<int32_t>(b);
    const int64_t width = limits.max_blocks_per_seq;
    batch.add_sequence(prompt.data(), 0, static_cast<int64_t>(prompt.size()), table.data(), width,
                       width, false);
    for (size_t i = 0; i < prompt.size(); ++i) batch.logit_rows.push_back(static_cast<int32_t>(i));
  }
  std::vector<float> host_logits() {
    model.forward(batch);
    std::vector<float> out(batch.logit_rows.size() * static_cast<size_t>(config.vocab_size));
    model.copy_logits(out.data());
    return out;
  }
};

SamplingParams kind(int k) {
  SamplingParams p;
  p.seed = 11 + static_cast<uint64_t>(k);
  if (k >= 1) p.temperature = 0.8f;
  if (k == 2) p.top_k = 5;
  if (k == 3) p.top_p = 0.7f;
  if (k >= 4) {
    p.repetition_penalty = 1.4f;
    p.presence_penalty = 0.5f;
    p.frequency_penalty = -0.3f;
    p.logit_bias = {{7, 5.f}, {9, -100.f}};
    p.min_tokens = 2;
  }
  return p;
}

TEST(SamplePayload, OneBuilderLaysOutEveryRow) {
  const std::vector<int32_t> context = {1, 5, 5, 9, 7};  // prompt of 3, then 2 generated
  Sampler plain(SamplingParams{}, 32, 3);
  Sampler penalised(kind(4), 32, 3, {2});
  std::vector<SampleRequest> rows = {
      {&plain, &context, 2, 0, -1}, {&penalised, &context, 1, 3, -1}, {nullptr, nullptr, 0, 40, 6}};
  SamplePayload p;
  p.build(rows, 32);
  ASSERT_EQ(p.n_rows(), 3);
  EXPECT_EQ(p.params[0], 0.f);                                    // greedy
  EXPECT_EQ(p.params[Ops::kSampleParams], 0.8f);                  // its temperature
  EXPECT_EQ(p.params[2 * Ops::kSampleParams], 0.f);               // a prompt row samples greedily
  EXPECT_EQ(p.bias_offsets, (std::vector<int32_t>{0, 0, 3, 3}));  // logit_bias + the end id's ban
  EXPECT_EQ(p.bias_ids, (std::vector<int32_t>{7, 9, 2}));
  EXPECT_EQ(p.bias_values[2], -INFINITY);  // one token generated, min_tokens 2
  EXPECT_EQ(p.penalty_offsets, (std::vector<int32_t>{0, 0, 4, 4}));
  EXPECT_EQ(p.penalty_ids, (std::vector<int32_t>{1, 5, 9, 7}));
  EXPECT_EQ(p.penalty_counts, (std::vector<int32_t>{0, 0, 1, 1}));
  EXPECT_EQ(p.penalty_params,
            (std::vector<float>{1.f, 0.f, 0.f, 1.4f, 0.5f, -0.3f, 1.f, 0.f, 0.f}));
  EXPECT_EQ(p.forced, (std::vector<int32_t>{-1, -1, 6}));
  EXPECT_EQ(p.logprob_rows, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(p.top, 32);  // at most the vocabulary
}

// Over three steps (one stream of draws each), every kind of row picks the token that
// Sampler::sample picks from the same logits.
TEST(StepSampler, PicksWhatTheHostSamplerPicks) {
  const std::vector<int32_t> prompt = {1, 17, 42, 99, 3, 250};
  Step s(prompt);
  const int64_t V = s.config.vocab_size;
  StepSampler step_sampler(s.model);
  std::vector<std::unique_ptr<Sampler>> host, device;
  std::vector<std::vector<int32_t>> contexts(prompt.size(), prompt);
  for (size_t i = 0; i < prompt.size(); ++i) {
    host.push_back(std::make_unique<Sampler>(kind(static_cast<int>(i)), V, prompt.size(),
                                             std::vector<int32_t>{2}));
    device.push_back(std::make_unique<Sampler>(kind(static_cast<int>(i)), V, prompt.size(),
                                               std::vector<int32_t>{2}));
  }
  for (int64_t step = 0; step < 3; ++step) {
    const std::vector<float> logits = s.host_logits();
    std::vector<int32_t> want(prompt.size()), got(prompt.size(), -1);
    for (size_t i = 0; i < prompt.size(); ++i)
      want[i] = host[i]->sample(logits.data() + static_cast<int64_t>(i) * V, contexts[i]);
    std::vector<SampleRequest> rows;
    for (size_t i = 0; i < prompt.size(); ++i)
      rows.push_back({device[i].get(), &contexts[i], step, 0, -1});
    s.model.forward(s.batch);
    step_sampler.sample(s.model, rows, got.data());
    EXPECT_EQ(got, want) << "step " << step;
    for (size_t i = 0; i < prompt.size(); ++i) contexts[i].push_back(want[i]);
  }
}

// A forced row takes its token, and its logprobs are of that token in the raw logits; a
// biased row's logprobs are too (taken before the biases).
TEST(StepSampler, ForcedRowsAndLogprobsOfTheRawLogits) {
  const std::vector<int32_t> prompt = {1, 17, 42};
  Step s(prompt);
  const int64_t V = s.config.vocab_size;
  StepSampler step_sampler(s.model);
  const std::vector<float> logits = s.host_logits();
  SamplingParams banned;
  banned.logit_bias = {{0, -100.f}};
  Sampler biased(banned, V, prompt.size());
  const std::vector<int32_t> context = prompt;
  std::vector<SampleRequest> rows = {
      {nullptr, nullptr, 0, 3, 42}, {nullptr, nullptr, 0, 0, -1}, {&biased, &context, 0, 2, -1}};
  std::vector<int32_t> got(3, -1);
  s.model.forward(s.batch);
  step_sampler.sample(s.model, rows, got.data());
  EXPECT_EQ(got[0], 42);
  std::vector<float> want(4);
  std::vector<int32_t> want_ids(3), order;
  for (int64_t row : {0, 2}) {
    const int64_t top = row == 0 ? 3 : 2;
    cpu::logprobs_row(logits.data() + row * V, V, got[static_cast<size_t>(row)], top, want.data(),
                      want_ids.data(), order);
    const TokenLogprobs lp = step_sampler.logprobs(row, top);
    EXPECT_EQ(lp.token_id, got[static_cast<size_t>(row)]);
    EXPECT_EQ(lp.logprob, want[0]) << "row " << row;
    for (int64_t k = 0; k < top; ++k) {
      EXPECT_EQ(lp.top[static_cast<size_t>(k)].token_id, want_ids[static_cast<size_t>(k)]);
      EXPECT_EQ(lp.top[static_cast<size_t>(k)].logprob, want[static_cast<size_t>(1 + k)]);
    }
  }
  EXPECT_THROW(step_sampler.logprobs(1, 1), Error);  // row 1 asked none
  // A payload for another step's row count is refused.
  std::vector<SampleRequest> two(2);
  EXPECT_THROW(step_sampler.sample(s.model, two, got.data()), Error);
}

}  // namespace
}  // namespace sy
