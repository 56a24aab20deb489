// Weights quantized at load (--weights) against the same checkpoint held in f32: for each type,
// the prompt's logits within that type's bound, on tests/common/tiny_checkpoint.h (hidden 256,
// so every linear weight holds whole blocks of every type, Q4_K's 256 included).
//
// The bounds (largest |logit error| over the row's largest |logit|, every row of a 10-token
// prompt) hold the measured error with room for other compilers' rounding. The checkpoint is
// stored in bf16, so bf16 and f16 hold its values exactly and differ from f32 only in rounding
// order; the block types quantize weights and activations (8-bit blocks), and through random
// layers their error grows with the step of the weights' grid: Q8_0 at 8 bits, Q4_K and Q4_0 at
// 4 bits (16x coarser, and measured 17x larger). A wrong block layout or scale gives errors of
// the order of the logits themselves (> 1). How close the 4-bit kernels are to f32 arithmetic on
// the same dequantized weights is tested on llama.cpp's own Q4_K_M file (test_gguf_model.cc).
//   type   bytes/f32  measured  bound
//   bf16   0.500      8.2e-7    1e-5
//   f16    0.500      8.0e-7    1e-5
//   q8_0   0.266      0.0195    4e-2
//   q4_k   0.141      0.332     0.5
//   q4_0   0.141      0.337     0.5
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "runtime/engine/generator.h"
#include "runtime/model/loader.h"
#include "tests/common/compare.h"
#include "tests/common/tiny_checkpoint.h"

namespace sy {
namespace {

const std::vector<int32_t> kPrompt = {1, 17, 99, 240, 5, 300, 77, 12, 150, 42};

std::vector<float> prompt_logits(WeightFormat format, uint64_t* bytes) {
  LoadedModel m = load_model(test::tiny_checkpoint(), 64, 64, false, nullptr, nullptr, format);
  if (bytes != nullptr) *bytes = m.model->weights().total_bytes;
  GenerateOptions o;
  o.max_tokens = 1;
  o.ignore_eos = true;
  o.all_prompt_logits = true;
  return generate(*m.model, kPrompt, o).prompt_logits;
}

double max_rel(const std::vector<float>& a, const std::vector<float>& b, int64_t vocab) {
  EXPECT_EQ(a.size(), b.size());
  return test::max_rel_error(a, b, vocab);
}

struct Bound {
  WeightFormat format;
  double bound;          // max relative logit error against f32
  double max_bytes_f32;  // resident bytes at most this share of the f32 model's
};

TEST(QuantizedWeights, LogitsWithinEachTypesBoundOfF32) {
  const int64_t vocab = ModelConfig::load(test::tiny_checkpoint()).vocab_size;
  uint64_t f32_bytes = 0;
  const std::vector<float> f32 = prompt_logits(WeightFormat::kF32, &f32_bytes);
  const Bound bounds[] = {{WeightFormat::kBF16, 1e-5, 0.51},
                          {WeightFormat::kF16, 1e-5, 0.51},
                          {WeightFormat::kQ8_0, 4e-2, 0.28},
                          {WeightFormat::kQ4_K, 0.5, 0.15},
                          {WeightFormat::kQ4_0, 0.5, 0.15}};
  std::printf("  %-6s %12s %12s\n", "type", "max rel err", "bytes/f32");
  for (const Bound& b : bounds) {
    SCOPED_TRACE(weight_format_name(b.format));
    uint64_t bytes = 0;
    const std::vector<float> got = prompt_logits(b.format, &bytes);
    const double rel = max_rel(got, f32, vocab);
    const double share = static_cast<double>(bytes) / static_cast<double>(f32_bytes);
    std::printf("  %-6s %12.4g %12.3f\n", weight_format_name(b.format), rel, share);
    EXPECT_LT(rel, b.bound);
    EXPECT_GT(rel, 0);  // it was converted
    EXPECT_LT(share, b.max_bytes_f32);
  }
}

}  // namespace
}  // namespace sy
