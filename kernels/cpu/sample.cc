// Sampling of one row of scores in Hugging Face generate()'s order: temperature, top-k, top-p,
// min-p, then a draw; greedy (the lowest id among the largest) when the temperature is 0. The
// reference of the GPU sampler and the body of runtime/sampler.cc's Sampler.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "kernels/cpu/ops.h"

namespace sy::cpu {

void bias_row(float* scores, int64_t vocab, const int32_t* ids, const float* values, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (ids[j] >= 0 && ids[j] < vocab) scores[ids[j]] += values[j];
}

void penalize_row(float* scores, int64_t vocab, const int32_t* ids, const int32_t* counts,
                  int64_t n, float repetition, float presence, float frequency) {
  for (int64_t j = 0; j < n; ++j) {
    const int32_t id = ids[j];
    if (id < 0 || id >= vocab) continue;
    float& s = scores[id];
    s = s > 0 ? s / repetition : s * repetition;
    const int32_t c = counts[j];
    s -= std::fma(frequency, static_cast<float>(c), c > 0 ? presence : 0.f);
  }
}

void logprobs_row(const float* logits, int64_t vocab, int32_t chosen, int64_t top,
                  float* out_logprobs, int32_t* out_ids, std::vector<int32_t>& order) {
  float max_l = logits[0];
  for (int64_t v = 1; v < vocab; ++v) max_l = std::max(max_l, logits[v]);
  double sum = 0;
  for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(logits[v] - max_l));
  const double lse = static_cast<double>(max_l) + std::log(sum);
  out_logprobs[0] = static_cast<float>(static_cast<double>(logits[chosen]) - lse);
  order.resize(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + top, order.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  for (int64_t i = 0; i < top; ++i) {
    out_ids[i] = order[static_cast<size_t>(i)];
    out_logprobs[1 + i] = static_cast<float>(static_cast<double>(logits[out_ids[i]]) - lse);
  }
}

int32_t sample_row(float* scores, int64_t vocab, float temperature, int64_t top_k, float top_p,
                   float min_p, double u, std::vector<int32_t>& order) {
  const size_t V = static_cast<size_t>(vocab);
  for (size_t i = 0; i < V; ++i)
    if (std::isnan(scores[i])) scores[i] = -INFINITY;  // ranks last (Ops::sample)
  if (temperature < Ops::kGreedyTemperature)
    return static_cast<int32_t>(std::max_element(scores, scores + V) - scores);
  for (size_t i = 0; i < V; ++i) scores[i] /= temperature;
  // Candidates sorted by score (descending); ties keep the lower id first.
  order.resize(V);
  std::iota(order.begin(), order.end(), 0);
  auto before = [&](int32_t a, int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  };
  size_t n = V;
  if (top_k > 0 && static_cast<size_t>(top_k) < V) {
    n = static_cast<size_t>(top_k);
    std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(n), order.end(),
                      before);
  } else {
    std::sort(order.begin(), order.end(), before);
  }
  // Softmax over the candidates, in double for the cumulative sums.
  const double max_s = scores[order[0]];
  double total = 0;
  for (size_t i = 0; i < n; ++i) total += std::exp(static_cast<double>(scores[order[i]]) - max_s);
  auto prob = [&](size_t i) {
    return std::exp(static_cast<double>(scores[order[i]]) - max_s) / total;
  };
  if (top_p < 1.f) {
    // Keep the smallest prefix whose probability reaches top_p (at least one token).
    double cum = 0;
    size_t keep = 0;
    while (keep < n) {
      cum += prob(keep);
      ++keep;
      if (cum >= top_p) break;
    }
    n = keep;
  }
  if (min_p > 0.f) {
    const double threshold = min_p * prob(0);
    size_t keep = 1;
    while (keep < n && prob(keep) >= threshold) ++keep;
    n = keep;
  }
  double kept = 0;
  for (size_t i = 0; i < n; ++i) kept += prob(i);
  const double target = u * kept;
  double cum = 0;
  for (size_t i = 0; i < n; ++i) {
    cum += prob(i);
    if (target < cum) return order[i];
  }
  return order[n - 1];
}

}  // namespace sy::cpu
