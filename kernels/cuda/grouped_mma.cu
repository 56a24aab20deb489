// The grouped GEMM of the experts on tensor cores with each group's row range read from device
// memory (Ops::grouped_matmul_offsets for BF16 steps of more rows than moe_route.cu's warp-per-
// column kernel takes): out[r, :] = x[r, :] · w_g^T for the rows r of group g, with no copy to
// the host, so a decode step of any batch can be a graph. CPU twin: the default
// grouped_matmul_offsets in kernels/ops.cc (offsets copied to the host, one matmul per group).
//
// A block computes a tile of kBM rows of one group by kBN output columns. The grid is fixed by
// shapes alone: x = the most row tiles any split of the rows into n_groups groups can need
// (rows / kBM + n_groups), y = column tiles; each block finds its group and first row from the
// offsets and exits when the groups have fewer tiles. Consecutive blocks (x) share a column tile,
// so the row tiles of one group read its weight tile while it is in L2.
//
// The K loop walks kBK columns at a time through a kStages-deep ring of shared-memory tiles
// filled by cp.async (zeros past K and past the tile's rows and columns); 4 warps of 32 x 32
// each run mma.sync m16n8k16 (bf16 inputs, fp32 accumulation; kernels/cuda/mma.cuh). A warp
// skips its 16-row halves that hold no row of the tile (decode steps give an expert a few rows).
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

constexpr int kBM = 64;     // rows per block tile
constexpr int kBN = 64;     // output columns per block tile
constexpr int kBK = 32;     // K per stage
constexpr int kStages = 4;  // stages of the cp.async ring
constexpr int kThreads = 128;
constexpr int kLd = kBK + 8;      // shared row stride in elements: 80 bytes, 16-byte aligned, and
                                  // the 8 rows of a fragment load fall in distinct banks
constexpr int kChunks = kBK / 8;  // 16-byte chunks per tile row

using TileA = uint16_t[kBM][kLd];  // one stage of x rows, bf16 bits
using TileB = uint16_t[kBN][kLd];  // one stage of weight rows (output columns)

// The group and first row of row tile `tile` (g < 0 past the groups' tiles).
struct RowTile {
  int64_t g = -1, row0 = 0, group_end = 0;
};

__device__ __forceinline__ RowTile find_row_tile(int64_t tile, const int32_t* offsets,
                                                 int64_t first, int64_t n_groups) {
  RowTile t;
  int64_t before = 0;
  for (int64_t i = 0; i < n_groups; ++i) {
    const int64_t begin = offsets[first + i], end = offsets[first + i + 1];
    const int64_t tiles = end > begin ? (end - begin + kBM - 1) / kBM : 0;
    if (tile < before + tiles) {
      t.g = i;
      t.row0 = begin + (tile - before) * kBM;
      t.group_end = end;
      return t;
    }
    before += tiles;
  }
  return t;
}

// Stage kt of the K loop into ring slot `a`/`b` (zeros past K and past the tile's rows and
// columns).
__device__ __forceinline__ void load_stage(TileA& a, TileB& b, const uint16_t* x,
                                           const uint16_t* wg, int64_t row0, int nr, int64_t n0,
                                           int64_t n_out, int64_t K, int64_t kt) {
  const int tid = threadIdx.x;
  const int64_t k0 = kt * kBK;
  for (int c = tid; c < kBM * kChunks; c += kThreads) {
    const int r = c / kChunks, kc = (c % kChunks) * 8;
    const bool ok = r < nr && k0 + kc < K;
    cp_async_16(&a[r][kc], ok ? x + (row0 + r) * K + k0 + kc : x, ok);
  }
  for (int c = tid; c < kBN * kChunks; c += kThreads) {
    const int r = c / kChunks, kc = (c % kChunks) * 8;
    const bool ok = n0 + r < n_out && k0 + kc < K;
    cp_async_16(&b[r][kc], ok ? wg + (n0 + r) * K + k0 + kc : wg, ok);
  }
}

// The warp's 32 x 32 of one landed stage into acc (its 16-row halves that hold rows only).
__device__ __forceinline__ void mma_stage(float (&acc)[2][4][4], const TileA& as, const TileB& bs,
                                          int wm, int wn, int lg, int lt,
                                          const bool (&half_live)[2]) {
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk) {
    const int kc = 16 * kk + 2 * lt;
    uint32_t b[4][2];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = 32 * wn + 8 * j + lg;
      b[j][0] = load_u32(&bs[n][kc]);
      b[j][1] = load_u32(&bs[n][kc + 8]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!half_live[i]) continue;
      const int r = 32 * wm + 16 * i + lg;
      const uint32_t a[4] = {load_u32(&as[r][kc]), load_u32(&as[r + 8][kc]),
                             load_u32(&as[r][kc + 8]), load_u32(&as[r + 8][kc + 8])};
#pragma unroll
      for (int j = 0; j < 4; ++j) mma_bf16_16816(acc[i][j], a, b[j]);
    }
  }
}

// The warp's accumulators to the tile's rows of `out` (rows below nr, columns below n_out).
template <typename TO>
__device__ __forceinline__ void store_tile(TO* out, const float (&acc)[2][4][4], int64_t row0,
                                           int nr, int64_t n0, int64_t n_out, int wm, int wn,
                                           int lg, int lt, const bool (&half_live)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (!half_live[i]) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 32 * wm + 16 * i + lg + 8 * h;
      if (r >= nr) continue;
      TO* orow = out + (row0 + r) * n_out;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + 32 * wn + 8 * j + 2 * lt;
        if (n < n_out) store(orow, n, acc[i][j][2 * h]);
        if (n + 1 < n_out) store(orow, n + 1, acc[i][j][2 * h + 1]);
      }
    }
  }
}

template <typename TO>
__global__ void __launch_bounds__(kThreads)
    grouped_mma_kernel(TO* out, const uint16_t* x, const uint16_t* const* w, const int32_t* offsets,
                       int64_t first, int64_t n_groups, int64_t n_out, int64_t K) {
  __shared__ __align__(16) TileA as[kStages];
  __shared__ __align__(16) TileB bs[kStages];
  const RowTile t = find_row_tile(blockIdx.x, offsets, first, n_groups);
  if (t.g < 0) return;  // the same for the whole block
  const int nr = static_cast<int>(t.group_end - t.row0 < kBM ? t.group_end - t.row0 : kBM);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const uint16_t* wg = w[t.g];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lg = lane / 4, lt = lane % 4;
  const int wm = warp / 2, wn = warp % 2;  // the warp's 32 x 32 of the tile

  const int64_t n_k = (K + kBK - 1) / kBK;
  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
  // Which of the warp's two 16-row halves hold rows of the tile (the same for the whole warp).
  const bool half_live[2] = {32 * wm < nr, 32 * wm + 16 < nr};

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_k) load_stage(as[s], bs[s], x, wg, t.row0, nr, n0, n_out, K, s);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < n_k; ++kt) {
    cp_async_wait<kStages - 2>();  // stage kt has landed (this thread's copies) ...
    __syncthreads();               // ... and every thread's; stage kt - 1 is consumed
    const int64_t next = kt + kStages - 1;
    const int next_slot = static_cast<int>(next % kStages);
    if (next < n_k) load_stage(as[next_slot], bs[next_slot], x, wg, t.row0, nr, n0, n_out, K, next);
    cp_async_commit();
    const int slot = static_cast<int>(kt % kStages);
    mma_stage(acc, as[slot], bs[slot], wm, wn, lg, lt, half_live);
  }
  cp_async_wait<0>();  // no copy outlives the block (the last groups are empty)
  store_tile(out, acc, t.row0, nr, n0, n_out, wm, wn, lg, lt, half_live);
}

}  // namespace

bool grouped_mma_supported(const Tensor& x, bool w_aligned, int sm_major) {
  return sm_major >= 8 && x.dtype == DType::kBF16 && w_aligned && x.ndim == 2 &&
         x.size(1) % 8 == 0 && reinterpret_cast<uintptr_t>(x.data) % 16 == 0;
}

void grouped_mma_gemm(Tensor out, Tensor x, const void* const* w_device, int64_t n_out,
                      Tensor offsets, int64_t first, size_t n_groups, cudaStream_t stream) {
  const int64_t K = x.size(1);  // the operands grouped_mma_supported takes, checked by the caller
  const int64_t max_tiles = x.size(0) / kBM + static_cast<int64_t>(n_groups);
  const int64_t col_tiles = (n_out + kBN - 1) / kBN;
  SY_CHECK(col_tiles <= 65535, "grouped_matmul_offsets: ", n_out, " output columns");
  const dim3 grid(static_cast<unsigned>(max_tiles), static_cast<unsigned>(col_tiles));
  const auto* xd = static_cast<const uint16_t*>(x.data);
  const auto* const* wd = reinterpret_cast<const uint16_t* const*>(w_device);
  with_float_type(out.dtype, "grouped_matmul_offsets.out", [&](auto out_tag) {
    using TO = typename decltype(out_tag)::type;
    grouped_mma_kernel<TO><<<grid, kThreads, 0, stream>>>(static_cast<TO*>(out.data), xd, wd,
                                                          offsets.i32(), first,
                                                          static_cast<int64_t>(n_groups), n_out, K);
  });
  check_launch("grouped_matmul_offsets");
}

}  // namespace sy::cuda
