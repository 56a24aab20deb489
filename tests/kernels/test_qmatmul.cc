// matmul with F16, BF16 and block-quantized weights (kernels/cpu/qmatmul.cc): the AVX2 and the
// portable paths against each other (the same integer sums; only f32 addition order differs)
// and against x · dequantize(w)ᵀ in double (the error of 8-bit activations and of the format),
// for 1 to 9 rows (register tiles of 1-4 and their remainders) and with 2 threads.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/threads.h"

namespace sy::cpu {
namespace {

struct Case {
  DType type;
  double bound;  // largest |got - want| / (|x| |w| row norms product), stated per type
};

// Q5_K and Q6_K have no quantizer here: their weights are random blocks with finite scales.
std::vector<uint8_t> make_weights(DType type, int64_t n, int64_t k, std::mt19937& rng) {
  const size_t row = dtype_bytes(type, k);
  std::vector<uint8_t> w(row * static_cast<size_t>(n));
  if (type == DType::kQ5_K || type == DType::kQ6_K) {
    std::uniform_int_distribution<int> byte(0, 255);
    for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
    const int64_t bytes = dtype_block_bytes(type);
    for (int64_t blk = 0; blk < n * k / 256; ++blk) {
      const uint16_t d = f32_to_f16(0.01f * static_cast<float>(1 + blk % 7));
      const uint16_t dmin = f32_to_f16(0.002f * static_cast<float>(1 + blk % 5));
      if (type == DType::kQ6_K) {
        std::memcpy(w.data() + blk * bytes + 208, &d, 2);
      } else {
        std::memcpy(w.data() + blk * bytes, &d, 2);
        std::memcpy(w.data() + blk * bytes + 2, &dmin, 2);
      }
    }
    return w;
  }
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> f(static_cast<size_t>(k));
  for (int64_t j = 0; j < n; ++j) {
    for (float& v : f) v = normal(rng);
    row_from_f32(type, f.data(), w.data() + row * static_cast<size_t>(j), k);
  }
  return w;
}

std::vector<float> run(DType type, const std::vector<uint8_t>& w, const std::vector<float>& x,
                       int64_t m, int64_t n, int64_t k) {
  std::vector<float> out(static_cast<size_t>(m * n), NAN);
  matmul(Tensor(out.data(), DType::kF32, {m, n}),
         Tensor(const_cast<float*>(x.data()), DType::kF32, {m, k}),
         Tensor(const_cast<uint8_t*>(w.data()), type, {n, k}));
  return out;
}

TEST(QuantMatmul, SimdPortableAndDequantizedAgree) {
  const Case cases[] = {{DType::kF16, 1e-6},  {DType::kBF16, 1e-6}, {DType::kQ8_0, 2e-2},
                        {DType::kQ4_0, 2e-2}, {DType::kQ4_K, 2e-2}, {DType::kQ5_K, 2e-2},
                        {DType::kQ6_K, 2e-2}};
  const int64_t n = 37, k = 512;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (const Case& c : cases) {
    const std::vector<uint8_t> w = make_weights(c.type, n, k, rng);
    std::vector<float> wf(static_cast<size_t>(n * k));
    for (int64_t j = 0; j < n; ++j)
      row_to_f32(c.type, w.data() + dtype_bytes(c.type, k) * j, wf.data() + j * k, k);
    for (int64_t m : {1, 2, 3, 4, 5, 9}) {
      SCOPED_TRACE(std::string(dtype_name(c.type)) + " m=" + std::to_string(m));
      std::vector<float> x(static_cast<size_t>(m * k));
      for (float& v : x) v = normal(rng);
      x[3] = 40.f;  // an outlier in one block
      set_simd(Simd::kPortable);
      const std::vector<float> portable = run(c.type, w, x, m, n, k);
      set_simd(Simd::kAuto);
      const std::vector<float> simd = run(c.type, w, x, m, n, k);
      set_num_threads(2);
      const std::vector<float> threaded = run(c.type, w, x, m, n, k);
      set_num_threads(1);
      EXPECT_EQ(threaded, simd);
      for (int64_t i = 0; i < m; ++i) {
        double xn = 0;
        for (int64_t t = 0; t < k; ++t) xn += double(x[i * k + t]) * x[i * k + t];
        for (int64_t j = 0; j < n; ++j) {
          double want = 0, wn = 0;
          for (int64_t t = 0; t < k; ++t) {
            want += double(x[i * k + t]) * wf[j * k + t];
            wn += double(wf[j * k + t]) * wf[j * k + t];
          }
          const double scale = std::sqrt(xn * wn);
          const size_t o = static_cast<size_t>(i * n + j);
          EXPECT_LE(std::fabs(simd[o] - portable[o]) / scale, 1e-6) << i << "," << j;
          EXPECT_LE(std::fabs(portable[o] - want) / scale, c.bound) << i << "," << j;
        }
      }
    }
  }
}

TEST(QuantMatmul, RefusesRowsOfPartialBlocks) {
  std::vector<float> x(40), out(2);
  std::vector<uint8_t> w(200);
  EXPECT_THROW(
      matmul(Tensor(out.data(), DType::kF32, {1, 2}), Tensor(x.data(), DType::kF32, {1, 40}),
             Tensor(w.data(), DType::kQ8_0, {2, 40})),
      Error);
}

TEST(QuantMatmul, Q8_0QuantizerRoundTripsWithinHalfAStep) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(64), y(64);
  for (float& v : x) v = normal(rng);
  std::vector<uint8_t> q(dtype_bytes(DType::kQ8_0, 64));
  row_from_f32(DType::kQ8_0, x.data(), q.data(), 64);
  row_to_f32(DType::kQ8_0, q.data(), y.data(), 64);
  for (int b = 0; b < 2; ++b) {
    float amax = 0;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[32 * b + i]));
    for (int i = 0; i < 32; ++i)
      EXPECT_LE(std::fabs(y[32 * b + i] - x[32 * b + i]), 0.51f * amax / 127.f + 1e-3f * amax);
  }
}

}  // namespace
}  // namespace sy::cpu
