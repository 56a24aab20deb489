// The CUDA backend's ops against their CPU twins (label gpu). Built only with the CUDA backend;
// every test starts (in the fixture's SetUp) by skipping when cuda::device_count() is 0, so the
// binary builds, lists its tests and passes as "skipped" on machines without a GPU.
//
// What is checked. Every op of cuda::make_cuda_ops(0), through the Ops interface, against the
// same op of make_cpu_ops() on the same values, over awkward token counts (1, 3, 7, 19, 733):
//   embedding   BF16 and F32 tables, a row_offset, ids below and above the held rows (zeros)
//   rmsnorm     out F32, out BF16, in place (F32), rows shorter and longer than a block's threads
//   add         exact, also in place
//   matmul      BF16 x BF16 -> F32 and -> BF16, F32 x F32 -> F32, odd sizes (k = 67, n = 45)
//   grouped_matmul  several groups with empty ones, one non-empty group, all empty, no rows;
//               against one CPU matmul per group; rows in no group keep their old values
//   rope        8 query and 2 key heads, head_dim 8 and 128, positions up to 30000, theta 1e6
//   kv_append   into BF16 and F32 paged caches over shuffled physical blocks: bit-exact
//   attention   the same caches, prefill chunks and decode tokens of several sequences in one
//               step, GQA (4 query heads per KV head), sliding window 0 and 5, out F32 and BF16,
//               head_dim 128 and 64; long decode contexts (to 5000) through the split
//               (flash-decoding) path with 1, 4, 8 and 12 query heads per KV head; prefill
//               chunks through the tensor-core kernel beside the per-token one (query tiles
//               straddling sequences), windows 0, 5 and 100, 1, 4, 8 and 12 heads per KV head
//   moe_gate    8 experts top-2, 4 experts top-1, exact logit ties, every token to one expert, no
//               tokens
//   gather_rows, scatter_add_weighted   F32 and BF16 rows, routed rows (each token 0..3 times in
//               arbitrary order, out starting non-zero), one token getting every row, no rows
//   swiglu      F32 and BF16, also in place
// and that a bad operand throws sy::Error naming the op, and host tensors are refused.
//
// How. The CUDA backend stores weights, KV cache and GEMM inputs as BF16, the CPU backend is fp32
// throughout (kernels/ops.h). BF16 operands are made on the host with f32_to_bf16 and the CPU
// reference gets the same values rounded to bf16 (as floats), so what remains is the GPU's
// arithmetic (summation order, FMA contraction, CUDA libm ulps) and the rounding of BF16 outputs.
//
// Budgets (the constants below, each with its reason). Most errors are measured against the
// largest |value| of the output row: summation-order errors scale with the row's magnitudes, not
// with each element, which cancellation can make arbitrarily small. A failed comparison prints the
// first mismatches with their index, got, want and the allowed error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda/device.h"
#include "kernels/cuda/ops.h"
#include "kernels/ops.h"
#include "tests/common/compare.h"

namespace sy {
namespace {

using test::random_vector;

const int64_t kTokenCounts[] = {1, 3, 7, 19, 733};

// ---- error budgets -----------------------------------------------------------------------------
// Embedding lookups, gathers, fp32 add and the KV cache's bf16 rounding do the same single IEEE
// operation (or none) per element on both sides: bit-exact.
constexpr double kExact = 0.0;
// fp32 ops whose GPU kernels reduce in another order or use CUDA libm (rsqrtf, expf: <= 2 ulp):
// rmsnorm, swiglu. A few ulps (2^-24 ~ 6e-8 each) of the row's largest |value|; 1e-5 leaves
// ample room while a wrong formula errs by O(1).
constexpr double kF32Budget = 1e-5;
// Outputs stored as BF16 (8 significant bits): rounding to nearest errs by at most 2^-9 of the
// value, so 2^-8 of the row's largest |value| covers it, on top of the op's fp32 budget.
constexpr double kBf16Budget = 1.0 / 256;
// GEMMs: products of bf16 values are exact in fp32, so cuBLAS's fp32 accumulation and the CPU's
// fp32 sgemm on the same bf16-rounded inputs differ by summation order only, about
// sqrt(k) * 2^-24 of the row's magnitude (k <= 1024 here); the same holds for F32 x F32 (the
// backend keeps cuBLAS off TF32). 1e-5 of the row's largest |value|, plus kBf16Budget for BF16 out.
constexpr double kGemmBudget = 1e-5;
// RoPE: both sides compute angle = position * inv_freq in fp32, but CUDA's powf may differ from
// the host's by up to 4 ulp (plus 0.5 ulp for each side's division and product): the angles agree
// to < 8 ulp = 2^-20 relative, an absolute error of |angle| * 2^-20 (0.03 rad at angle 30000).
// Pair 0 has inv_freq = theta^0 = 1 exactly, so its angle is exact. sinf / cosf and the rotation's
// roundings add a few 2^-24. An output of a pair (a, b) may therefore err by
// (|a| + |b|) * (|angle error| + kRopeTrigBudget).
constexpr double kRopeAngleBudget = 1.0 / (1 << 20);
constexpr double kRopeTrigBudget = 1.0 / (1 << 20);
// Attention outputs are convex combinations of v rows: errors relative to max |v|. Scores differ
// by a few ulps of sum |q k| / sqrt(head_dim) (FMA on the GPU only), the CPU sums up to ~800
// softmax terms and weighted values sequentially (sqrt(n) * 2^-24 ~ 2e-6 of max |v| typical);
// 5e-5 leaves room for the worst of millions of outputs, while one position wrongly in or out of
// the window moves an output by about max |v| / n_ctx >= 1e-3.
constexpr double kAttentionBudget = 5e-5;
// Router: the same fp32 operations in the same order on both sides, expf within 2 ulp, so the
// renormalised weights (<= 1) agree to a few 2^-24; the chosen experts agree unless two candidates'
// probabilities are within kRouterTie (then either choice is right).
constexpr double kRouterWeightBudget = 1e-6;
constexpr double kRouterTie = 1e-6;
// scatter_add_weighted adds a token's rows in ascending row order on both sides, but the GPU
// fuses w * x + acc into one FMA where the CPU rounds the product, then the sum: per added row at
// most 3 roundings of 2^-24 between the two, < 2^-22 of the magnitude the sum is built from,
// S = |out0| + sum |w x|. With the MoE's <= 3 rows per token that is < 1e-6 of S; a token that
// gets every row is allowed count * 2^-22 * S. Tokens with no rows must keep out0 exactly.
constexpr double kScatterBudgetPerRow = 1.0 / (1 << 22);

constexpr int kShownMismatches = 8;

// ---- helpers -----------------------------------------------------------------------------------
template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

float bf16_round(float x) {
  return bf16_to_f32(f32_to_bf16(x));
}
std::vector<float> bf16_rounded(std::vector<float> v) {
  for (float& x : v) x = bf16_round(x);
  return v;
}

// Host views for the CPU twin. Inputs are only read; the views are non-owning.
Tensor host(const std::vector<float>& v, std::initializer_list<int64_t> dims) {
  Tensor t(const_cast<float*>(v.data()), DType::kF32, dims);
  SY_CHECK(static_cast<size_t>(t.numel()) == v.size(), "host view ", t.shape_str(), " of ",
           v.size(), " values");
  return t;
}
Tensor host(const std::vector<int32_t>& v, std::initializer_list<int64_t> dims) {
  Tensor t(const_cast<int32_t*>(v.data()), DType::kI32, dims);
  SY_CHECK(static_cast<size_t>(t.numel()) == v.size(), "host view ", t.shape_str(), " of ",
           v.size(), " values");
  return t;
}

// A tensor in the GPU backend's memory (Ops::alloc through DeviceBuffer), owning it.
class DeviceTensor {
 public:
  DeviceTensor(Ops& ops, DType dtype, std::initializer_list<int64_t> dims)
      : tensor_(nullptr, dtype, dims, Device::kCuda), buffer_(ops, tensor_.bytes()) {
    tensor_.data = buffer_.get();
  }
  const Tensor& t() const { return tensor_; }
  operator Tensor() const { return tensor_; }  // implicit: ops take views

 private:
  Tensor tensor_;
  DeviceBuffer buffer_;
};

// A new device tensor of `dtype` (F32, or BF16 rounded to nearest even) holding `values`.
DeviceTensor upload(Ops& ops, const std::vector<float>& values, DType dtype,
                    std::initializer_list<int64_t> dims) {
  DeviceTensor d(ops, dtype, dims);
  SY_CHECK(static_cast<size_t>(d.t().numel()) == values.size(), "upload of ", values.size(),
           " values to ", d.t().shape_str());
  if (dtype == DType::kBF16) {
    std::vector<uint16_t> words(values.size());
    for (size_t i = 0; i < values.size(); ++i) words[i] = f32_to_bf16(values[i]);
    ops.copy_from_host(d.t().data, words.data(), d.t().bytes());
  } else {
    SY_CHECK(dtype == DType::kF32, "upload: ", dtype_name(dtype));
    ops.copy_from_host(d.t().data, values.data(), d.t().bytes());
  }
  return d;
}
DeviceTensor upload(Ops& ops, const std::vector<int32_t>& values,
                    std::initializer_list<int64_t> dims) {
  DeviceTensor d(ops, DType::kI32, dims);
  SY_CHECK(static_cast<size_t>(d.t().numel()) == values.size(), "upload of ", values.size(),
           " ids to ", d.t().shape_str());
  ops.copy_from_host(d.t().data, values.data(), d.t().bytes());
  return d;
}

// The values of an F32 or BF16 device tensor, as floats.
std::vector<float> download(Ops& ops, const Tensor& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  if (t.dtype == DType::kBF16) {
    std::vector<uint16_t> words(out.size());
    ops.copy_to_host(words.data(), t.data, t.bytes());
    for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_f32(words[i]);
  } else {
    SY_CHECK(t.dtype == DType::kF32, "download: ", dtype_name(t.dtype));
    ops.copy_to_host(out.data(), t.data, t.bytes());
  }
  return out;
}
std::vector<int32_t> download_i32(Ops& ops, const Tensor& t) {
  SY_CHECK(t.dtype == DType::kI32, "download_i32: ", dtype_name(t.dtype));
  std::vector<int32_t> out(static_cast<size_t>(t.numel()));
  ops.copy_to_host(out.data(), t.data, t.bytes());
  return out;
}

// Expects |got[i] - want[i]| <= allowed[i] for every i (NaN fails). Prints the first mismatches
// as what[i] (row, col) with rows of row_len elements, and a summary line.
void expect_each_within(const std::string& what, const std::vector<float>& got,
                        const std::vector<float>& want, const std::vector<double>& allowed,
                        int64_t row_len) {
  ASSERT_EQ(got.size(), want.size()) << what;
  ASSERT_EQ(allowed.size(), want.size()) << what;
  const int64_t len = std::max<int64_t>(row_len, 1);
  int64_t n_wrong = 0;
  double max_err = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    max_err = std::fmax(max_err, err);
    if (!(err <= allowed[i])) {
      if (n_wrong < kShownMismatches)
        std::printf("  %s[%zu] (row %lld, col %lld): got %.9g want %.9g, err %.3g > allowed %.3g\n",
                    what.c_str(), i, static_cast<long long>(static_cast<int64_t>(i) / len),
                    static_cast<long long>(static_cast<int64_t>(i) % len), got[i], want[i], err,
                    allowed[i]);
      ++n_wrong;
    }
  }
  if (n_wrong > 0)
    std::printf("%s: %lld of %zu wrong, max abs err %.3g\n", what.c_str(),
                static_cast<long long>(n_wrong), got.size(), max_err);
  EXPECT_EQ(n_wrong, 0) << what;
}

// budget * the largest |want| of each element's row (rows of row_len elements).
std::vector<double> row_scaled(const std::vector<float>& want, int64_t row_len, double budget) {
  std::vector<double> allowed(want.size(), 0.0);
  if (row_len <= 0) return allowed;
  const size_t len = static_cast<size_t>(row_len);
  for (size_t r = 0; r < want.size(); r += len) {
    const size_t end = std::min(want.size(), r + len);
    double scale = 0;
    for (size_t i = r; i < end; ++i) scale = std::fmax(scale, std::fabs(want[i]));
    for (size_t i = r; i < end; ++i) allowed[i] = budget * scale;
  }
  return allowed;
}

// |got - want| <= budget * (the largest |want| of the row), element by element.
void expect_within(const std::string& what, const std::vector<float>& got,
                   const std::vector<float>& want, int64_t row_len, double budget) {
  expect_each_within(what, got, want, row_scaled(want, row_len, budget), row_len);
}

// Attention's budget: kAttentionBudget of the largest |v| (its outputs' scale) everywhere, plus
// kBf16Budget of the row's largest |value| for BF16 out.
void expect_attention_within(const std::string& what, const std::vector<float>& got,
                             const std::vector<float>& want, DType out_dtype, double v_scale,
                             int64_t head_dim) {
  std::vector<double> allowed =
      row_scaled(want, head_dim, out_dtype == DType::kBF16 ? kBf16Budget : 0.0);
  for (double& a : allowed) a += kAttentionBudget * v_scale;
  expect_each_within(what, got, want, allowed, head_dim);
}

// Runs `call`, which must throw sy::Error whose message contains every one of `parts`.
template <typename F>
void expect_error(const std::string& what, F&& call, std::initializer_list<const char*> parts) {
  try {
    call();
    ADD_FAILURE() << what << ": no sy::Error";
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const char* part : parts)
      EXPECT_NE(message.find(part), std::string::npos)
          << what << ": the message does not contain \"" << part << "\": " << message;
  }
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
    cpu_ = make_cpu_ops();
    gpu_ = cuda::make_cuda_ops(0);
  }

  void check_kv_append_and_attention(int64_t head_dim, int64_t block_size, bool attention);
  void check_long_decode(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t block_size);
  void check_prefill(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t block_size);
  void check_moe_gate(int64_t n, int64_t n_experts, int64_t k, int64_t skew_expert, uint64_t seed);

  std::unique_ptr<Ops> cpu_;
  std::unique_ptr<Ops> gpu_;
};

// ---- embedding, rmsnorm, add, swiglu -----------------------------------------------------------

TEST_F(CudaOps, EmbeddingMatchesCpuWithVocabularyRange) {
  const int64_t n_rows = 50, dim = 300, row_offset = 1000;  // dim above a block's 256 threads
  // bf16-representable values: the BF16 and the F32 table hold the same numbers.
  const std::vector<float> table = bf16_rounded(random_vector(n_rows * dim, 1));
  std::mt19937_64 rng(2);
  std::uniform_int_distribution<int32_t> pick(static_cast<int32_t>(row_offset - 20),
                                              static_cast<int32_t>(row_offset + n_rows + 20));
  for (DType dtype : {DType::kBF16, DType::kF32}) {
    const DeviceTensor gtable = upload(*gpu_, table, dtype, {n_rows, dim});
    for (int64_t n : kTokenCounts) {
      // Ids in and around the held rows [row_offset, row_offset + n_rows), edges first.
      std::vector<int32_t> ids(static_cast<size_t>(n));
      for (int32_t& id : ids) id = pick(rng);
      const int32_t edges[] = {
          static_cast<int32_t>(row_offset), static_cast<int32_t>(row_offset + n_rows - 1),
          static_cast<int32_t>(row_offset - 1), static_cast<int32_t>(row_offset + n_rows), 0};
      for (size_t i = 0; i < std::size(edges) && i < ids.size(); ++i) ids[i] = edges[i];
      std::vector<float> want(static_cast<size_t>(n * dim));
      cpu_->embedding(host(want, {n, dim}), host(ids, {n}), host(table, {n_rows, dim}), row_offset);
      // The output starts as garbage: rows of ids held elsewhere must be written as zeros.
      const DeviceTensor out = upload(*gpu_, random_vector(n * dim, 3), DType::kF32, {n, dim});
      const DeviceTensor gids = upload(*gpu_, ids, {n});
      gpu_->embedding(out, gids, gtable, row_offset);
      expect_within(cat("embedding ", dtype_name(dtype), " n=", n), download(*gpu_, out), want, dim,
                    kExact);
    }
  }
}

TEST_F(CudaOps, RmsnormMatchesCpu) {
  const float eps = 1e-5f;
  for (int64_t dim : {int64_t{67}, int64_t{1030}}) {  // under and over one pass of 256 threads
    const std::vector<float> weight = random_vector(dim, 10 + dim);
    const DeviceTensor gweight = upload(*gpu_, weight, DType::kF32, {dim});
    for (int64_t n : kTokenCounts) {
      const std::vector<float> x = random_vector(n * dim, 20 + n, 3.f);
      std::vector<float> want(x.size());
      cpu_->rmsnorm(host(want, {n, dim}), host(x, {n, dim}), host(weight, {dim}), eps);
      const DeviceTensor gx = upload(*gpu_, x, DType::kF32, {n, dim});
      for (DType out_dtype : {DType::kF32, DType::kBF16}) {
        const DeviceTensor out(*gpu_, out_dtype, {n, dim});
        gpu_->rmsnorm(out, gx, gweight, eps);
        expect_within(cat("rmsnorm out ", dtype_name(out_dtype), " dim=", dim, " n=", n),
                      download(*gpu_, out), want, dim,
                      out_dtype == DType::kBF16 ? kF32Budget + kBf16Budget : kF32Budget);
      }
      // In place: out aliases x (F32).
      const DeviceTensor inplace = upload(*gpu_, x, DType::kF32, {n, dim});
      gpu_->rmsnorm(inplace, inplace, gweight, eps);
      expect_within(cat("rmsnorm in place dim=", dim, " n=", n), download(*gpu_, inplace), want,
                    dim, kF32Budget);
    }
  }
}

TEST_F(CudaOps, AddIsExact) {
  const int64_t dim = 200;
  for (int64_t n : kTokenCounts) {
    const std::vector<float> a = random_vector(n * dim, 100 + n, 5.f);
    const std::vector<float> b = random_vector(n * dim, 200 + n);
    std::vector<float> want(a.size());
    cpu_->add(host(want, {n, dim}), host(a, {n, dim}), host(b, {n, dim}));
    const DeviceTensor ga = upload(*gpu_, a, DType::kF32, {n, dim});
    const DeviceTensor gb = upload(*gpu_, b, DType::kF32, {n, dim});
    const DeviceTensor out(*gpu_, DType::kF32, {n, dim});
    gpu_->add(out, ga, gb);
    expect_within(cat("add n=", n), download(*gpu_, out), want, dim, kExact);
    gpu_->add(ga, ga, gb);  // in place, as the residual stream
    expect_within(cat("add in place n=", n), download(*gpu_, ga), want, dim, kExact);
  }
}

TEST_F(CudaOps, SwigluMatchesCpu) {
  const int64_t hidden = 333;
  for (int64_t n : kTokenCounts) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      std::vector<float> gate = random_vector(n * hidden, 300 + n, 6.f);
      std::vector<float> up = random_vector(n * hidden, 400 + n, 2.f);
      if (dtype == DType::kBF16) {
        gate = bf16_rounded(gate);
        up = bf16_rounded(up);
      }
      std::vector<float> want(gate.size());
      cpu_->swiglu(host(want, {n, hidden}), host(gate, {n, hidden}), host(up, {n, hidden}));
      const double budget = dtype == DType::kBF16 ? kF32Budget + kBf16Budget : kF32Budget;
      const DeviceTensor ggate = upload(*gpu_, gate, dtype, {n, hidden});
      const DeviceTensor gup = upload(*gpu_, up, dtype, {n, hidden});
      const DeviceTensor out(*gpu_, dtype, {n, hidden});
      gpu_->swiglu(out, ggate, gup);
      expect_within(cat("swiglu ", dtype_name(dtype), " n=", n), download(*gpu_, out), want, hidden,
                    budget);
      gpu_->swiglu(ggate, ggate, gup);  // in place: out aliases gate
      expect_within(cat("swiglu in place ", dtype_name(dtype), " n=", n), download(*gpu_, ggate),
                    want, hidden, budget);
    }
  }
}

// ---- GEMMs -------------------------------------------------------------------------------------

TEST_F(CudaOps, MatmulMatchesCpu) {
  const std::pair<int64_t, int64_t> shapes[] = {{67, 45}, {1024, 130}};  // (k, n)
  for (const auto& [k, n] : shapes) {
    const std::vector<float> w = random_vector(n * k, 30 + k);
    const std::vector<float> w_bf16 = bf16_rounded(w);
    const DeviceTensor gw_bf16 = upload(*gpu_, w_bf16, DType::kBF16, {n, k});
    const DeviceTensor gw_f32 = upload(*gpu_, w, DType::kF32, {n, k});
    for (int64_t m : kTokenCounts) {
      const std::vector<float> x = random_vector(m * k, 40 + m);
      const std::vector<float> x_bf16 = bf16_rounded(x);
      // The CPU's fp32 GEMM on the bf16-rounded inputs, and on the fp32 inputs.
      std::vector<float> want_bf16(static_cast<size_t>(m * n));
      std::vector<float> want_f32(want_bf16.size());
      cpu_->matmul(host(want_bf16, {m, n}), host(x_bf16, {m, k}), host(w_bf16, {n, k}));
      cpu_->matmul(host(want_f32, {m, n}), host(x, {m, k}), host(w, {n, k}));
      const std::string shape = cat(" m=", m, " k=", k, " n=", n);

      const DeviceTensor gx_bf16 = upload(*gpu_, x_bf16, DType::kBF16, {m, k});
      const DeviceTensor out_f32(*gpu_, DType::kF32, {m, n});
      gpu_->matmul(out_f32, gx_bf16, gw_bf16);
      expect_within("matmul BF16->F32" + shape, download(*gpu_, out_f32), want_bf16, n,
                    kGemmBudget);
      const DeviceTensor out_bf16(*gpu_, DType::kBF16, {m, n});
      gpu_->matmul(out_bf16, gx_bf16, gw_bf16);
      expect_within("matmul BF16->BF16" + shape, download(*gpu_, out_bf16), want_bf16, n,
                    kGemmBudget + kBf16Budget);

      const DeviceTensor gx_f32 = upload(*gpu_, x, DType::kF32, {m, k});
      gpu_->matmul(out_f32, gx_f32, gw_f32);
      expect_within("matmul F32->F32" + shape, download(*gpu_, out_f32), want_f32, n, kGemmBudget);
    }
  }
}

enum class Routing { kSpread, kOneGroup, kAllEmpty };

const char* routing_name(Routing r) {
  switch (r) {
    case Routing::kSpread:
      return "spread";
    case Routing::kOneGroup:
      return "one group";
    case Routing::kAllEmpty:
      return "all empty";
  }
  return "?";
}

// Group offsets [n_groups + 1] for n_rows rows. kSpread: random groups, groups 0 and 5 always
// empty; kOneGroup: every row to group 3; kAllEmpty: no group has rows (they belong to none).
std::vector<int64_t> group_offsets(int64_t n_rows, int64_t n_groups, Routing routing,
                                   uint64_t seed) {
  std::vector<int64_t> counts(static_cast<size_t>(n_groups), 0);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> pick(0, n_groups - 1);
  for (int64_t r = 0; r < n_rows; ++r) {
    if (routing == Routing::kAllEmpty) break;
    int64_t g = 3;
    if (routing == Routing::kSpread) {
      do g = pick(rng);
      while (g == 0 || g == 5);
    }
    ++counts[static_cast<size_t>(g)];
  }
  std::vector<int64_t> offsets(static_cast<size_t>(n_groups) + 1, 0);
  for (size_t g = 0; g < counts.size(); ++g) offsets[g + 1] = offsets[g] + counts[g];
  return offsets;
}

TEST_F(CudaOps, GroupedMatmulMatchesOneCpuMatmulPerGroup) {
  const int64_t n_groups = 8, k = 67, n = 45;
  const std::pair<DType, DType> dtypes[] = {
      {DType::kBF16, DType::kBF16}, {DType::kBF16, DType::kF32}, {DType::kF32, DType::kF32}};
  for (const auto& [in_dtype, out_dtype] : dtypes) {
    // A fresh backend per dtype pair: once cuBLAS refuses the grouped GEMM for a pair the backend
    // falls back to per-group GEMMs for good, and each pair should get its own first try.
    std::unique_ptr<Ops> gpu = cuda::make_cuda_ops(0);
    std::vector<std::vector<float>> w;
    std::vector<DeviceTensor> gw;
    std::vector<Tensor> gw_views;
    gw.reserve(n_groups);
    for (int64_t g = 0; g < n_groups; ++g) {
      w.push_back(random_vector(n * k, 50 + g));
      if (in_dtype == DType::kBF16) w.back() = bf16_rounded(w.back());
      gw.push_back(upload(*gpu, w.back(), in_dtype, {n, k}));
      gw_views.push_back(gw.back());
    }
    const double budget = kGemmBudget + (out_dtype == DType::kBF16 ? kBf16Budget : 0.0);
    for (int64_t m : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{7}, int64_t{19}, int64_t{733}}) {
      for (Routing routing : {Routing::kSpread, Routing::kOneGroup, Routing::kAllEmpty}) {
        const std::string what = cat("grouped_matmul ", dtype_name(in_dtype), "->",
                                     dtype_name(out_dtype), " m=", m, " ", routing_name(routing));
        std::vector<float> x = random_vector(m * k, 60 + m);
        if (in_dtype == DType::kBF16) x = bf16_rounded(x);
        const std::vector<int64_t> offsets = group_offsets(m, n_groups, routing, 70 + m);
        // out starts as a marker that rows in no group must keep.
        std::vector<float> want = random_vector(m * n, 80 + m, 100.f);
        if (out_dtype == DType::kBF16) want = bf16_rounded(want);
        const DeviceTensor gout = upload(*gpu, want, out_dtype, {m, n});
        for (int64_t g = 0; g < n_groups; ++g) {
          const int64_t first = offsets[static_cast<size_t>(g)];
          const int64_t rows = offsets[static_cast<size_t>(g) + 1] - first;
          if (rows > 0)
            cpu_->matmul(host(want, {m, n}).rows(first, rows), host(x, {m, k}).rows(first, rows),
                         host(w[static_cast<size_t>(g)], {n, k}));
        }
        const DeviceTensor gx = upload(*gpu, x, in_dtype, {m, k});
        gpu->grouped_matmul(gout, gx, gw_views.data(), offsets.data(),
                            static_cast<size_t>(n_groups));
        expect_within(what, download(*gpu, gout), want, n, budget);
      }
    }
  }
}

// ---- rope --------------------------------------------------------------------------------------

// The allowed error of each rotated element of x0 [n_tokens, n_heads, head_dim] (see the RoPE
// budgets).
std::vector<double> rope_allowed(const std::vector<float>& x0, const std::vector<int32_t>& pos,
                                 int64_t n_heads, int64_t head_dim, double theta) {
  const int64_t half = head_dim / 2;
  std::vector<double> allowed(x0.size());
  for (size_t t = 0; t < pos.size(); ++t)
    for (int64_t h = 0; h < n_heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        const double angle = pos[t] * std::pow(theta, -2.0 * static_cast<double>(i) / head_dim);
        const double angle_err = i == 0 ? 0.0 : angle * kRopeAngleBudget;
        const size_t base = (t * static_cast<size_t>(n_heads) + static_cast<size_t>(h)) *
                            static_cast<size_t>(head_dim);
        const double mag = std::fabs(x0[base + static_cast<size_t>(i)]) +
                           std::fabs(x0[base + static_cast<size_t>(i + half)]);
        allowed[base + static_cast<size_t>(i)] = allowed[base + static_cast<size_t>(i + half)] =
            mag * (angle_err + kRopeTrigBudget);
      }
  return allowed;
}

TEST_F(CudaOps, RopeMatchesCpu) {
  const double theta = 1e6;
  const int64_t n_q_heads = 8, n_k_heads = 2;
  for (int64_t head_dim : {int64_t{8}, int64_t{128}}) {
    for (int64_t n : kTokenCounts) {
      std::mt19937_64 rng(500 + n);
      std::uniform_int_distribution<int32_t> pick(0, 30000);
      std::vector<int32_t> pos(static_cast<size_t>(n));
      for (int32_t& p : pos) p = pick(rng);
      const int32_t edges[] = {30000, 0, 1, 29999};
      for (size_t i = 0; i < std::size(edges) && i < pos.size(); ++i) pos[i] = edges[i];
      const std::vector<float> q0 = random_vector(n * n_q_heads * head_dim, 600 + n, 2.f);
      const std::vector<float> k0 = random_vector(n * n_k_heads * head_dim, 700 + n, 2.f);
      std::vector<float> q = q0, k = k0;
      cpu_->rope(host(q, {n, n_q_heads, head_dim}), host(k, {n, n_k_heads, head_dim}),
                 host(pos, {n}), theta);
      const DeviceTensor gq = upload(*gpu_, q0, DType::kF32, {n, n_q_heads, head_dim});
      const DeviceTensor gk = upload(*gpu_, k0, DType::kF32, {n, n_k_heads, head_dim});
      const DeviceTensor gpos = upload(*gpu_, pos, {n});
      gpu_->rope(gq, gk, gpos, theta);
      const std::string shape = cat(" head_dim=", head_dim, " n=", n);
      expect_each_within("rope.q" + shape, download(*gpu_, gq), q,
                         rope_allowed(q0, pos, n_q_heads, head_dim, theta), head_dim);
      expect_each_within("rope.k" + shape, download(*gpu_, gk), k,
                         rope_allowed(k0, pos, n_k_heads, head_dim, theta), head_dim);
    }
  }
}

// ---- kv_append and attention -------------------------------------------------------------------

// One sequence of a step: `len` positions, of which the last `new_tokens` are this step's tokens
// (a prefill chunk, or a decode token when 1); the earlier positions are already cached.
struct SeqSpec {
  int64_t len;
  int64_t new_tokens;
};

// The sequences of a step of n_tokens tokens (one of kTokenCounts).
std::vector<SeqSpec> step_sequences(int64_t n_tokens) {
  switch (n_tokens) {
    case 1:
      return {{260, 1}};  // a decode token over three 128-position tiles
    case 3:
      return {{1, 1}, {129, 1}, {17, 1}};  // decodes, one the first token of its sequence
    case 7:
      return {{13, 4}, {5, 1}, {128, 1}, {64, 1}};  // a prefill chunk and decodes
    case 19:
      return {{16, 16}, {300, 1}, {2, 2}};  // whole prompts and a decode
    default: {
      SY_CHECK(n_tokens == 733, "step_sequences: ", n_tokens, " tokens");
      // A 700-token chunk after 100 cached positions, and 33 decode tokens.
      std::vector<SeqSpec> seqs = {{800, 700}};
      for (int64_t i = 0; i < 33; ++i) seqs.push_back({1 + (37 * i) % 290, 1});
      return seqs;
    }
  }
}

// A step over a paged KV cache of shuffled physical blocks (and spare ones nobody uses); unused
// block-table entries are -1. k and v are fp32 [tokens, n_kv_heads, head_dim].
struct PagedStep {
  int64_t n_seqs = 0, max_blocks = 0, n_blocks = 0;
  std::vector<int32_t> tables;              // [n_seqs, max_blocks]
  std::vector<int32_t> past_pos, past_seq;  // positions cached by earlier steps
  std::vector<float> past_k, past_v;        // ... and their keys and values
  std::vector<int32_t> pos, seq;            // this step's tokens
  std::vector<float> k, v;                  // ... and their keys and values
};

PagedStep make_step(const std::vector<SeqSpec>& seqs, int64_t row, int64_t block_size,
                    uint64_t seed) {
  PagedStep s;
  s.n_seqs = static_cast<int64_t>(seqs.size());
  int64_t used_blocks = 0;
  for (const SeqSpec& q : seqs) {
    const int64_t blocks = (q.len + block_size - 1) / block_size;
    used_blocks += blocks;
    s.max_blocks = std::max(s.max_blocks, blocks + 1);  // at least one unused (-1) entry
  }
  s.n_blocks = used_blocks + 5;
  std::vector<int32_t> perm(static_cast<size_t>(s.n_blocks));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(seed));
  s.tables.assign(static_cast<size_t>(s.n_seqs * s.max_blocks), -1);
  size_t next = 0;
  for (int64_t i = 0; i < s.n_seqs; ++i) {
    const SeqSpec& q = seqs[static_cast<size_t>(i)];
    for (int64_t b = 0; b * block_size < q.len; ++b)
      s.tables[static_cast<size_t>(i * s.max_blocks + b)] = perm[next++];
    for (int64_t p = 0; p < q.len; ++p) {
      const bool cached = p < q.len - q.new_tokens;
      (cached ? s.past_pos : s.pos).push_back(static_cast<int32_t>(p));
      (cached ? s.past_seq : s.seq).push_back(static_cast<int32_t>(i));
    }
  }
  s.past_k = random_vector(s.past_pos.size() * static_cast<size_t>(row), seed + 1, 2.f);
  s.past_v = random_vector(s.past_pos.size() * static_cast<size_t>(row), seed + 2);
  s.k = random_vector(s.pos.size() * static_cast<size_t>(row), seed + 3, 2.f);
  s.v = random_vector(s.pos.size() * static_cast<size_t>(row), seed + 4);
  return s;
}

PagedStep make_step(int64_t n_tokens, int64_t row, int64_t block_size, uint64_t seed) {
  return make_step(step_sequences(n_tokens), row, block_size, seed);
}

// For each token count: the step's cached positions and then its tokens go through kv_append on
// both sides (the CPU's F32 cache gets the values rounded to bf16; the GPU's BF16 cache rounds the
// fp32 values itself, its F32 cache gets the rounded values), the caches must be equal, and then
// (when `attention`) attention of random queries must agree for windows 0 and 5, out F32 and BF16.
void CudaOps::check_kv_append_and_attention(int64_t head_dim, int64_t block_size, bool attention) {
  const int64_t n_heads = 8, n_kv_heads = 2;  // GQA: 4 query heads per KV head
  const int64_t row = n_kv_heads * head_dim;
  for (int64_t n : kTokenCounts) {
    const PagedStep s = make_step(n, row, block_size, 1000 + n);
    const int64_t n_past = static_cast<int64_t>(s.past_pos.size());
    const std::vector<float> past_k = bf16_rounded(s.past_k), past_v = bf16_rounded(s.past_v);
    const std::vector<float> k = bf16_rounded(s.k), v = bf16_rounded(s.v);
    const std::string shape = cat(" head_dim=", head_dim, " block=", block_size, " n=", n);

    // The CPU side.
    const size_t cache_numel = static_cast<size_t>(s.n_blocks * block_size * row);
    std::vector<float> k_cache(cache_numel, 0.f), v_cache(cache_numel, 0.f);
    AttentionMeta meta;
    meta.block_tables = host(s.tables, {s.n_seqs, s.max_blocks});
    meta.block_size = block_size;
    const Tensor hk_cache = host(k_cache, {s.n_blocks, block_size, n_kv_heads, head_dim});
    const Tensor hv_cache = host(v_cache, {s.n_blocks, block_size, n_kv_heads, head_dim});
    meta.positions = host(s.past_pos, {n_past});
    meta.token_seq = host(s.past_seq, {n_past});
    cpu_->kv_append(hk_cache, hv_cache, host(past_k, {n_past, n_kv_heads, head_dim}),
                    host(past_v, {n_past, n_kv_heads, head_dim}), meta);
    meta.positions = host(s.pos, {n});
    meta.token_seq = host(s.seq, {n});
    cpu_->kv_append(hk_cache, hv_cache, host(k, {n, n_kv_heads, head_dim}),
                    host(v, {n, n_kv_heads, head_dim}), meta);
    const std::vector<float> q = random_vector(n * n_heads * head_dim, 2000 + n);
    const int64_t windows[] = {0, 5};
    std::vector<std::vector<float>> want;
    double v_scale = 0;  // max |v|: the scale of attention's outputs
    if (attention) {
      for (int64_t window : windows) {
        meta.sliding_window = window;
        want.emplace_back(q.size());
        cpu_->attention(host(want.back(), {n, n_heads, head_dim}), host(q, {n, n_heads, head_dim}),
                        hk_cache, hv_cache, meta);
      }
      for (float x : v_cache) v_scale = std::fmax(v_scale, std::fabs(x));
    }

    // The GPU side.
    const DeviceTensor gtables = upload(*gpu_, s.tables, {s.n_seqs, s.max_blocks});
    const DeviceTensor gpast_pos = upload(*gpu_, s.past_pos, {n_past});
    const DeviceTensor gpast_seq = upload(*gpu_, s.past_seq, {n_past});
    const DeviceTensor gpos = upload(*gpu_, s.pos, {n});
    const DeviceTensor gseq = upload(*gpu_, s.seq, {n});
    const DeviceTensor gq = upload(*gpu_, q, DType::kF32, {n, n_heads, head_dim});
    for (DType cache_dtype : {DType::kBF16, DType::kF32}) {
      const std::string cache = cat(" cache ", dtype_name(cache_dtype));
      // A BF16 cache gets the fp32 values and must round them as f32_to_bf16 does; an F32 cache
      // gets the rounded values. Either way it must then hold the CPU cache's numbers.
      const bool rounded = cache_dtype == DType::kF32;
      const DeviceTensor gk_cache(*gpu_, cache_dtype,
                                  {s.n_blocks, block_size, n_kv_heads, head_dim});
      const DeviceTensor gv_cache(*gpu_, cache_dtype,
                                  {s.n_blocks, block_size, n_kv_heads, head_dim});
      gpu_->fill_zero(gk_cache);
      gpu_->fill_zero(gv_cache);
      AttentionMeta gmeta;
      gmeta.block_tables = gtables;
      gmeta.block_size = block_size;
      gmeta.positions = gpast_pos;
      gmeta.token_seq = gpast_seq;
      const DeviceTensor gpast_k =
          upload(*gpu_, rounded ? past_k : s.past_k, DType::kF32, {n_past, n_kv_heads, head_dim});
      const DeviceTensor gpast_v =
          upload(*gpu_, rounded ? past_v : s.past_v, DType::kF32, {n_past, n_kv_heads, head_dim});
      gpu_->kv_append(gk_cache, gv_cache, gpast_k, gpast_v, gmeta);
      gmeta.positions = gpos;
      gmeta.token_seq = gseq;
      const DeviceTensor gk =
          upload(*gpu_, rounded ? k : s.k, DType::kF32, {n, n_kv_heads, head_dim});
      const DeviceTensor gv =
          upload(*gpu_, rounded ? v : s.v, DType::kF32, {n, n_kv_heads, head_dim});
      gpu_->kv_append(gk_cache, gv_cache, gk, gv, gmeta);
      expect_within("kv_append k" + cache + shape, download(*gpu_, gk_cache), k_cache, row, kExact);
      expect_within("kv_append v" + cache + shape, download(*gpu_, gv_cache), v_cache, row, kExact);
      if (!attention) continue;

      for (size_t w = 0; w < std::size(windows); ++w) {
        gmeta.sliding_window = windows[w];
        for (DType out_dtype : {DType::kF32, DType::kBF16}) {
          const DeviceTensor out(*gpu_, out_dtype, {n, n_heads, head_dim});
          gpu_->attention(out, gq, gk_cache, gv_cache, gmeta);
          expect_attention_within(
              cat("attention window=", windows[w], " out ", dtype_name(out_dtype), cache, shape),
              download(*gpu_, out), want[w], out_dtype, v_scale, head_dim);
        }
      }
    }
  }
}

TEST_F(CudaOps, KvAppendWritesTheCpuCacheRoundedToBf16) {
  check_kv_append_and_attention(128, 16, false);
  check_kv_append_and_attention(64, 5, false);
}

TEST_F(CudaOps, PagedAttentionHeadDim128MatchesCpu) {
  check_kv_append_and_attention(128, 16, true);
}

TEST_F(CudaOps, PagedAttentionHeadDim64OddBlocksMatchesCpu) {
  check_kv_append_and_attention(64, 5, true);
}

// Decode plans (one token per sequence; Mixtral's head_dim, a BF16 cache on an H100).
cuda::AttentionPlan decode_plan(int64_t n, int64_t heads, int64_t kv_heads, int64_t capacity,
                                int64_t window, int sms) {
  return cuda::plan_attention(n, n, heads, kv_heads, 128, capacity, window, true, sms, 9);
}

// Flash-decoding plans: a function of shapes only, splitting the context only for steps with too
// few (KV head, token) pairs to fill the GPU, in whole tiles that cover the longest context the
// block table (or the window) allows. Host code: runs without a GPU.
TEST(CudaAttentionPlan, SplitsOnlySmallStepsAndCoversTheContext) {
  const int sms = 132;
  // Mixtral, batch 1, a 32k table: many splits, whole 128-position tiles, covering 32768.
  const cuda::AttentionPlan one = decode_plan(1, 32, 8, 32768, 0, sms);
  EXPECT_EQ(one.sub_blocks, 1);
  EXPECT_GT(one.n_splits, 1);
  EXPECT_LE(one.n_splits, 64);
  EXPECT_EQ(one.split_len % 128, 0);
  EXPECT_GE(one.n_splits * one.split_len, 32768);
  EXPECT_LT((one.n_splits - 1) * one.split_len, 32768);  // no split wholly past the table
  EXPECT_EQ(one.tile_tokens, 0);
  // Enough blocks for the GPU without splitting: batch 64 (512 blocks), or a prefill chunk.
  EXPECT_EQ(decode_plan(64, 32, 8, 32768, 0, sms).n_splits, 1);
  EXPECT_EQ(decode_plan(733, 32, 8, 32768, 0, sms).n_splits, 1);
  // A window bounds the context: the splits cover the window, not the table.
  const cuda::AttentionPlan win = decode_plan(1, 32, 8, 32768, 4096, sms);
  EXPECT_GT(win.n_splits, 1);
  EXPECT_GE(win.n_splits * win.split_len, 4096);
  EXPECT_LT((win.n_splits - 1) * win.split_len, 4096);
  // Short tables are not split; neither is anything on a one-multiprocessor device.
  EXPECT_EQ(decode_plan(1, 32, 8, 256, 0, sms).n_splits, 1);
  EXPECT_EQ(decode_plan(1, 32, 8, 32768, 0, 1).n_splits, 1);
  // Groups above 8 query heads per KV head take several blocks each.
  EXPECT_EQ(decode_plan(4, 12, 1, 512, 0, sms).sub_blocks, 2);
  EXPECT_EQ(decode_plan(4, 64, 4, 512, 0, sms).sub_blocks, 2);
  EXPECT_EQ(decode_plan(4, 4, 4, 512, 0, sms).sub_blocks, 1);
  // Splits times blocks stay near the target: no flood of empty blocks at batch 1.
  const cuda::AttentionPlan tp = decode_plan(2, 4, 1, 32768, 0, sms);  // a TP slice
  EXPECT_LE(tp.n_splits * 2, 2 * 2 * sms);
}

// Prefill plans: a sequence with several tokens in the step sends query tiles of 64 rows to the
// tensor cores (sm_80+, BF16 cache, head_dim 64 or 128), never with splits; otherwise none.
TEST(CudaAttentionPlan, PrefillTilesOnTensorCores) {
  auto plan = [](int64_t n, int64_t n_seqs, int64_t heads, int64_t kv, int64_t head_dim, bool bf16,
                 int major) {
    return cuda::plan_attention(n, n_seqs, heads, kv, head_dim, 4096, 0, bf16, 132, major);
  };
  const cuda::AttentionPlan chunk = plan(733, 34, 32, 8, 128, true, 9);
  EXPECT_EQ(chunk.tile_tokens, 16);  // 16 tokens x 4 heads
  EXPECT_EQ(chunk.n_splits, 1);
  EXPECT_EQ(plan(2, 1, 32, 8, 128, true, 8).tile_tokens, 16);  // even 2 tokens, on sm_80
  EXPECT_EQ(plan(5, 1, 8, 8, 64, true, 9).tile_tokens, 64);    // one head per KV head
  EXPECT_EQ(plan(5, 1, 8, 1, 64, true, 9).tile_tokens, 8);     // 8 heads per KV head
  EXPECT_EQ(plan(5, 1, 12, 1, 64, true, 9).tile_tokens, 8);    // 12: two blocks of up to 8
  EXPECT_EQ(plan(5, 1, 12, 1, 64, true, 9).sub_blocks, 2);
  EXPECT_EQ(plan(64, 64, 32, 8, 128, true, 9).tile_tokens, 0);    // pure decode
  EXPECT_EQ(plan(733, 34, 32, 8, 128, false, 9).tile_tokens, 0);  // F32 cache
  EXPECT_EQ(plan(733, 34, 32, 8, 128, true, 7).tile_tokens, 0);   // before sm_80
  EXPECT_EQ(plan(733, 34, 32, 8, 96, true, 9).tile_tokens, 0);    // head_dim 96
}

// Long decode contexts through the split (flash-decoding) path: one decode token per sequence at
// contexts 1 to 5000 (splits ending mid-tile and splits wholly past a short context), windows 0
// and 700 (a window cutting across splits), caches BF16 and F32, out F32 and BF16, and query
// heads per KV head 4, 1, 8 and 12 (two blocks per KV head, the second with 4 heads). The plan
// for these shapes must split, or the test would not test it. Budgets as for the paged test.
void CudaOps::check_long_decode(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                                int64_t block_size) {
  const std::vector<int64_t> contexts = {1, 200, 1000, 2777, 5000};
  const int64_t n = static_cast<int64_t>(contexts.size());
  const int64_t row = n_kv_heads * head_dim;
  const int64_t max_blocks = 5000 / block_size + 2;
  int64_t n_blocks = 3;  // spares nobody uses
  for (int64_t c : contexts) n_blocks += (c + block_size - 1) / block_size;
  std::vector<int32_t> perm(static_cast<size_t>(n_blocks));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(static_cast<uint64_t>(n_heads)));
  std::vector<int32_t> tables(static_cast<size_t>(n * max_blocks), -1), pos, seq;
  size_t next = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = contexts[static_cast<size_t>(i)];
    for (int64_t b = 0; b * block_size < c; ++b)
      tables[static_cast<size_t>(i * max_blocks + b)] = perm[next++];
    pos.push_back(static_cast<int32_t>(c - 1));
    seq.push_back(static_cast<int32_t>(i));
  }
  // Every slot holds a value, read or not: a slot read by mistake changes the result.
  const size_t cache_numel = static_cast<size_t>(n_blocks * block_size * row);
  const std::vector<float> k_cache = bf16_rounded(random_vector(cache_numel, 3100, 2.f));
  const std::vector<float> v_cache = bf16_rounded(random_vector(cache_numel, 3101));
  double v_scale = 0;
  for (float x : v_cache) v_scale = std::fmax(v_scale, std::fabs(x));
  const std::vector<float> q = random_vector(n * n_heads * head_dim, 3102);
  const std::string shape = cat(" heads=", n_heads, "/", n_kv_heads, " head_dim=", head_dim);

  cudaDeviceProp prop{};
  ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
  for (int64_t window : {0, 700}) {
    const cuda::AttentionPlan plan =
        cuda::plan_attention(n, n, n_heads, n_kv_heads, head_dim, max_blocks * block_size, window,
                             true, prop.multiProcessorCount, prop.major);
    ASSERT_GT(plan.n_splits, 1) << "window " << window << shape;
    AttentionMeta meta;
    meta.block_tables = host(tables, {n, max_blocks});
    meta.block_size = block_size;
    meta.positions = host(pos, {n});
    meta.token_seq = host(seq, {n});
    meta.sliding_window = window;
    std::vector<float> want(q.size());
    cpu_->attention(host(want, {n, n_heads, head_dim}), host(q, {n, n_heads, head_dim}),
                    host(k_cache, {n_blocks, block_size, n_kv_heads, head_dim}),
                    host(v_cache, {n_blocks, block_size, n_kv_heads, head_dim}), meta);

    AttentionMeta gmeta = meta;
    const DeviceTensor gtables = upload(*gpu_, tables, {n, max_blocks});
    const DeviceTensor gpos = upload(*gpu_, pos, {n});
    const DeviceTensor gseq = upload(*gpu_, seq, {n});
    const DeviceTensor gq = upload(*gpu_, q, DType::kF32, {n, n_heads, head_dim});
    gmeta.block_tables = gtables;
    gmeta.positions = gpos;
    gmeta.token_seq = gseq;
    for (DType cache_dtype : {DType::kBF16, DType::kF32}) {
      const DeviceTensor gk =
          upload(*gpu_, k_cache, cache_dtype, {n_blocks, block_size, n_kv_heads, head_dim});
      const DeviceTensor gv =
          upload(*gpu_, v_cache, cache_dtype, {n_blocks, block_size, n_kv_heads, head_dim});
      for (DType out_dtype : {DType::kF32, DType::kBF16}) {
        const DeviceTensor out(*gpu_, out_dtype, {n, n_heads, head_dim});
        gpu_->attention(out, gq, gk, gv, gmeta);
        expect_attention_within(cat("long decode window=", window, " cache ",
                                    dtype_name(cache_dtype), " out ", dtype_name(out_dtype), shape),
                                download(*gpu_, out), want, out_dtype, v_scale, head_dim);
      }
    }
  }
}

// The fragment layouts of kernels/cuda/mma.cuh (mma_check.cu): D = A B on the tensor cores, A
// and B loaded and D stored by the documented layouts, equals the plain product for bf16-exact
// inputs (16 exact products summed in fp32). On a GPU this checks the layouts the attention
// kernel relies on against the hardware.
TEST_F(CudaOps, MmaFragmentLayoutsGiveThePlainProduct) {
  cudaDeviceProp prop{};
  ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
  if (prop.major < 8) GTEST_SKIP() << "tensor-core bf16 needs sm_80";
  const std::vector<float> a = bf16_rounded(random_vector(16 * 16, 5000));
  const std::vector<float> b = bf16_rounded(random_vector(16 * 8, 5001));
  std::vector<float> want(16 * 8);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double acc = 0;
      for (int k = 0; k < 16; ++k) acc += double(a[i * 16 + k]) * b[k * 8 + j];
      want[i * 8 + j] = static_cast<float>(acc);
    }
  const DeviceTensor ga = upload(*gpu_, a, DType::kF32, {16, 16});
  const DeviceTensor gb = upload(*gpu_, b, DType::kF32, {16, 8});
  const DeviceTensor gd(*gpu_, DType::kF32, {16, 8});
  cuda::mma_check(gd, ga, gb, prop.major, cuda::stream_of(*gpu_));
  expect_within("mma m16n8k16", download(*gpu_, gd), want, 8, 1e-6);
}

// Prefill through the tensor-core kernel (attention_mma.cu) and the per-token kernel beside it: a
// step of a 130-token chunk after 300 cached positions, a decode token, a whole 45-token prompt
// and a 3-token chunk after 500, so that query tiles straddle sequences (each kernel takes its
// part of such a tile); windows 0, 5 (rows whose keys all fall in one tile, or none in a tile)
// and 100; a BF16 cache (the kernel's), out F32 and BF16. The plan must tile the step, or the
// test would not test the kernel. Queries and softmax weights enter the MMAs as bf16 hi + lo
// pairs, so the budget is the fp32 kernel's.
void CudaOps::check_prefill(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                            int64_t block_size) {
  const int64_t row = n_kv_heads * head_dim;
  const PagedStep s = make_step({{430, 130}, {77, 1}, {45, 45}, {503, 3}}, row, block_size,
                                static_cast<uint64_t>(4000 + n_heads * 10 + head_dim));
  const int64_t n = static_cast<int64_t>(s.pos.size());
  const int64_t n_past = static_cast<int64_t>(s.past_pos.size());
  const std::string shape =
      cat(" heads=", n_heads, "/", n_kv_heads, " head_dim=", head_dim, " block=", block_size);
  // The cache holds bf16 values on both sides: the CPU's is F32 of the rounded values.
  std::vector<int32_t> all_pos = s.past_pos, all_seq = s.past_seq;
  all_pos.insert(all_pos.end(), s.pos.begin(), s.pos.end());
  all_seq.insert(all_seq.end(), s.seq.begin(), s.seq.end());
  std::vector<float> all_k = bf16_rounded(s.past_k), all_v = bf16_rounded(s.past_v);
  const std::vector<float> k = bf16_rounded(s.k), v = bf16_rounded(s.v);
  all_k.insert(all_k.end(), k.begin(), k.end());
  all_v.insert(all_v.end(), v.begin(), v.end());
  const int64_t n_all = n_past + n;
  const size_t cache_numel = static_cast<size_t>(s.n_blocks * block_size * row);
  std::vector<float> k_cache(cache_numel, 0.f), v_cache(cache_numel, 0.f);
  AttentionMeta meta;
  meta.block_tables = host(s.tables, {s.n_seqs, s.max_blocks});
  meta.block_size = block_size;
  meta.positions = host(all_pos, {n_all});
  meta.token_seq = host(all_seq, {n_all});
  const std::initializer_list<int64_t> cache_shape = {s.n_blocks, block_size, n_kv_heads, head_dim};
  cpu_->kv_append(host(k_cache, cache_shape), host(v_cache, cache_shape),
                  host(all_k, {n_all, n_kv_heads, head_dim}),
                  host(all_v, {n_all, n_kv_heads, head_dim}), meta);
  double v_scale = 0;
  for (float x : v_cache) v_scale = std::fmax(v_scale, std::fabs(x));
  const std::vector<float> q = random_vector(n * n_heads * head_dim, 4100 + n_heads);
  meta.positions = host(s.pos, {n});
  meta.token_seq = host(s.seq, {n});

  cudaDeviceProp prop{};
  ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
  const cuda::AttentionPlan plan =
      cuda::plan_attention(n, s.n_seqs, n_heads, n_kv_heads, head_dim, s.max_blocks * block_size, 0,
                           true, prop.multiProcessorCount, prop.major);
  ASSERT_GT(plan.tile_tokens, 0) << shape;
  const DeviceTensor gk = upload(*gpu_, k_cache, DType::kBF16, cache_shape);
  const DeviceTensor gv = upload(*gpu_, v_cache, DType::kBF16, cache_shape);
  const DeviceTensor gtables = upload(*gpu_, s.tables, {s.n_seqs, s.max_blocks});
  const DeviceTensor gpos = upload(*gpu_, s.pos, {n});
  const DeviceTensor gseq = upload(*gpu_, s.seq, {n});
  const DeviceTensor gq = upload(*gpu_, q, DType::kF32, {n, n_heads, head_dim});
  AttentionMeta gmeta = meta;
  gmeta.block_tables = gtables;
  gmeta.positions = gpos;
  gmeta.token_seq = gseq;
  for (int64_t window : {0, 5, 100}) {
    meta.sliding_window = gmeta.sliding_window = window;
    std::vector<float> want(q.size());
    cpu_->attention(host(want, {n, n_heads, head_dim}), host(q, {n, n_heads, head_dim}),
                    host(k_cache, cache_shape), host(v_cache, cache_shape), meta);
    for (DType out_dtype : {DType::kF32, DType::kBF16}) {
      const DeviceTensor out(*gpu_, out_dtype, {n, n_heads, head_dim});
      gpu_->attention(out, gq, gk, gv, gmeta);
      expect_attention_within(cat("prefill window=", window, " out ", dtype_name(out_dtype), shape),
                              download(*gpu_, out), want, out_dtype, v_scale, head_dim);
    }
  }
}

TEST_F(CudaOps, PrefillOnTensorCoresMatchesCpu) {
  check_prefill(8, 2, 128, 16);  // Mixtral's 4 query heads per KV head: 16-token tiles
  check_prefill(4, 4, 64, 16);   // one query head per KV head: 64-token tiles
  check_prefill(8, 1, 128, 7);   // 8 per KV head, an odd block size
  check_prefill(12, 1, 64, 16);  // two blocks per KV head, the second with 4 heads
}

TEST_F(CudaOps, LongDecodeSplitsTheContextAndMatchesCpu) {
  check_long_decode(8, 2, 128, 16);  // Mixtral's 4 query heads per KV head
  check_long_decode(4, 4, 128, 16);  // one query head per KV head
  check_long_decode(8, 1, 128, 16);  // a full block of 8
  check_long_decode(12, 1, 64, 5);   // two blocks per KV head, odd block size
}

// ---- the MoE ops -------------------------------------------------------------------------------

// moe_gate on n tokens of random logits (every 5th token with an exact tie between experts 1 and
// n_experts - 1, which both sides break to the lower index), skewed to `skew_expert` (+50 on its
// logit) when >= 0.
void CudaOps::check_moe_gate(int64_t n, int64_t n_experts, int64_t k, int64_t skew_expert,
                             uint64_t seed) {
  const std::string what = cat("moe_gate n=", n, " top-", k, " of ", n_experts,
                               skew_expert >= 0 ? cat(" all to expert ", skew_expert) : "");
  std::vector<float> logits = random_vector(n * n_experts, seed, 4.f);
  for (int64_t t = 0; t < n; ++t) {
    float* l = logits.data() + t * n_experts;
    if (t % 5 == 0) l[n_experts - 1] = l[1];
    if (skew_expert >= 0) l[skew_expert] += 50.f;
  }
  std::vector<int32_t> want_idx(static_cast<size_t>(n * k));
  std::vector<float> want_w(want_idx.size());
  cpu_->moe_gate(host(want_idx, {n, k}), host(want_w, {n, k}), host(logits, {n, n_experts}));
  const DeviceTensor gidx(*gpu_, DType::kI32, {n, k});
  const DeviceTensor gw(*gpu_, DType::kF32, {n, k});
  const DeviceTensor glogits = upload(*gpu_, logits, DType::kF32, {n, n_experts});
  gpu_->moe_gate(gidx, gw, glogits);
  const std::vector<int32_t> idx = download_i32(*gpu_, gidx);
  const std::vector<float> w = download(*gpu_, gw);

  int64_t n_wrong = 0, n_ties = 0, n_not_skewed = 0;
  std::vector<double> p(static_cast<size_t>(n_experts));
  for (int64_t t = 0; t < n; ++t) {
    // The softmax in double: only to tell near-ties apart.
    const float* l = logits.data() + t * n_experts;
    const double max_l = *std::max_element(l, l + n_experts);
    double sum = 0;
    for (int64_t e = 0; e < n_experts; ++e)
      sum += (p[static_cast<size_t>(e)] = std::exp(l[e] - max_l));
    for (double& x : p) x /= sum;
    const size_t row = static_cast<size_t>(t * k);
    if (skew_expert >= 0 && idx[row] != skew_expert) ++n_not_skewed;
    size_t j = 0;
    while (j < static_cast<size_t>(k) && idx[row + j] == want_idx[row + j]) ++j;
    if (j == static_cast<size_t>(k)) {  // the same experts: the weights must agree
      for (j = 0; j < static_cast<size_t>(k); ++j) {
        if (std::fabs(static_cast<double>(w[row + j]) - want_w[row + j]) <= kRouterWeightBudget)
          continue;
        if (n_wrong++ < kShownMismatches)
          std::printf("  %s token %lld slot %zu: expert %d weight got %.9g want %.9g\n",
                      what.c_str(), static_cast<long long>(t), j, idx[row + j], w[row + j],
                      want_w[row + j]);
      }
      continue;
    }
    const int32_t got_e = idx[row + j], want_e = want_idx[row + j];
    if (got_e >= 0 && got_e < n_experts &&
        std::fabs(p[static_cast<size_t>(got_e)] - p[static_cast<size_t>(want_e)]) <= kRouterTie) {
      ++n_ties;  // either choice is right; the rest of the token follows from it
      continue;
    }
    if (n_wrong++ < kShownMismatches)
      std::printf("  %s token %lld slot %zu: got expert %d, want expert %d (p %.9g vs %.9g)\n",
                  what.c_str(), static_cast<long long>(t), j, got_e, want_e,
                  got_e >= 0 && got_e < n_experts ? p[static_cast<size_t>(got_e)] : -1.0,
                  p[static_cast<size_t>(want_e)]);
  }
  if (n_wrong > 0) std::printf("%s: %lld wrong\n", what.c_str(), static_cast<long long>(n_wrong));
  if (n_ties > 0)
    std::printf("%s: %lld tokens decided by a near-tie (either choice accepted)\n", what.c_str(),
                static_cast<long long>(n_ties));
  EXPECT_EQ(n_wrong, 0) << what;
  EXPECT_EQ(n_not_skewed, 0) << what;
}

TEST_F(CudaOps, MoeGateMatchesCpu) {
  for (int64_t n : kTokenCounts) check_moe_gate(n, 8, 2, -1, 3000 + n);
  for (int64_t n : kTokenCounts) check_moe_gate(n, 4, 1, -1, 3100 + n);
  check_moe_gate(733, 8, 2, 5, 3200);  // every token to expert 5
  check_moe_gate(19, 4, 1, 0, 3201);
  check_moe_gate(0, 8, 2, -1, 3202);  // no tokens
}

enum class Rows { kRouted, kOneToken, kNone };

const char* rows_name(Rows r) {
  switch (r) {
    case Rows::kRouted:
      return "routed";
    case Rows::kOneToken:
      return "one token gets everything";
    case Rows::kNone:
      return "no rows";
  }
  return "?";
}

// Token index of each row of an MoE permutation over n_tokens tokens. kRouted: each token 0..3
// times (random), rows in random order; kOneToken: 3 * n_tokens rows all of token n_tokens / 2;
// kNone: no rows.
std::vector<int32_t> permutation_rows(int64_t n_tokens, Rows pattern, uint64_t seed) {
  std::vector<int32_t> rows;
  std::mt19937_64 rng(seed);
  if (pattern == Rows::kRouted) {
    std::uniform_int_distribution<int> times(0, 3);
    for (int64_t t = 0; t < n_tokens; ++t)
      for (int c = times(rng); c > 0; --c) rows.push_back(static_cast<int32_t>(t));
    std::shuffle(rows.begin(), rows.end(), rng);
  } else if (pattern == Rows::kOneToken) {
    rows.assign(static_cast<size_t>(3 * n_tokens), static_cast<int32_t>(n_tokens / 2));
  }
  return rows;
}

TEST_F(CudaOps, GatherRowsMatchesCpu) {
  const int64_t dim = 333;  // odd: a row is not a whole number of 32-bit words in BF16
  for (int64_t n : kTokenCounts) {
    // bf16-representable values: the F32 and the BF16 rows hold the same numbers.
    const std::vector<float> x = bf16_rounded(random_vector(n * dim, 4000 + n));
    for (Rows pattern : {Rows::kRouted, Rows::kOneToken, Rows::kNone}) {
      const std::vector<int32_t> rows = permutation_rows(n, pattern, 4100 + n);
      const int64_t n_rows = static_cast<int64_t>(rows.size());
      std::vector<float> want(static_cast<size_t>(n_rows * dim));
      cpu_->gather_rows(host(want, {n_rows, dim}), host(x, {n, dim}), host(rows, {n_rows}));
      const DeviceTensor grows = upload(*gpu_, rows, {n_rows});
      for (DType dtype : {DType::kF32, DType::kBF16}) {
        const DeviceTensor out(*gpu_, dtype, {n_rows, dim});
        const DeviceTensor gx = upload(*gpu_, x, dtype, {n, dim});
        gpu_->gather_rows(out, gx, grows);
        expect_within(cat("gather_rows ", dtype_name(dtype), " n=", n, " ", rows_name(pattern)),
                      download(*gpu_, out), want, dim, kExact);
      }
    }
  }
}

TEST_F(CudaOps, ScatterAddWeightedMatchesCpu) {
  const int64_t dim = 200;
  for (int64_t n : kTokenCounts) {
    for (Rows pattern : {Rows::kRouted, Rows::kOneToken, Rows::kNone}) {
      const std::vector<int32_t> rows = permutation_rows(n, pattern, 5000 + n);
      const int64_t n_rows = static_cast<int64_t>(rows.size());
      std::vector<float> weights = random_vector(n_rows, 5100 + n);
      for (float& x : weights) x = std::fabs(x);  // router weights are in [0, 1]
      const std::vector<float> out0 = random_vector(n * dim, 5200 + n);
      for (DType dtype : {DType::kF32, DType::kBF16}) {
        std::vector<float> x = random_vector(n_rows * dim, 5300 + n);
        if (dtype == DType::kBF16) x = bf16_rounded(x);
        std::vector<float> want = out0;
        cpu_->scatter_add_weighted(host(want, {n, dim}), host(x, {n_rows, dim}),
                                   host(rows, {n_rows}), host(weights, {n_rows}));
        // The allowed error: count * kScatterBudgetPerRow * (|out0| + sum |w x|).
        std::vector<double> allowed(out0.size());
        std::vector<int64_t> count(static_cast<size_t>(n), 0);
        for (size_t i = 0; i < out0.size(); ++i) allowed[i] = std::fabs(out0[i]);
        for (size_t r = 0; r < rows.size(); ++r) {
          const size_t t = static_cast<size_t>(rows[r]);
          ++count[t];
          for (size_t i = 0; i < static_cast<size_t>(dim); ++i)
            allowed[t * dim + i] += std::fabs(double(weights[r]) * x[r * dim + i]);
        }
        for (size_t i = 0; i < allowed.size(); ++i)
          allowed[i] *= static_cast<double>(count[i / dim]) * kScatterBudgetPerRow;
        const DeviceTensor gout = upload(*gpu_, out0, DType::kF32, {n, dim});
        const DeviceTensor gx = upload(*gpu_, x, dtype, {n_rows, dim});
        const DeviceTensor grows = upload(*gpu_, rows, {n_rows});
        const DeviceTensor gweights = upload(*gpu_, weights, DType::kF32, {n_rows});
        gpu_->scatter_add_weighted(gout, gx, grows, gweights);
        expect_each_within(
            cat("scatter_add_weighted x ", dtype_name(dtype), " n=", n, " ", rows_name(pattern)),
            download(*gpu_, gout), want, allowed, dim);
      }
    }
  }
}

// ---- errors ------------------------------------------------------------------------------------

TEST_F(CudaOps, BadOperandsThrowNamingTheOp) {
  Ops& g = *gpu_;
  const DeviceTensor x(g, DType::kBF16, {3, 67});
  const DeviceTensor w_short(g, DType::kBF16, {45, 66});
  const DeviceTensor w_f32(g, DType::kF32, {45, 67});
  const DeviceTensor out(g, DType::kF32, {3, 45});
  expect_error("matmul inner dims", [&] { g.matmul(out, x, w_short); }, {"matmul"});
  expect_error("matmul dtypes", [&] { g.matmul(out, x, w_f32); }, {"matmul"});
  const Tensor ws[] = {w_f32, w_short};
  const int64_t offsets[] = {0, 1, 3};
  expect_error("grouped_matmul", [&] { g.grouped_matmul(out, x, ws, offsets, 2); },
               {"grouped_matmul"});

  // Attention with head_dim 512, above the GPU kernel's limit.
  const DeviceTensor q(g, DType::kF32, {1, 1, 512});
  const DeviceTensor cache(g, DType::kBF16, {1, 4, 1, 512});
  const DeviceTensor attn_out(g, DType::kF32, {1, 1, 512});
  const DeviceTensor zero = upload(g, std::vector<int32_t>{0}, {1});
  const DeviceTensor table = upload(g, std::vector<int32_t>{0}, {1, 1});
  AttentionMeta meta;
  meta.positions = zero;
  meta.token_seq = zero;
  meta.block_tables = table;
  meta.block_size = 4;
  expect_error("attention head_dim 512", [&] { g.attention(attn_out, q, cache, cache, meta); },
               {"attention", "head_dim 512"});

  const DeviceTensor a(g, DType::kF32, {3, 4});
  const DeviceTensor weight3(g, DType::kF32, {3});
  expect_error("rmsnorm weight", [&] { g.rmsnorm(a, a, weight3, 1e-5f); }, {"rmsnorm.weight"});
  const DeviceTensor odd(g, DType::kF32, {1, 1, 7});
  expect_error("rope odd head_dim", [&] { g.rope(odd, odd, zero, 1e6); }, {"rope"});
  const DeviceTensor logits(g, DType::kF32, {1, 2});
  const DeviceTensor idx3(g, DType::kI32, {1, 3});
  const DeviceTensor w3(g, DType::kF32, {1, 3});
  expect_error("moe_gate top-3 of 2", [&] { g.moe_gate(idx3, w3, logits); }, {"moe_gate"});
  const DeviceTensor b16(g, DType::kBF16, {3, 4});
  expect_error("swiglu dtypes", [&] { g.swiglu(a, a, b16); }, {"swiglu"});
  const DeviceTensor kv(g, DType::kF32, {1, 1, 8});
  const DeviceTensor kv_cache(g, DType::kBF16, {1, 4, 1, 16});
  meta.block_size = 4;
  expect_error("kv_append head_dim", [&] { g.kv_append(kv_cache, kv_cache, kv, kv, meta); },
               {"kv_append"});

  // Nothing was launched: the backend still works.
  const DeviceTensor ones = upload(g, std::vector<float>(12, 1.f), DType::kF32, {3, 4});
  g.add(a, ones, ones);
  expect_within("add after errors", download(g, a), std::vector<float>(12, 2.f), 4, kExact);
}

TEST_F(CudaOps, HostTensorsAreRefused) {
  Ops& g = *gpu_;
  // Host memory, as the CPU backend passes it (Device::kCpu): the CUDA launchers must refuse it
  // before a kernel dereferences a host pointer.
  std::vector<float> x(12, 1.f), y(12, 1.f), w(20, 1.f), out(15, 0.f), norm_w(4, 1.f);
  std::vector<float> weights(3, 0.5f), q(4, 1.f), cache(16, 1.f);
  std::vector<int32_t> ids(3, 0), one_id(1, 0);
  const Tensor hx = host(x, {3, 4}), hy = host(y, {3, 4}), hw = host(w, {5, 4});
  const Tensor hout = host(out, {3, 5}), hnorm_w = host(norm_w, {4});
  const Tensor hids = host(ids, {3}), hweights = host(weights, {3});
  const Tensor hx3 = hx.reshape({3, 1, 4}), hy3 = hy.reshape({3, 1, 4});
  const DeviceTensor gx(g, DType::kF32, {3, 4});
  const DeviceTensor gout(g, DType::kF32, {3, 5});

  expect_error("add, all host", [&] { g.add(hx, hx, hy); }, {"add", "host memory"});
  expect_error("add, one host", [&] { g.add(gx, gx, hy); }, {"add", "host memory"});
  expect_error("matmul, all host", [&] { g.matmul(hout, hx, hw); }, {"matmul", "on the GPU"});
  expect_error("matmul, w host", [&] { g.matmul(gout, gx, hw); }, {"matmul", "on the GPU"});
  const int64_t offsets[] = {0, 3};
  expect_error("grouped_matmul", [&] { g.grouped_matmul(hout, hx, &hw, offsets, 1); },
               {"grouped_matmul", "on the GPU"});
  expect_error("rmsnorm", [&] { g.rmsnorm(hx, hx, hnorm_w, 1e-5f); }, {"rmsnorm", "host memory"});
  expect_error("swiglu", [&] { g.swiglu(hx, hx, hy); }, {"swiglu", "host memory"});
  expect_error("embedding", [&] { g.embedding(hx, hids, hy, 0); }, {"embedding", "host memory"});
  expect_error("gather_rows", [&] { g.gather_rows(hx, hy, hids); }, {"gather_rows", "host memory"});
  expect_error("scatter_add_weighted", [&] { g.scatter_add_weighted(hx, hy, hids, hweights); },
               {"scatter_add_weighted", "host memory"});
  expect_error("moe_gate",
               [&] {
                 g.moe_gate(hids.reshape({3, 1}), hweights.reshape({3, 1}), hx);
               },
               {"moe_gate", "host memory"});
  expect_error("rope", [&] { g.rope(hx3, hy3, hids, 1e6); }, {"rope", "host memory"});
  AttentionMeta meta;
  meta.positions = host(one_id, {1});
  meta.token_seq = host(one_id, {1});
  meta.block_tables = host(one_id, {1, 1});
  meta.block_size = 4;
  const Tensor hq = host(q, {1, 1, 4}), hcache = host(cache, {1, 4, 1, 4});
  expect_error("kv_append", [&] { g.kv_append(hcache, hcache, hq, hq, meta); },
               {"kv_append", "host memory"});
  expect_error("attention", [&] { g.attention(hq, hq, hcache, hcache, meta); },
               {"attention", "host memory"});
}

// ---- routing on the device and graphs -----------------------------------------------------------

// moe_route on the GPU makes exactly the host layout (the CPU backend's default moe_route):
// stable in token order, rows of experts outside the range marked -1 with weight 0.
TEST_F(CudaOps, MoeRouteMatchesHostLayout) {
  const int64_t n_experts = 8, k = 2;
  for (int64_t n : {int64_t{1}, int64_t{3}, int64_t{7}, int64_t{19}, int64_t{128}, int64_t{733}}) {
    for (int skew = 0; skew < 2; ++skew) {
      std::mt19937_64 rng(static_cast<uint64_t>(900 + n + skew));
      std::vector<int32_t> idx(static_cast<size_t>(n * k));
      for (int64_t t = 0; t < n; ++t) {
        const int32_t a = skew ? 6 : static_cast<int32_t>(rng() % n_experts);
        int32_t b = skew ? 7 : static_cast<int32_t>(rng() % n_experts);
        if (b == a) b = (a + 1) % n_experts;
        idx[static_cast<size_t>(t * k)] = a;
        idx[static_cast<size_t>(t * k + 1)] = b;
      }
      const std::vector<float> w = random_vector(n * k, 910 + n);
      for (const auto& [begin, end] : {std::pair<int64_t, int64_t>{0, 8}, {2, 5}}) {
        const std::string what =
            cat("moe_route n=", n, skew ? " skewed" : "", " experts [", begin, ", ", end, ")");
        std::vector<int32_t> rows(static_cast<size_t>(n * k)), offsets(n_experts + 1);
        std::vector<float> sw(static_cast<size_t>(n * k));
        cpu_->moe_route(host(rows, {n * k}), host(sw, {n * k}), host(offsets, {n_experts + 1}),
                        host(idx, {n, k}), host(w, {n, k}), begin, end);
        const DeviceTensor g_idx = upload(*gpu_, idx, {n, k});
        const DeviceTensor g_w = upload(*gpu_, w, DType::kF32, {n, k});
        DeviceTensor g_rows(*gpu_, DType::kI32, {n * k});
        DeviceTensor g_sw(*gpu_, DType::kF32, {n * k});
        DeviceTensor g_off(*gpu_, DType::kI32, {n_experts + 1});
        gpu_->moe_route(g_rows, g_sw, g_off, g_idx, g_w, begin, end);
        EXPECT_EQ(download_i32(*gpu_, g_rows), rows) << what;
        EXPECT_EQ(download(*gpu_, g_sw), sw) << what;
        EXPECT_EQ(download_i32(*gpu_, g_off), offsets) << what;
        // The routed rows tallied on the device (count_routed) as on the host, twice.
        std::vector<int32_t> counts(n_experts, 3);
        const DeviceTensor g_counts = upload(*gpu_, counts, {n_experts});
        for (int rep = 0; rep < 2; ++rep) {
          cpu_->count_routed(host(counts, {n_experts}), host(offsets, {n_experts + 1}));
          gpu_->count_routed(g_counts, g_off);
        }
        EXPECT_EQ(download_i32(*gpu_, g_counts), counts) << what;
        EXPECT_EQ(counts[6] - 3, 2 * (offsets[7] - offsets[6])) << what;
      }
    }
  }
}

// grouped_matmul_offsets (row ranges read from device memory) against one CPU matmul per group;
// groups start at an offset (first = 1), rows of no group keep their values. Up to 64 rows the
// warp-per-column kernel: K = 64 takes its 16-byte-load path, K = 67 the scalar one. Above, BF16
// with K a multiple of 8 takes the tensor-core kernel: K = 72 ends in a partial stage, n = 45 in
// a partial column tile, and one group's 300 rows span several row tiles, the last partial.
TEST_F(CudaOps, GroupedMatmulWithDeviceOffsetsMatchesCpu) {
  const int64_t n_groups = 6, n = 45;
  for (int64_t k : {int64_t{64}, int64_t{67}, int64_t{72}}) {
    std::vector<std::vector<float>> w;
    std::vector<DeviceTensor> gw;
    std::vector<Tensor> views;
    gw.reserve(n_groups);
    for (int64_t g = 0; g < n_groups; ++g) {
      w.push_back(bf16_rounded(random_vector(n * k, 950 + g)));
      gw.push_back(upload(*gpu_, w.back(), DType::kBF16, {n, k}));
      views.push_back(gw.back());
    }
    for (DType out_dtype : {DType::kF32, DType::kBF16}) {
      for (int64_t m :
           {int64_t{1}, int64_t{3}, int64_t{19}, int64_t{64}, int64_t{133}, int64_t{300}}) {
        for (Routing routing : {Routing::kSpread, Routing::kOneGroup, Routing::kAllEmpty}) {
          const std::string what = cat("grouped_matmul_offsets k=", k, " ", dtype_name(out_dtype),
                                       " m=", m, " ", routing_name(routing));
          // offsets[0] belongs to a group before `first`, which owns no rows.
          const std::vector<int64_t> local = group_offsets(m, n_groups, routing, 960 + m);
          std::vector<int32_t> offsets = {0};
          for (int64_t o : local) offsets.push_back(static_cast<int32_t>(o));
          const std::vector<float> x = bf16_rounded(random_vector(m * k, 970 + m));
          std::vector<float> want = random_vector(m * n, 980 + m, 100.f);
          if (out_dtype == DType::kBF16) want = bf16_rounded(want);
          const DeviceTensor gout = upload(*gpu_, want, out_dtype, {m, n});
          for (int64_t g = 0; g < n_groups; ++g) {
            const int64_t first = local[static_cast<size_t>(g)];
            const int64_t rows = local[static_cast<size_t>(g) + 1] - first;
            if (rows > 0)
              cpu_->matmul(host(want, {m, n}).rows(first, rows), host(x, {m, k}).rows(first, rows),
                           host(w[static_cast<size_t>(g)], {n, k}));
          }
          const DeviceTensor gx = upload(*gpu_, x, DType::kBF16, {m, k});
          const DeviceTensor goff = upload(*gpu_, offsets, {static_cast<int64_t>(offsets.size())});
          gpu_->grouped_matmul_offsets(gout, gx, views.data(), goff, 1,
                                       static_cast<size_t>(n_groups));
          const double budget = kGemmBudget + (out_dtype == DType::kBF16 ? kBf16Budget : 0.0);
          expect_within(what, download(*gpu_, gout), want, n, budget);
        }
      }
    }
  }
}

// A recorded graph does what the same ops do eagerly, and a replay sees new input values.
TEST_F(CudaOps, GraphReplaysTheRecordedOps) {
  const int64_t m = 5, k = 64, n = 32;
  const std::vector<float> w = bf16_rounded(random_vector(n * k, 990));
  const DeviceTensor gw = upload(*gpu_, w, DType::kBF16, {n, k});
  DeviceTensor gx(*gpu_, DType::kBF16, {m, k});
  DeviceTensor gy(*gpu_, DType::kF32, {m, n});
  DeviceTensor gz(*gpu_, DType::kF32, {m, n});
  EXPECT_TRUE(gpu_->supports_graphs());
  EXPECT_FALSE(gpu_->has_graph(7));
  gpu_->begin_graph();
  gpu_->matmul(gy, gx, gw);
  gpu_->add(gz, gy, gy);
  gpu_->end_graph(7);
  EXPECT_TRUE(gpu_->has_graph(7));
  for (int rep = 0; rep < 2; ++rep) {
    const std::vector<float> x = bf16_rounded(random_vector(m * k, 991 + rep));
    // New values in the memory the graph reads.
    const std::vector<uint16_t> words = [&] {
      std::vector<uint16_t> v(x.size());
      for (size_t i = 0; i < x.size(); ++i) v[i] = f32_to_bf16(x[i]);
      return v;
    }();
    gpu_->copy_from_host(gx.t().data, words.data(), words.size() * 2);
    gpu_->launch_graph(7);
    std::vector<float> want(static_cast<size_t>(m * n));
    cpu_->matmul(host(want, {m, n}), host(x, {m, k}), host(w, {n, k}));
    for (float& v : want) v *= 2.f;
    expect_within(cat("graph replay ", rep), download(*gpu_, gz), want, n, 2 * kGemmBudget);
  }
  EXPECT_THROW(gpu_->launch_graph(8), Error);
}

// ---- sampling ----------------------------------------------------------------------------------

// The GPU sampler picks exactly the token of the CPU twin (kernels/cpu/sample.cc, through the
// CPU backend's Ops::sample) for the same draw: greedy with ties, temperature, top-k, top-p,
// min-p and their mixes, vocabularies around a block's 1024 threads and Mixtral's 32000, and
// logits with many exact ties (a coarse grid), where the order among equal scores decides.
TEST_F(CudaOps, SampleMatchesCpuTwin) {
  struct Case {
    float temperature;
    int64_t top_k;
    float top_p, min_p;
  };
  const Case cases[] = {{0.f, 0, 1.f, 0.f},   {1.f, 0, 1.f, 0.f},     {0.7f, 50, 1.f, 0.f},
                        {1.3f, 0, 0.9f, 0.f}, {1.f, 0, 1.f, 0.05f},   {0.8f, 40, 0.95f, 0.02f},
                        {1.f, 1, 1.f, 0.f},   {2.f, 5000, 0.5f, 0.f}, {1e-39f, 0, 1.f, 0.f},
                        {9e-6f, 0, 0.9f, 0.f}};  // greedy: l / t overflows
  for (int64_t vocab : {int64_t{7}, int64_t{1000}, int64_t{1025}, int64_t{32000}}) {
    for (int coarse = 0; coarse < 2; ++coarse) {
      const int64_t n = 24;
      std::vector<float> logits = random_vector(n * vocab, 1000 + vocab + coarse, 4.f);
      if (coarse)  // many exact ties
        for (float& v : logits) v = std::round(v * 2.f) / 2.f;
      for (int64_t r = 2; r < n; r += 5) logits[r * vocab + (r * 7) % vocab] = NAN;  // ranks last
      std::vector<float> params(static_cast<size_t>(n * Ops::kSampleParams));
      std::mt19937_64 rng(static_cast<uint64_t>(vocab));
      for (int64_t r = 0; r < n; ++r) {
        const Case& c = cases[r % (sizeof(cases) / sizeof(cases[0]))];
        const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
        const float hi = static_cast<float>(u);
        float* q = params.data() + r * Ops::kSampleParams;
        q[0] = c.temperature;
        q[1] = static_cast<float>(c.top_k);
        q[2] = c.top_p;
        q[3] = c.min_p;
        q[4] = hi;
        q[5] = static_cast<float>(u - static_cast<double>(hi));
      }
      std::vector<int32_t> want(static_cast<size_t>(n));
      std::vector<float> scratch = logits;  // the twin divides by the temperature in place
      cpu_->sample(host(want, {n}), host(scratch, {n, vocab}),
                   host(params, {n, Ops::kSampleParams}));
      const DeviceTensor glogits = upload(*gpu_, logits, DType::kF32, {n, vocab});
      const DeviceTensor gparams = upload(*gpu_, params, DType::kF32, {n, Ops::kSampleParams});
      DeviceTensor gids(*gpu_, DType::kI32, {n});
      gpu_->sample(gids, glogits, gparams);
      EXPECT_EQ(download_i32(*gpu_, gids), want)
          << "vocab " << vocab << (coarse ? " with ties" : "");
      for (int64_t r = 0; r < n; ++r) {  // the tiny temperatures: the argmax, NaN left out
        if (params[r * Ops::kSampleParams] >= Ops::kGreedyTemperature) continue;
        int64_t best = -1;
        for (int64_t i = 0; i < vocab; ++i) {
          const float v = logits[r * vocab + i];
          if (!std::isnan(v) && (best < 0 || v > logits[r * vocab + best])) best = i;
        }
        EXPECT_EQ(want[r], best) << "row " << r << " of vocab " << vocab;
      }
    }
  }
}

// Row r's distinct ids of a per-row list (Ops::penalize, Ops::bias): a shuffle of the vocabulary,
// all of it in row 0 and up to a tenth in the others (some none), with ids outside the vocabulary
// (skipped by the ops) in some rows; appended to `ids`, with the row's end to `offsets`.
void append_row_ids(std::vector<int32_t>& offsets, std::vector<int32_t>& ids, int64_t r,
                    int64_t vocab, std::mt19937_64& rng) {
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  const int64_t take = r == 0 ? vocab : static_cast<int64_t>(rng() % (vocab / 10 + 2));
  ids.insert(ids.end(), order.begin(), order.begin() + std::min(take, vocab));
  if (r % 5 == 3) ids.push_back(static_cast<int32_t>(vocab + r));
  if (r % 7 == 4) ids.push_back(-1);
  offsets.push_back(static_cast<int32_t>(ids.size()));
}

// Ops::penalize: exact against the CPU twin (the same IEEE operations on the same floats, none
// contracted), over the awkward row counts and rows of no ids, of ids outside the vocabulary, of
// params {1, 0, 0}, of negative presence and frequency, and of the whole vocabulary (more ids
// than a block has threads).
TEST_F(CudaOps, PenalizeMatchesCpu) {
  for (int64_t vocab : {int64_t{7}, int64_t{1000}, int64_t{32000}}) {
    for (int64_t n : kTokenCounts) {
      if (vocab == 32000 && n > 3) continue;  // the emulator's time
      std::vector<float> logits = random_vector(n * vocab, 77 + n + vocab, 4.f);
      std::vector<int32_t> offsets = {0}, ids, counts;
      std::vector<float> params;
      std::mt19937_64 rng(static_cast<uint64_t>(n * vocab));
      auto uniform = [&rng](float lo, float hi) {
        return lo + (hi - lo) * static_cast<float>(rng() % 4096) / 4095.f;
      };
      for (int64_t r = 0; r < n; ++r) {
        append_row_ids(offsets, ids, r, vocab, rng);
        // Counts: about half the ids prompt-only (0), the others generated up to 40 times.
        while (counts.size() < ids.size())
          counts.push_back(rng() % 2 == 0 ? 0 : static_cast<int32_t>(1 + rng() % 40));
        if (r % 4 == 2) {
          params.insert(params.end(), {1.f, 0.f, 0.f});
        } else {
          params.push_back(0.5f + static_cast<float>(rng() % 100) / 25.f);
          params.push_back(uniform(-2.f, 2.f));
          params.push_back(uniform(-2.f, 2.f));
        }
      }
      const int64_t m = static_cast<int64_t>(ids.size());
      const int64_t P = Ops::kPenaltyParams;
      std::vector<float> want = logits;
      cpu_->penalize(host(want, {n, vocab}), host(offsets, {n + 1}), host(ids, {m}),
                     host(counts, {m}), host(params, {n, P}));
      const DeviceTensor glogits = upload(*gpu_, logits, DType::kF32, {n, vocab});
      gpu_->penalize(glogits, upload(*gpu_, offsets, {n + 1}), upload(*gpu_, ids, {m}),
                     upload(*gpu_, counts, {m}), upload(*gpu_, params, DType::kF32, {n, P}));
      EXPECT_EQ(download(*gpu_, glogits), want) << n << " rows of " << vocab;
      EXPECT_NE(want, logits);
    }
  }
}

// Ops::bias: exact against the CPU twin (one IEEE addition per listed logit) over the awkward row
// counts, with rows of no ids, ids outside the vocabulary, -inf bans and, in row 0, the whole
// vocabulary (more ids than a block has threads).
TEST_F(CudaOps, BiasMatchesCpu) {
  for (int64_t vocab : {int64_t{7}, int64_t{1000}, int64_t{32000}}) {
    for (int64_t n : kTokenCounts) {
      if (vocab == 32000 && n > 3) continue;  // the emulator's time
      std::vector<float> logits = random_vector(n * vocab, 91 + n + vocab, 4.f);
      std::vector<int32_t> offsets = {0}, ids;
      std::vector<float> values;
      std::mt19937_64 rng(static_cast<uint64_t>(n * vocab + 5));
      for (int64_t r = 0; r < n; ++r) {
        append_row_ids(offsets, ids, r, vocab, rng);
        while (values.size() < ids.size())
          values.push_back(rng() % 9 == 0 ? -INFINITY
                                          : -100.f + static_cast<float>(rng() % 20001) / 100.f);
      }
      const int64_t m = static_cast<int64_t>(ids.size());
      std::vector<float> want = logits;
      cpu_->bias(host(want, {n, vocab}), host(offsets, {n + 1}), host(ids, {m}), host(values, {m}));
      const DeviceTensor glogits = upload(*gpu_, logits, DType::kF32, {n, vocab});
      gpu_->bias(glogits, upload(*gpu_, offsets, {n + 1}), upload(*gpu_, ids, {m}),
                 upload(*gpu_, values, DType::kF32, {m}));
      EXPECT_EQ(download(*gpu_, glogits), want) << n << " rows of " << vocab;
      EXPECT_NE(want, logits);
    }
  }
}

// Ops::logprobs: the top ids exact and the log-probabilities within 1e-6 of the CPU twin (the
// fp64 sums differ only in order), over awkward row counts, tops of 1 to 20, rows with many
// tied logits, and rows taken out of order.
TEST_F(CudaOps, LogprobsMatchCpu) {
  for (int64_t vocab : {int64_t{7}, int64_t{1000}, int64_t{32000}}) {
    for (int64_t m : kTokenCounts) {
      if (m > (vocab == 32000 ? 3 : 19)) continue;  // the emulator's time
      for (int64_t top : {int64_t{1}, int64_t{5}, int64_t{20}}) {
        top = std::min(top, vocab);
        std::vector<float> logits = random_vector(m * vocab, 300 + m + vocab + top, 5.f);
        for (int64_t i = 0; i < m * vocab; i += 2) logits[i] = std::round(logits[i]);  // ties
        const int64_t n = m + 2;  // the step's rows; logit row j is its row rows[j]
        std::vector<int32_t> rows(static_cast<size_t>(m)), chosen(static_cast<size_t>(n));
        for (int64_t j = 0; j < m; ++j) rows[j] = static_cast<int32_t>((j * 5 + 1) % n);
        for (int64_t r = 0; r < n; ++r) chosen[r] = static_cast<int32_t>((r * 131) % vocab);
        std::vector<float> want(static_cast<size_t>(m * (top + 1)));
        std::vector<int32_t> want_ids(static_cast<size_t>(m * top));
        cpu_->logprobs(host(want, {m, top + 1}), host(want_ids, {m, top}), host(logits, {m, vocab}),
                       host(rows, {m}), host(chosen, {n}));
        DeviceTensor out(*gpu_, DType::kF32, {m, top + 1});
        DeviceTensor out_ids(*gpu_, DType::kI32, {m, top});
        gpu_->logprobs(out, out_ids, upload(*gpu_, logits, DType::kF32, {m, vocab}),
                       upload(*gpu_, rows, {m}), upload(*gpu_, chosen, {n}));
        const std::string what = detail::concat(m, " rows of ", vocab, ", top ", top);
        EXPECT_EQ(download_i32(*gpu_, out_ids), want_ids) << what;
        expect_each_within(what, download(*gpu_, out), want, std::vector<double>(want.size(), 1e-6),
                           top + 1);
      }
    }
  }
}

}  // namespace
}  // namespace sy
