// Logits of a prompt with the experts each token was routed to (Model::set_routing_trace), and
// where two such runs first route a token differently. Weights perturbed by rounding (another
// precision, a quantized type) move a token whose router sees two experts nearly tied onto the
// other one; from there on the two runs compute different, equally valid functions, and that
// token's row (and later rows attending to it) are no longer bounded by the rounding. Tests of
// such bounds check the rows before the first difference and the median row.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "runtime/engine/generator.h"
#include "runtime/model/model.h"

namespace sy::test {

struct TracedLogits {
  std::vector<float> logits;   // [n, vocab]
  std::vector<int32_t> trace;  // per prefill step, [layer][token][k]
};

inline TracedLogits traced_prompt_logits(Model& model, const std::vector<int32_t>& prompt) {
  TracedLogits t;
  model.set_routing_trace(&t.trace);
  GenerateOptions o;
  o.max_tokens = 1;
  o.ignore_eos = true;
  o.all_prompt_logits = true;
  t.logits = generate(model, prompt, o).prompt_logits;
  model.set_routing_trace(nullptr);
  return t;
}

struct RoutingDifference {
  int64_t first = 0;  // the first token routed differently at some layer (n: none)
  double share = 0;   // of (token, layer) expert sets that differ
};

// a and b: traces of the same n-token prompt, prefilled in steps of `chunk` tokens (the trace of
// each step is [layer][token][k]; chunk 0: one step), over `layers` layers of top-k routing.
inline RoutingDifference routing_difference(const std::vector<int32_t>& a,
                                            const std::vector<int32_t>& b, int64_t n,
                                            int64_t layers, int64_t k, int64_t chunk = 0) {
  RoutingDifference d;
  d.first = n;
  if (chunk <= 0) chunk = std::max<int64_t>(n, 1);
  EXPECT_EQ(a.size(), static_cast<size_t>(n * layers * k));
  EXPECT_EQ(b.size(), a.size());
  if (a.size() != b.size() || a.size() != static_cast<size_t>(n * layers * k)) return d;
  int64_t differ = 0;
  size_t at = 0;
  for (int64_t begin = 0; begin < n; begin += chunk) {
    const int64_t m = std::min(chunk, n - begin);
    for (int64_t l = 0; l < layers; ++l) {
      for (int64_t t = 0; t < m; ++t, at += static_cast<size_t>(k)) {
        std::vector<int32_t> x(a.begin() + at, a.begin() + at + k);
        std::vector<int32_t> y(b.begin() + at, b.begin() + at + k);
        std::sort(x.begin(), x.end());
        std::sort(y.begin(), y.end());
        if (x != y) {
          ++differ;
          d.first = std::min(d.first, begin + t);
        }
      }
    }
  }
  d.share = n > 0 ? static_cast<double>(differ) / static_cast<double>(n * layers) : 0.0;
  return d;
}

}  // namespace sy::test
