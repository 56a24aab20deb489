// Token sampling (see sampler.h).
#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "kernels/error.h"

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
}

Sampler::Sampler(const SamplingParams& params, int64_t vocab_size)
    : params_(params),
      vocab_size_(vocab_size),
      rng_(params.seed),
      scores_(static_cast<size_t>(vocab_size)),
      order_(static_cast<size_t>(vocab_size)),
      seen_(static_cast<size_t>(vocab_size)) {
  params_.validate();
}

int32_t Sampler::sample(const float* logits, const std::vector<int32_t>& context) {
  const size_t V = static_cast<size_t>(vocab_size_);
  std::copy(logits, logits + V, scores_.begin());
  if (params_.repetition_penalty != 1.f) {
    // As Hugging Face: each distinct context token once; divide positive logits, multiply
    // negative ones.
    std::fill(seen_.begin(), seen_.end(), 0);
    for (int32_t id : context) {
      if (id < 0 || static_cast<size_t>(id) >= V || seen_[id]) continue;
      seen_[id] = 1;
      float& s = scores_[id];
      s = s > 0 ? s / params_.repetition_penalty : s * params_.repetition_penalty;
    }
  }
  if (params_.temperature == 0.f) {
    return static_cast<int32_t>(std::max_element(scores_.begin(), scores_.end()) - scores_.begin());
  }
  for (float& s : scores_) s /= params_.temperature;

  // Candidates sorted by score (descending); ties keep the lower id first.
  std::iota(order_.begin(), order_.end(), 0);
  size_t n = V;
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < V) {
    n = static_cast<size_t>(params_.top_k);
    std::partial_sort(order_.begin(), order_.begin() + static_cast<std::ptrdiff_t>(n), order_.end(),
                      [&](int32_t a, int32_t b) {
                        return scores_[a] > scores_[b] || (scores_[a] == scores_[b] && a < b);
                      });
  } else {
    std::sort(order_.begin(), order_.end(), [&](int32_t a, int32_t b) {
      return scores_[a] > scores_[b] || (scores_[a] == scores_[b] && a < b);
    });
  }
  // Softmax over the candidates, in double for the cumulative sums.
  const double max_s = scores_[order_[0]];
  double total = 0;
  for (size_t i = 0; i < n; ++i) total += std::exp(static_cast<double>(scores_[order_[i]]) - max_s);
  auto prob = [&](size_t i) {
    return std::exp(static_cast<double>(scores_[order_[i]]) - max_s) / total;
  };
  if (params_.top_p < 1.f) {
    // Keep the smallest prefix whose probability reaches top_p (at least one token).
    double cum = 0;
    size_t keep = 0;
    while (keep < n) {
      cum += prob(keep);
      ++keep;
      if (cum >= params_.top_p) break;
    }
    n = keep;
  }
  if (params_.min_p > 0.f) {
    const double threshold = params_.min_p * prob(0);
    size_t keep = 1;
    while (keep < n && prob(keep) >= threshold) ++keep;
    n = keep;
  }
  double kept = 0;
  for (size_t i = 0; i < n; ++i) kept += prob(i);
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * kept;
  double cum = 0;
  for (size_t i = 0; i < n; ++i) {
    cum += prob(i);
    if (u < cum) return order_[i];
  }
  return order_[n - 1];
}

}  // namespace sy
