// Every CPU op against a plain-loop double-precision reference, over awkward sizes
// (1, 3, 7, 19, 733 tokens), paged caches with scattered blocks, and skewed routing.
#include <cblas.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>

#include "kernels/cpu/ops.h"
#include "kernels/ops.h"
#include "tests/common/compare.h"

namespace sy {
namespace {

using test::expect_close;
using test::random_vector;

const int64_t kTokenSizes[] = {1, 3, 7, 19, 733};

Tensor view(std::vector<float>& v, std::initializer_list<int64_t> dims) {
  return Tensor(v.data(), DType::kF32, dims);
}
Tensor view(std::vector<int32_t>& v, std::initializer_list<int64_t> dims) {
  return Tensor(v.data(), DType::kI32, dims);
}

// The awkward sizes, then the small-row kernel's k blocks (k = 4100: several blocks and a tail
// of 4 for m = 5 and 16) on both sides of its row limit (16). BLAS on one thread, as in serving,
// where matmul takes that kernel.
TEST(CpuOps, MatmulMatchesLoops) {
#ifdef OPENBLAS_VERSION
  const int blas_threads = openblas_get_num_threads();
  openblas_set_num_threads(1);
#endif
  std::vector<std::array<int64_t, 3>> shapes;  // m, k, n
  for (int64_t m : kTokenSizes) shapes.push_back({m, 37, 19});
  for (int64_t m : {2, 5, 16, 17}) shapes.push_back({m, 4100, 20});
  for (const auto& [m, k, n] : shapes) {
    auto x = random_vector(m * k, 1);
    auto w = random_vector(n * k, 2);
    std::vector<float> out(m * n);
    cpu::matmul(view(out, {m, n}), view(x, {m, k}), view(w, {n, k}));
    std::vector<double> want(m * n, 0.0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t p = 0; p < k; ++p) want[i * n + j] += double(x[i * k + p]) * w[j * k + p];
    // fp32 sums of k products in [-1, 1]: their rounding grows with k.
    const double abs_tol = k > 1000 ? 2e-4 : 1e-5;
    expect_close("matmul m=" + std::to_string(m) + " k=" + std::to_string(k), out, want, abs_tol,
                 1e-5);
  }
#ifdef OPENBLAS_VERSION
  openblas_set_num_threads(blas_threads);
#endif
}

TEST(CpuOps, RmsnormMatchesLoops) {
  for (int64_t n : kTokenSizes) {
    const int64_t dim = 67;
    auto x = random_vector(n * dim, 3, 3.f);
    auto w = random_vector(dim, 4);
    std::vector<float> out(n * dim);
    cpu::rmsnorm(view(out, {n, dim}), view(x, {n, dim}), view(w, {dim}), 1e-5f);
    std::vector<double> want(n * dim);
    for (int64_t t = 0; t < n; ++t) {
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += double(x[t * dim + i]) * x[t * dim + i];
      const double s = 1.0 / std::sqrt(ss / dim + 1e-5);
      for (int64_t i = 0; i < dim; ++i) want[t * dim + i] = x[t * dim + i] * s * w[i];
    }
    expect_close("rmsnorm", out, want, 1e-5, 1e-5);
  }
}

TEST(CpuOps, RopeMatchesRotationOfPairs) {
  const int64_t n = 19, n_heads = 3, n_kv = 1, head_dim = 16;
  const double theta = 10000.0;
  auto q = random_vector(n * n_heads * head_dim, 5);
  auto k = random_vector(n * n_kv * head_dim, 6);
  std::vector<int32_t> pos(n);
  for (int64_t t = 0; t < n; ++t) pos[t] = static_cast<int32_t>(t * 37 % 101);
  auto q0 = q, k0 = k;
  cpu::rope(view(q, {n, n_heads, head_dim}), view(k, {n, n_kv, head_dim}), view(pos, {n}), theta);
  auto reference = [&](const std::vector<float>& src, int64_t heads) {
    std::vector<double> out(src.size());
    const int64_t half = head_dim / 2;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < half; ++i) {
          const double angle = pos[t] * std::pow(theta, -2.0 * i / head_dim);
          const int64_t base = (t * heads + h) * head_dim;
          const double a = src[base + i], b = src[base + i + half];
          out[base + i] = a * std::cos(angle) - b * std::sin(angle);
          out[base + i + half] = b * std::cos(angle) + a * std::sin(angle);
        }
    return out;
  };
  expect_close("rope.q", q, reference(q0, n_heads), 2e-5, 1e-4);
  expect_close("rope.k", k, reference(k0, n_kv), 2e-5, 1e-4);
}

// Attention over a paged cache whose blocks are scattered, against dense causal attention.
void check_attention(int64_t window, std::vector<int64_t> seq_lens, int64_t new_per_seq) {
  const int64_t n_heads = 8, n_kv = 2, head_dim = 8, block = 4;
  const int64_t n_seqs = static_cast<int64_t>(seq_lens.size());
  int64_t max_len = *std::max_element(seq_lens.begin(), seq_lens.end());
  const int64_t max_blocks = (max_len + block - 1) / block;
  const int64_t n_blocks = max_blocks * n_seqs + 3;
  // Physical blocks in a shuffled order.
  std::vector<int32_t> perm(n_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(7));
  std::vector<int32_t> tables(n_seqs * max_blocks);
  for (int64_t i = 0; i < n_seqs * max_blocks; ++i) tables[i] = perm[i];
  // Full K/V of every sequence, written to the cache; queries for the last new_per_seq positions.
  std::vector<float> k_cache(n_blocks * block * n_kv * head_dim, 0.f);
  std::vector<float> v_cache = k_cache;
  std::vector<std::vector<float>> ks, vs;
  std::vector<int32_t> positions, token_seq;
  for (int64_t s = 0; s < n_seqs; ++s) {
    ks.push_back(random_vector(seq_lens[s] * n_kv * head_dim, 100 + s, 2.f));
    vs.push_back(random_vector(seq_lens[s] * n_kv * head_dim, 200 + s));
    for (int64_t p = std::max<int64_t>(0, seq_lens[s] - new_per_seq); p < seq_lens[s]; ++p) {
      positions.push_back(static_cast<int32_t>(p));
      token_seq.push_back(static_cast<int32_t>(s));
    }
  }
  AttentionMeta meta;
  meta.block_tables = view(tables, {n_seqs, max_blocks});
  meta.block_size = block;
  meta.sliding_window = window;
  // Append every position of every sequence through kv_append.
  for (int64_t s = 0; s < n_seqs; ++s) {
    std::vector<int32_t> p(seq_lens[s]), sq(seq_lens[s], static_cast<int32_t>(s));
    std::iota(p.begin(), p.end(), 0);
    meta.positions = view(p, {seq_lens[s]});
    meta.token_seq = view(sq, {seq_lens[s]});
    cpu::kv_append(view(k_cache, {n_blocks, block, n_kv, head_dim}),
                   view(v_cache, {n_blocks, block, n_kv, head_dim}),
                   view(ks[s], {seq_lens[s], n_kv, head_dim}),
                   view(vs[s], {seq_lens[s], n_kv, head_dim}), meta);
  }
  const int64_t n = static_cast<int64_t>(positions.size());
  auto q = random_vector(n * n_heads * head_dim, 300, 2.f);
  std::vector<float> out(q.size());
  meta.positions = view(positions, {n});
  meta.token_seq = view(token_seq, {n});
  cpu::attention(view(out, {n, n_heads, head_dim}), view(q, {n, n_heads, head_dim}),
                 view(k_cache, {n_blocks, block, n_kv, head_dim}),
                 view(v_cache, {n_blocks, block, n_kv, head_dim}), meta);
  std::vector<double> want(q.size(), 0.0);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t s = token_seq[t], p = positions[t];
    const int64_t lo = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    for (int64_t h = 0; h < n_heads; ++h) {
      const int64_t g = h / (n_heads / n_kv);
      std::vector<double> sc;
      for (int64_t j = lo; j <= p; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < head_dim; ++d)
          dot += double(q[(t * n_heads + h) * head_dim + d]) * ks[s][(j * n_kv + g) * head_dim + d];
        sc.push_back(dot / std::sqrt(double(head_dim)));
      }
      const double mx = *std::max_element(sc.begin(), sc.end());
      double sum = 0;
      for (double& x : sc) sum += (x = std::exp(x - mx));
      for (int64_t j = lo; j <= p; ++j)
        for (int64_t d = 0; d < head_dim; ++d)
          want[(t * n_heads + h) * head_dim + d] +=
              sc[j - lo] / sum * vs[s][(j * n_kv + g) * head_dim + d];
    }
  }
  expect_close("attention window=" + std::to_string(window), out, want, 1e-5, 1e-4);
}

TEST(CpuOps, AttentionPagedPrefillMatchesDense) {
  check_attention(0, {19, 7, 1}, 1000);
}
TEST(CpuOps, AttentionPagedDecodeMatchesDense) {
  check_attention(0, {33, 5, 12}, 1);
}
TEST(CpuOps, AttentionSlidingWindow) {
  check_attention(5, {19, 3, 40}, 1000);
  check_attention(1, {7}, 1000);
}

TEST(CpuOps, AttentionRejectsPositionBeyondBlockTable) {
  std::vector<float> cache(2 * 4 * 1 * 2), q(2), out(2);
  std::vector<int32_t> table = {0}, pos = {4}, seq = {0};
  AttentionMeta meta;
  meta.block_tables = view(table, {1, 1});
  meta.positions = view(pos, {1});
  meta.token_seq = view(seq, {1});
  meta.block_size = 4;
  EXPECT_THROW(cpu::attention(view(out, {1, 1, 2}), view(q, {1, 1, 2}), view(cache, {2, 4, 1, 2}),
                              view(cache, {2, 4, 1, 2}), meta),
               Error);
}

void check_moe_gate(int64_t n, int64_t n_experts, int64_t k, float skew) {
  auto logits = random_vector(n * n_experts, 11);
  for (int64_t t = 0; t < n; ++t) logits[t * n_experts + (n_experts - 1)] += skew;
  std::vector<int32_t> idx(n * k);
  std::vector<float> w(n * k);
  cpu::moe_gate(view(idx, {n, k}), view(w, {n, k}), view(logits, {n, n_experts}));
  int64_t n_wrong = 0;
  for (int64_t t = 0; t < n; ++t) {
    std::vector<double> p(n_experts);
    double mx = -1e30, sum = 0;
    for (int64_t e = 0; e < n_experts; ++e) mx = std::max(mx, double(logits[t * n_experts + e]));
    for (int64_t e = 0; e < n_experts; ++e)
      sum += (p[e] = std::exp(logits[t * n_experts + e] - mx));
    std::vector<int64_t> order(n_experts);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    double chosen = 0;
    for (int64_t j = 0; j < k; ++j) chosen += p[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      if (idx[t * k + j] != order[j] || std::fabs(w[t * k + j] - p[order[j]] / chosen) > 1e-6) {
        if (n_wrong < 10)
          std::printf("  token %lld slot %lld: got expert %d w %g, want %lld w %g\n", (long long)t,
                      (long long)j, idx[t * k + j], w[t * k + j], (long long)order[j],
                      p[order[j]] / chosen);
        ++n_wrong;
      }
    }
  }
  EXPECT_EQ(n_wrong, 0);
}

TEST(CpuOps, MoeGateTopKRenormalised) {
  for (int64_t n : kTokenSizes) check_moe_gate(n, 8, 2, 0.f);
  check_moe_gate(19, 8, 1, 0.f);
  check_moe_gate(19, 4, 4, 0.f);
  check_moe_gate(733, 8, 2, 50.f);  // every token to the last expert
}

TEST(CpuOps, GatherAndWeightedScatterAdd) {
  const int64_t n = 7, dim = 5, rows = 14;
  auto x = random_vector(n * dim, 21);
  std::vector<int32_t> idx(rows);
  for (int64_t r = 0; r < rows; ++r) idx[r] = static_cast<int32_t>((r * 3) % n);
  std::vector<float> g(rows * dim);
  cpu::gather_rows(view(g, {rows, dim}), view(x, {n, dim}), view(idx, {rows}));
  std::vector<double> want_g(rows * dim);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < dim; ++i) want_g[r * dim + i] = x[idx[r] * dim + i];
  expect_close("gather_rows", g, want_g, 0, 0);
  auto w = random_vector(rows, 22);
  std::vector<float> out(n * dim, 1.f);
  cpu::scatter_add_weighted(view(out, {n, dim}), view(g, {rows, dim}), view(idx, {rows}),
                            view(w, {rows}));
  std::vector<double> want(n * dim, 1.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < dim; ++i) want[idx[r] * dim + i] += double(w[r]) * g[r * dim + i];
  expect_close("scatter_add_weighted", out, want, 1e-6, 1e-6);
  // A negative row (computed on another rank) gathers zeros and scatters nothing.
  idx[3] = -1;
  cpu::gather_rows(view(g, {rows, dim}), view(x, {n, dim}), view(idx, {rows}));
  for (int64_t i = 0; i < dim; ++i) EXPECT_EQ(g[3 * dim + i], 0.f);
  std::vector<float> before = out;
  std::vector<float> one_row_w(rows, 0.f);
  one_row_w[3] = 1.f;
  cpu::scatter_add_weighted(view(out, {n, dim}), view(g, {rows, dim}), view(idx, {rows}),
                            view(one_row_w, {rows}));
  EXPECT_EQ(out, before);
  idx[3] = static_cast<int32_t>(n);  // out of range
  EXPECT_THROW(cpu::gather_rows(view(g, {rows, dim}), view(x, {n, dim}), view(idx, {rows})), Error);
}

TEST(CpuOps, SwigluAndAdd) {
  const int64_t n = 733 * 3;
  auto a = random_vector(n, 31, 6.f), b = random_vector(n, 32);
  std::vector<float> out(n);
  cpu::swiglu(view(out, {n}), view(a, {n}), view(b, {n}));
  std::vector<double> want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = a[i] / (1.0 + std::exp(-double(a[i]))) * b[i];
  expect_close("swiglu", out, want, 1e-6, 1e-5);
  cpu::add(view(out, {n}), view(a, {n}), view(b, {n}));
  for (int64_t i = 0; i < n; ++i) want[i] = double(a[i]) + b[i];
  expect_close("add", out, want, 1e-6, 1e-6);
}

TEST(CpuOps, EmbeddingWithVocabularyRange) {
  const int64_t rows = 10, dim = 4;
  auto table = random_vector(rows * dim, 41);
  std::vector<int32_t> ids = {100, 104, 109, 99, 110};
  std::vector<float> out(ids.size() * dim);
  cpu::embedding(view(out, {5, dim}), view(ids, {5}), view(table, {rows, dim}), 100);
  std::vector<double> want(out.size(), 0.0);
  for (int64_t t = 0; t < 3; ++t)
    for (int64_t i = 0; i < dim; ++i) want[t * dim + i] = table[(ids[t] - 100) * dim + i];
  expect_close("embedding", out, want, 0, 0);
}

// Ops::penalize (the default, host implementation the CPU backend takes): the repetition penalty
// divides positive logits, multiplies negative ones and keeps zero; then presence and frequency
// come off by the generated counts (a count of 0, a prompt-only token, takes neither); rows with
// no ids or params {1, 0, 0} keep their logits; ids outside the vocabulary are skipped; malformed
// offsets and operands are refused by name.
TEST(CpuOps, PenalizeAppliesRepetitionThenPresenceAndFrequency) {
  auto ops = make_cpu_ops();
  const int64_t n = 4, vocab = 7, P = Ops::kPenaltyParams;
  std::vector<float> logits = random_vector(n * vocab, 5, 3.f);
  logits[0 * vocab + 6] = 0.f;
  logits[0 * vocab + 0] = 2.5f;
  logits[0 * vocab + 2] = -1.5f;
  std::vector<int32_t> offsets = {0, 3, 3, 6, 8};
  std::vector<int32_t> ids = {0, 2, 6, 1, -1, 9, 4, 5};
  std::vector<int32_t> counts = {0, 2, 1, 3, 1, 1, 0, 0};
  std::vector<float> params = {2.f,  0.5f,  0.25f,  // row 0
                               3.f,  1.f,   1.f,    // row 1: no ids
                               0.5f, -0.5f, 0.125f, 1.f, 0.f, 0.f};
  const std::vector<float> before = logits;
  ops->penalize(view(logits, {n, vocab}), view(offsets, {n + 1}), view(ids, {8}), view(counts, {8}),
                view(params, {n, P}));
  std::vector<float> want = before;
  want[0 * vocab + 0] = 2.5f / 2.f;                   // prompt only: no presence
  want[0 * vocab + 2] = -1.5f * 2.f - (0.5f + 0.5f);  // generated twice
  want[0 * vocab + 6] = 0.f * 2.f - (0.5f + 0.25f);   // generated once
  for (int64_t r = 1; r < n; ++r) {
    const int64_t first = offsets[r], last = offsets[r + 1];
    for (int64_t j = first; j < last; ++j) {
      if (ids[j] < 0 || ids[j] >= vocab) continue;
      float& v = want[r * vocab + ids[j]];
      v = v > 0 ? v / params[r * P] : v * params[r * P];
      if (counts[j] > 0) v -= params[r * P + 1] + params[r * P + 2] * static_cast<float>(counts[j]);
    }
  }
  EXPECT_EQ(logits, want);
  EXPECT_NE(logits[2 * vocab + 1], before[2 * vocab + 1]);  // row 2's penalties took effect
  EXPECT_EQ(std::vector<float>(logits.begin() + 3 * vocab, logits.end()),
            std::vector<float>(before.begin() + 3 * vocab, before.end()));  // {1, 0, 0}

  auto message = [&](std::vector<int32_t> off, int64_t n_ids) -> std::string {
    try {
      ops->penalize(view(logits, {n, vocab}), view(off, {n + 1}), view(ids, {n_ids}),
                    view(counts, {n_ids}), view(params, {n, P}));
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_NE(message({0, 3, 2, 6, 8}, 8).find("offsets decrease at row 1"), std::string::npos);
  EXPECT_NE(message({0, 3, 3, 6, 8}, 7).find("to 8 over 7 ids"), std::string::npos);
  EXPECT_NE(message({1, 3, 3, 6, 8}, 8).find("offsets run from 1"), std::string::npos);
  std::vector<float> bad_offsets(5);
  try {
    ops->penalize(view(logits, {n, vocab}), view(bad_offsets, {n + 1}), view(ids, {8}),
                  view(counts, {8}), view(params, {n, P}));
    FAIL() << "F32 offsets taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("penalize.offsets: expected I32[5]"), std::string::npos)
        << e.what();
  }
  try {
    ops->penalize(view(logits, {n, vocab}), view(offsets, {n + 1}), view(ids, {8}),
                  view(counts, {7}), view(params, {n, P}));
    FAIL() << "7 counts of 8 ids taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("penalize.counts: expected I32[8]"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(logits, want);  // refused calls change nothing
}

// Ops::bias (the default, host implementation the CPU backend takes): each listed logit gains its
// value (-inf bans the token), ids outside the vocabulary are skipped, rows without ids keep their
// logits; malformed offsets and operands are refused by name and change nothing.
TEST(CpuOps, BiasAddsItsValuesAndBans) {
  auto ops = make_cpu_ops();
  const int64_t n = 3, vocab = 6;
  std::vector<float> logits = random_vector(n * vocab, 9, 3.f);
  const std::vector<float> before = logits;
  std::vector<int32_t> offsets = {0, 3, 3, 5};
  std::vector<int32_t> ids = {4, 0, 7, 2, -3};
  std::vector<float> values = {1.5f, -100.f, 9.f, -INFINITY, 2.f};
  ops->bias(view(logits, {n, vocab}), view(offsets, {n + 1}), view(ids, {5}), view(values, {5}));
  std::vector<float> want = before;
  want[0 * vocab + 4] += 1.5f;
  want[0 * vocab + 0] += -100.f;
  want[2 * vocab + 2] = -INFINITY;
  EXPECT_EQ(logits, want);
  auto message = [&](std::vector<int32_t> off, int64_t n_ids) -> std::string {
    try {
      ops->bias(view(logits, {n, vocab}), view(off, {n + 1}), view(ids, {n_ids}),
                view(values, {n_ids}));
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_NE(message({0, 3, 2, 5}, 5).find("offsets decrease at row 1"), std::string::npos);
  EXPECT_NE(message({0, 3, 3, 5}, 4).find("to 5 over 4 ids"), std::string::npos);
  try {
    ops->bias(view(logits, {n, vocab}), view(offsets, {n + 1}), view(ids, {5}), view(values, {4}));
    FAIL() << "4 values of 5 ids taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bias.values: expected F32[5]"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(logits, want);  // refused calls change nothing
}

// Ops::logprobs (the default: cpu::logprobs_row per row): the log-softmax against a long-double
// reference, the top tokens best first with ties to the lower id, each row's token taken
// through `rows` from the sampled ids; a row or token out of range refused by name.
TEST(CpuOps, LogprobsAreTheLogSoftmaxAndItsTopTokens) {
  auto ops = make_cpu_ops();
  const int64_t m = 3, vocab = 1000, top = 20;
  std::vector<float> logits = random_vector(m * vocab, 21, 6.f);
  for (int64_t i = vocab; i < 2 * vocab; ++i) logits[i] = std::round(logits[i]);  // ties
  std::vector<int32_t> rows = {2, 0, 1};      // logit row j is the step's row rows[j]
  std::vector<int32_t> chosen = {5, 999, 0};  // sampled per step row
  std::vector<float> out(m * (top + 1));
  std::vector<int32_t> ids(m * top);
  ops->logprobs(view(out, {m, top + 1}), view(ids, {m, top}), view(logits, {m, vocab}),
                view(rows, {m}), view(chosen, {3}));
  for (int64_t j = 0; j < m; ++j) {
    const float* l = logits.data() + j * vocab;
    long double sum = 0;
    for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<long double>(l[v]));
    const long double lse = std::log(sum);
    auto ref = [&](int64_t v) { return static_cast<double>(static_cast<long double>(l[v]) - lse); };
    EXPECT_NEAR(out[j * (top + 1)], ref(chosen[rows[j]]), 1e-5) << "row " << j;
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
    for (int64_t k = 0; k < top; ++k) {
      EXPECT_EQ(ids[j * top + k], order[k]) << "row " << j << " rank " << k;
      EXPECT_NEAR(out[j * (top + 1) + 1 + k], ref(order[k]), 1e-5) << "row " << j << " rank " << k;
    }
  }
  std::vector<int32_t> past = {2, 0, 3};
  try {
    ops->logprobs(view(out, {m, top + 1}), view(ids, {m, top}), view(logits, {m, vocab}),
                  view(past, {m}), view(chosen, {3}));
    FAIL() << "row 3 of 3 taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("logprobs: row 3 of 3 sampled tokens"), std::string::npos)
        << e.what();
  }
  std::vector<int32_t> bad_token = {5, vocab, 0};
  EXPECT_THROW(ops->logprobs(view(out, {m, top + 1}), view(ids, {m, top}), view(logits, {m, vocab}),
                             view(rows, {m}), view(bad_token, {3})),
               Error);
  EXPECT_THROW(ops->logprobs(view(out, {m, top}), view(ids, {m, top}), view(logits, {m, vocab}),
                             view(rows, {m}), view(chosen, {3})),
               Error);  // out_logprobs without the chosen token's column
}

TEST(CpuOps, ShapeErrorsNameTheOperand) {
  std::vector<float> a(12), b(12), w(4);
  try {
    cpu::rmsnorm(view(a, {3, 4}), view(b, {3, 4}), view(w, {3}), 1e-5f);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rmsnorm.weight: expected F32[4], got F32[3]"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace sy
