// out = x · wᵀ; w is a Hugging Face Linear weight [n, k]. One row (decode of one token): BLAS
// sgemv, which reads w once. A few rows (decode batches, and the experts' rows of an MoE layer,
// a handful each): our own AVX2 kernel below, which also reads w once, where BLAS sgemm would
// first repack all of w (three times the memory traffic of one pass; docs/benchmarks.md). More
// rows, or a BLAS with several threads of its own: BLAS sgemm.
#include <cblas.h>

#include <algorithm>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/threads.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SY_SMALL_GEMM 1
#endif

namespace sy::cpu {
namespace {

#ifdef SY_SMALL_GEMM
// The most rows the small kernel takes; above, sgemm's packing pays for itself.
constexpr int64_t kSmallMaxRows = 16;
constexpr int kTileRows = 4;  // x rows per register tile
constexpr int kTileCols = 3;  // w rows (output columns) per register tile: 12 accumulators
constexpr int64_t kBlockXFloats = 32 * 1024;  // x's share of a k pass (128 KB): stays in L2

bool small_gemm_available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// out[r, j] (+)= x[r, k0:k1] · w[j, k0:k1] for R rows and C columns; `add`: accumulate into out.
template <int R, int C>
__attribute__((target("avx2,fma"))) void tile(float* out, int64_t ldo, const float* x,
                                              const float* w, int64_t k, int64_t k0, int64_t k1,
                                              bool add) {
  // Fully unrolled, so that the accumulators live in registers.
  __m256 acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t kk = k0;
  for (; kk + 8 <= k1; kk += 8) {
    __m256 wv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(w + c * k + kk);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + kk);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      // Horizontal sum of the 8 lanes, then the tail of k.
      const __m128 lo = _mm256_castps256_ps128(acc[r][c]);
      const __m128 hi = _mm256_extractf128_ps(acc[r][c], 1);
      __m128 s = _mm_add_ps(lo, hi);
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
      float v = _mm_cvtss_f32(s);
      for (int64_t t = kk; t < k1; ++t) v += x[r * k + t] * w[c * k + t];
      float& o = out[r * ldo + c];
      o = add ? o + v : v;
    }
  }
}

using TileFn = void (*)(float*, int64_t, const float*, const float*, int64_t, int64_t, int64_t,
                        bool);
template <int R>
constexpr TileFn kTilesOfRows[kTileCols] = {&tile<R, 1>, &tile<R, 2>, &tile<R, 3>};
constexpr const TileFn* kTiles[kTileRows] = {kTilesOfRows<1>, kTilesOfRows<2>, kTilesOfRows<3>,
                                             kTilesOfRows<4>};

// out = x · wᵀ for m <= kSmallMaxRows: k in blocks that keep x's part (m x block_k floats) in
// L2; within a block, every group of kTileCols rows of w is read from memory once and from L1
// for each group of kTileRows rows of x. So w streams from memory once in all.
void small_gemm(float* out, int64_t ldo, const float* x, const float* w, int64_t m, int64_t n,
                int64_t k) {
  const int64_t block_k = std::max<int64_t>(256, kBlockXFloats / m / 8 * 8);
  for (int64_t k0 = 0; k0 < k; k0 += block_k) {
    const int64_t k1 = std::min(k, k0 + block_k);
    for (int64_t j = 0; j < n; j += kTileCols) {
      const int cols = static_cast<int>(std::min<int64_t>(kTileCols, n - j));
      for (int64_t r = 0; r < m; r += kTileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - r));
        kTiles[rows - 1][cols - 1](out + r * ldo + j, ldo, x + r * k, w + j * k, k, k0, k1, k0 > 0);
      }
    }
  }
}
#endif

// Whether BLAS runs on one thread (the default of launch/serve and the tests: one rank per
// core), where the single-threaded small kernel loses nothing.
bool blas_single_threaded() {
#ifdef OPENBLAS_VERSION
  return openblas_get_num_threads() == 1;
#else
  return true;
#endif
}

}  // namespace

void matmul(Tensor out, Tensor x, Tensor w) {
  if (w.dtype != DType::kF32) {
    matmul_converted(out, x, w);
    return;
  }
  const int64_t m = x.size(0);
  const int64_t k = x.size(1);
  const int64_t n = w.size(0);
  check_tensor(x, "matmul.x", DType::kF32, {m, k});
  check_tensor(w, "matmul.w", DType::kF32, {n, k});
  check_tensor(out, "matmul.out", DType::kF32, {m, n});
  if (m == 0 || n == 0) return;
  SY_CHECK(m < (1ll << 31) && n < (1ll << 31) && k < (1ll << 31), "matmul: extents too large");
  // The output columns split between the pool's threads (kernels/cpu/threads.h).
  if (m == 1) {  // decode of one token: a matrix-vector product reads w once, with no packing
    parallel_for(n, [&](int64_t j0, int64_t j1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(j1 - j0), static_cast<int>(k), 1.f,
                  w.f32() + j0 * k, static_cast<int>(k), x.f32(), 1, 0.f, out.f32() + j0, 1);
    });
    return;
  }
#ifdef SY_SMALL_GEMM
  if (m <= kSmallMaxRows && k > 0 && simd_enabled() && small_gemm_available() &&
      blas_single_threaded()) {
    parallel_for(n, [&](int64_t j0, int64_t j1) {
      small_gemm(out.f32() + j0, n, x.f32(), w.f32() + j0 * k, m, j1 - j0, k);
    });
    return;
  }
#endif
  parallel_for(n, [&](int64_t j0, int64_t j1) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
                static_cast<int>(j1 - j0), static_cast<int>(k), 1.f, x.f32(), static_cast<int>(k),
                w.f32() + j0 * k, static_cast<int>(k), 0.f, out.f32() + j0, static_cast<int>(n));
  });
}

}  // namespace sy::cpu
