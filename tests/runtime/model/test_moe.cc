// MoE stages on their own: layout under skewed routing, and the expert FFN against loops.
#include <gtest/gtest.h>

#include <cmath>

#include "runtime/model/moe.h"
#include "tests/common/compare.h"

namespace sy {
namespace {

TEST(MoeLayout, SkewedRoutingAndEmptyExperts) {
  const int64_t n = 5, k = 2, E = 8;
  // Every token to experts 3 and 6; no other expert gets anything.
  std::vector<int32_t> idx;
  std::vector<float> w;
  for (int64_t t = 0; t < n; ++t) {
    idx.insert(idx.end(), {6, 3});
    w.insert(w.end(), {0.7f, 0.3f});
  }
  MoeLayout layout;
  layout.reserve(16, k, E);
  moe_layout(layout, idx.data(), w.data(), n, k, E);
  EXPECT_EQ(layout.n_rows, n * k);
  for (int64_t e = 0; e < E; ++e)
    EXPECT_EQ(layout.n_tokens_per_expert[e], (e == 3 || e == 6) ? n : 0) << "expert " << e;
  EXPECT_EQ(layout.expert_offsets[3], 0);
  EXPECT_EQ(layout.expert_offsets[4], n);
  EXPECT_EQ(layout.expert_offsets[6], n);
  EXPECT_EQ(layout.expert_offsets[8], 2 * n);
  for (int64_t r = 0; r < n; ++r) {
    EXPECT_EQ(layout.sorted_rows[r], r);  // expert 3's rows, in token order
    EXPECT_FLOAT_EQ(layout.sorted_weights[r], 0.3f);
    EXPECT_EQ(layout.sorted_rows[n + r], r);
    EXPECT_FLOAT_EQ(layout.sorted_weights[n + r], 0.7f);
  }
  // Zero tokens is a normal step.
  moe_layout(layout, idx.data(), w.data(), 0, k, E);
  EXPECT_EQ(layout.n_rows, 0);
  EXPECT_EQ(layout.expert_offsets[E], 0);
  // Bad ids and overflow are errors.
  idx[3] = 8;
  EXPECT_THROW(moe_layout(layout, idx.data(), w.data(), n, k, E), Error);
  EXPECT_THROW(moe_layout(layout, idx.data(), w.data(), 9, k, E), Error);
}

TEST(ExpertFfn, MatchesLoopsWithEmptyExperts) {
  auto ops = make_cpu_ops();
  const int64_t dim = 6, hidden = 10, n_experts = 3;
  std::vector<std::vector<float>> store;
  LayerWeights layer;
  for (int64_t e = 0; e < n_experts; ++e) {
    store.push_back(test::random_vector(hidden * dim, 10 + e));
    layer.w1.emplace_back(store.back().data(), DType::kF32,
                          std::initializer_list<int64_t>{hidden, dim});
    store.push_back(test::random_vector(dim * hidden, 20 + e));
    layer.w2.emplace_back(store.back().data(), DType::kF32,
                          std::initializer_list<int64_t>{dim, hidden});
    store.push_back(test::random_vector(hidden * dim, 30 + e));
    layer.w3.emplace_back(store.back().data(), DType::kF32,
                          std::initializer_list<int64_t>{hidden, dim});
  }
  const int64_t offsets[] = {0, 4, 4, 7};  // expert 1 gets no rows
  const int64_t n_rows = 7;
  auto in = test::random_vector(n_rows * dim, 40);
  std::vector<float> out(n_rows * dim), gate(n_rows * hidden), up(n_rows * hidden);
  ExpertScratch scratch{Tensor(gate.data(), DType::kF32, {n_rows, hidden}),
                        Tensor(up.data(), DType::kF32, {n_rows, hidden})};
  expert_ffn(*ops, Tensor(out.data(), DType::kF32, {n_rows, dim}),
             Tensor(in.data(), DType::kF32, {n_rows, dim}), layer, offsets, scratch);
  std::vector<double> want(n_rows * dim, 0.0);
  for (int64_t e = 0; e < n_experts; ++e) {
    const float* w1 = layer.w1[e].f32();
    const float* w2 = layer.w2[e].f32();
    const float* w3 = layer.w3[e].f32();
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      std::vector<double> act(hidden);
      for (int64_t h = 0; h < hidden; ++h) {
        double g = 0, u = 0;
        for (int64_t i = 0; i < dim; ++i) {
          g += double(w1[h * dim + i]) * in[r * dim + i];
          u += double(w3[h * dim + i]) * in[r * dim + i];
        }
        act[h] = g / (1 + std::exp(-g)) * u;
      }
      for (int64_t i = 0; i < dim; ++i)
        for (int64_t h = 0; h < hidden; ++h) want[r * dim + i] += w2[i * hidden + h] * act[h];
    }
  }
  test::expect_close("expert_ffn", out, want, 1e-5, 1e-4);
}

}  // namespace
}  // namespace sy
