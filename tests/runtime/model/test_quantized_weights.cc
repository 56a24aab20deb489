// Weights quantized at load (--weights) against the same checkpoint held in f32: for each type,
// the prompt's logits within that type's bound, on tests/common/tiny_checkpoint.h (hidden 256,
// so every linear weight holds whole blocks of every type, Q4_K's 256 included).
//
// Each type's error is the largest |logit error| over the row's largest |logit| against f32,
// for the rows of a 20-token prompt before the first token the quantized run routes to other
// experts than f32 does (tests/common/routing.h: from there on the two compute different
// functions), and for the median row; the share of re-routed (token, layer) decisions is bounded
// too. The checkpoint is stored in bf16, so bf16 and f16 hold its values exactly and differ from
// f32 only in rounding order; the block types quantize weights and activations (8-bit blocks),
// and through random layers their error grows with the step of the weights' grid: Q8_0 at 8 bits,
// Q4_K and Q4_0 at 4 bits. A wrong block layout or scale gives errors of the order of the logits
// themselves (> 1) and re-routes most decisions. How close the 4-bit kernels are to f32
// arithmetic on the same dequantized weights is tested on llama.cpp's own Q4_K_M file
// (test_gguf_model.cc). Measured (GCC 12, AVX2):
//   type   bytes/f32  max_err (first re-routed)  median   re-routed   bounds
//   bf16   0.501      9.0e-7  (none)             6.0e-7   0 %         1e-5, 0 %
//   f16    0.501      7.9e-7  (none)             6.3e-7   0 %         1e-5, 0 %
//   q8_0   0.267      0.0205  (token 2)          0.016    2.5 %       0.04, 10 %
//   q4_k   0.142      0.263   (token 2)          0.208    17.5 %      0.5, 35 %
//   q4_0   0.142      0.30    (token 1)          0.222    20 %        0.5, 35 %
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "runtime/engine/generator.h"
#include "runtime/model/loader.h"
#include "tests/common/compare.h"
#include "tests/common/routing.h"
#include "tests/common/tiny_checkpoint.h"

namespace sy {
namespace {

const std::vector<int32_t> kPrompt = {1,   17, 99, 240, 5,   300, 77, 12,  150, 42,
                                      201, 9,  64, 333, 120, 18,  7,  480, 256, 31};

struct Loaded {
  test::TracedLogits out;
  uint64_t bytes = 0;  // resident weights
};

Loaded run(WeightFormat format) {
  LoadedModel m = load_model(test::tiny_checkpoint(), 64, 64, false, nullptr, nullptr, format);
  Loaded r;
  r.bytes = m.model->weights().total_bytes;
  r.out = test::traced_prompt_logits(*m.model, kPrompt);
  return r;
}

struct Bound {
  WeightFormat format;
  double bound;          // relative logit error against f32, rows before the first re-routing
  double max_share;      // of (token, layer) routing decisions that differ from f32's
  double max_bytes_f32;  // resident bytes at most this share of the f32 model's
};

TEST(QuantizedWeights, LogitsWithinEachTypesBoundOfF32) {
  const ModelConfig c = ModelConfig::load(test::tiny_checkpoint());
  const int64_t n = static_cast<int64_t>(kPrompt.size());
  const Loaded f32 = run(WeightFormat::kF32);
  const Bound bounds[] = {{WeightFormat::kBF16, 1e-5, 0, 0.51},
                          {WeightFormat::kF16, 1e-5, 0, 0.51},
                          {WeightFormat::kQ8_0, 4e-2, 0.1, 0.28},
                          {WeightFormat::kQ4_K, 0.5, 0.35, 0.15},
                          {WeightFormat::kQ4_0, 0.5, 0.35, 0.15}};
  std::printf("  %-6s %10s %10s %14s %10s %10s\n", "type", "max_err", "median", "first_rerouted",
              "rerouted", "bytes/f32");
  for (const Bound& b : bounds) {
    SCOPED_TRACE(weight_format_name(b.format));
    const Loaded got = run(b.format);
    std::vector<double> rows = test::row_rel_errors(got.out.logits, f32.out.logits, c.vocab_size);
    ASSERT_EQ(static_cast<int64_t>(rows.size()), n);
    const test::RoutingDifference d = test::routing_difference(
        got.out.trace, f32.out.trace, n, c.num_hidden_layers, c.num_experts_per_tok);
    double before = 0;  // the largest error of the rows before the first re-routed token
    for (int64_t t = 0; t < d.first; ++t) before = std::max(before, rows[t]);
    std::vector<double> sorted = rows;
    std::sort(sorted.begin(), sorted.end());
    const double median = sorted[sorted.size() / 2];
    const double share = static_cast<double>(got.bytes) / static_cast<double>(f32.bytes);
    std::printf("  %-6s %10.3g %10.3g %14lld %9.1f%% %10.3f\n", weight_format_name(b.format),
                before, median, static_cast<long long>(d.first), 100 * d.share, share);
    EXPECT_LT(before, b.bound);
    EXPECT_LT(median, b.bound);
    EXPECT_GT(median, 0);  // it was converted
    EXPECT_LE(d.share, b.max_share);
    EXPECT_LT(share, b.max_bytes_f32);
  }
}

}  // namespace
}  // namespace sy
