// Elementwise comparison for kernel tests: |got - want| <= atol + rtol * |want|. On failure it
// prints the first 10 mismatches and one summary line, and the test fails.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace sy::test {

inline int64_t count_mismatches(const std::string& what, const float* got, const double* want,
                                int64_t n, double atol, double rtol) {
  int64_t n_wrong = 0;
  double max_err = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    max_err = std::fmax(max_err, err);
    if (!(err <= atol + rtol * std::fabs(want[i]))) {
      if (n_wrong < 10)
        std::printf("  %s[%lld]: got %.8g want %.8g (err %.3g)\n", what.c_str(),
                    static_cast<long long>(i), got[i], want[i], err);
      ++n_wrong;
    }
  }
  if (n_wrong > 0)
    std::printf("%s: %lld of %lld wrong, max abs err %.3g\n", what.c_str(),
                static_cast<long long>(n_wrong), static_cast<long long>(n), max_err);
  return n_wrong;
}

inline void expect_close(const std::string& what, const std::vector<float>& got,
                         const std::vector<double>& want, double atol, double rtol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  EXPECT_EQ(
      count_mismatches(what, got.data(), want.data(), static_cast<int64_t>(got.size()), atol, rtol),
      0)
      << what;
}

inline std::vector<float> random_vector(size_t n, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// For each row of `vocab` values, the largest |got - want| relative to the row's largest |want|
// (the logits budgets of the model tests).
inline std::vector<double> row_rel_errors(const std::vector<float>& got,
                                          const std::vector<float>& want, int64_t vocab) {
  std::vector<double> errors;
  for (size_t r = 0; (r + 1) * vocab <= want.size() && (r + 1) * vocab <= got.size(); ++r) {
    double scale = 1e-30, worst = 0;
    for (int64_t v = 0; v < vocab; ++v)
      scale = std::max(scale, std::fabs(double(want[r * vocab + v])));
    for (int64_t v = 0; v < vocab; ++v)
      worst = std::max(worst, std::fabs(double(got[r * vocab + v]) - want[r * vocab + v]) / scale);
    errors.push_back(worst);
  }
  return errors;
}

// The largest of row_rel_errors.
inline double max_rel_error(const std::vector<float>& got, const std::vector<float>& want,
                            int64_t vocab) {
  const std::vector<double> e = row_rel_errors(got, want, vocab);
  return e.empty() ? 0.0 : *std::max_element(e.begin(), e.end());
}

}  // namespace sy::test
