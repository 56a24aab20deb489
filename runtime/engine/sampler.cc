// Token sampling (see sampler.h).
#include "runtime/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "kernels/cpu/ops.h"
#include "kernels/error.h"
#include "kernels/ops.h"

namespace sy {

void SamplingParams::validate() const {
  SY_CHECK(std::isfinite(temperature) && temperature >= 0.f && temperature <= 100.f, "temperature ",
           temperature, " outside [0, 100]");
  SY_CHECK(top_k >= 0, "top_k ", top_k, " must be >= 0");
  SY_CHECK(std::isfinite(top_p) && top_p > 0.f && top_p <= 1.f, "top_p ", top_p, " outside (0, 1]");
  SY_CHECK(std::isfinite(min_p) && min_p >= 0.f && min_p <= 1.f, "min_p ", min_p,
           " outside [0, 1]");
  SY_CHECK(
      std::isfinite(repetition_penalty) && repetition_penalty > 0.f && repetition_penalty <= 100.f,
      "repetition_penalty ", repetition_penalty, " outside (0, 100]");
  SY_CHECK(std::isfinite(presence_penalty) && std::fabs(presence_penalty) <= 2.f,
           "presence_penalty ", presence_penalty, " outside [-2, 2]");
  SY_CHECK(std::isfinite(frequency_penalty) && std::fabs(frequency_penalty) <= 2.f,
           "frequency_penalty ", frequency_penalty, " outside [-2, 2]");
  SY_CHECK(min_tokens >= 0, "min_tokens ", min_tokens, " must be >= 0");
  SY_CHECK(static_cast<int64_t>(logit_bias.size()) <= kMaxLogitBias,
           "logit_bias: ", logit_bias.size(), " tokens (at most ", kMaxLogitBias, ")");
  std::vector<int32_t> ids;
  for (const auto& [id, value] : logit_bias) {
    SY_CHECK(id >= 0, "logit_bias: token id ", id, " is negative");
    SY_CHECK(std::isfinite(value) && std::fabs(value) <= 100.f, "logit_bias: ", value,
             " for token ", id, " outside [-100, 100]");
    ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  const auto twice = std::adjacent_find(ids.begin(), ids.end());
  SY_CHECK(twice == ids.end(), "logit_bias: token ", twice == ids.end() ? 0 : *twice,
           " given twice");
}

Sampler::Sampler(const SamplingParams& params, int64_t vocab_size, size_t n_prompt,
                 const std::vector<int32_t>& end_ids)
    : params_(params),
      vocab_size_(vocab_size),
      rng_(params.seed),
      scores_(static_cast<size_t>(vocab_size)),
      order_(static_cast<size_t>(vocab_size)),
      n_prompt_(n_prompt) {
  params_.validate();
  // Greedy, and no draw, below the sampler's epsilon (Ops::kGreedyTemperature).
  if (params_.temperature < Ops::kGreedyTemperature) params_.temperature = 0.f;
  for (const auto& [id, value] : params_.logit_bias) {
    SY_CHECK(id < vocab_size, "logit_bias: token id ", id, " outside the vocabulary of ",
             vocab_size);
    bias_.ids.push_back(id);
    bias_.values.push_back(value);
  }
  held_back_ = bias_;
  if (params_.min_tokens > 0) {
    for (int32_t id : end_ids) {
      if (id < 0 || id >= vocab_size) continue;
      const auto at = std::find(held_back_.ids.begin(), held_back_.ids.end(), id);
      if (at != held_back_.ids.end()) {
        held_back_.values[static_cast<size_t>(at - held_back_.ids.begin())] = -INFINITY;
      } else {
        held_back_.ids.push_back(id);
        held_back_.values.push_back(-INFINITY);
      }
    }
  }
}

int32_t Sampler::sample(const float* logits, const std::vector<int32_t>& context) {
  const size_t V = static_cast<size_t>(vocab_size_);
  std::copy(logits, logits + V, scores_.begin());
  const size_t n_generated = context.size() > n_prompt_ ? context.size() - n_prompt_ : 0;
  const BiasList& bias = bias_list(static_cast<int64_t>(n_generated));
  cpu::bias_row(scores_.data(), vocab_size_, bias.ids.data(), bias.values.data(),
                static_cast<int64_t>(bias.ids.size()));
  if (penalised()) {  // each distinct context token once
    const PenaltyContext& pc = penalty_context(context);
    cpu::penalize_row(scores_.data(), vocab_size_, pc.ids.data(), pc.counts.data(),
                      static_cast<int64_t>(pc.ids.size()), params_.repetition_penalty,
                      params_.presence_penalty, params_.frequency_penalty);
  }
  const double u = params_.temperature == 0.f ? 0.0 : draw();
  return cpu::sample_row(scores_.data(), vocab_size_, params_.temperature, params_.top_k,
                         params_.top_p, params_.min_p, u, order_);
}

double Sampler::draw() {
  // 53 random bits, carried as two floats (hi + lo) as the GPU sampler receives them, so that
  // host and device draws are the same number.
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;
  const float hi = static_cast<float>(u);
  const float lo = static_cast<float>(u - static_cast<double>(hi));
  return static_cast<double>(hi) + static_cast<double>(lo);
}

const PenaltyContext& Sampler::penalty_context(const std::vector<int32_t>& context) {
  SY_CHECK(context.size() >= noted_, "penalty_context: a context of ", context.size(),
           " tokens after one of ", noted_);
  if (slot_.empty()) slot_.assign(static_cast<size_t>(vocab_size_), -1);
  for (; noted_ < context.size(); ++noted_) {
    const int32_t id = context[noted_];
    if (id < 0 || id >= vocab_size_) continue;
    int32_t& slot = slot_[static_cast<size_t>(id)];
    if (slot < 0) {
      slot = static_cast<int32_t>(penalty_.ids.size());
      penalty_.ids.push_back(id);
      penalty_.counts.push_back(0);
    }
    if (noted_ >= n_prompt_) ++penalty_.counts[static_cast<size_t>(slot)];
  }
  return penalty_;
}

void Sampler::penalty_params(float* out) const {
  out[0] = params_.repetition_penalty;
  out[1] = params_.presence_penalty;
  out[2] = params_.frequency_penalty;
}

void Sampler::device_params(float* out) {
  const double u = params_.temperature == 0.f ? 0.0 : draw();
  const float hi = static_cast<float>(u);
  out[0] = params_.temperature;
  out[1] = static_cast<float>(params_.top_k);
  out[2] = params_.top_p;
  out[3] = params_.min_p;
  out[4] = hi;
  out[5] = static_cast<float>(u - static_cast<double>(hi));
}

}  // namespace sy
