// The MoE layout on the GPU (Ops::moe_route), for steps that must not wait for the host, and the
// grouped GEMM that reads each expert's row range from device memory for steps of a few rows
// per expert (larger ones: grouped_mma.cu).
// CPU twins: the defaults in kernels/ops.cc (a host counting sort; grouped_matmul with the
// offsets copied to the host; count_routed on host copies).
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

constexpr int64_t kMaxRouteExperts = 256;

// One block. Warp w takes experts w, w + 32, ...: it walks the routed pairs 32 at a time and
// a ballot marks the lanes whose pair chose the expert. A first pass counts them, a serial scan
// over the experts (they are few) makes the offsets, and a second pass gives each such pair its
// row: the expert's first row, plus the pairs of the chunks before, plus the lower lanes of its
// own chunk's ballot. Stable in token order, deterministic, linear in the pairs.
__global__ void __launch_bounds__(1024)
    moe_route_kernel(int32_t* sorted_rows, float* sorted_weights, int32_t* offsets,
                     const int32_t* topk_idx, const float* topk_weights, int64_t n_rows, int64_t k,
                     int64_t n_experts, int64_t expert_begin, int64_t expert_end) {
  __shared__ int32_t first[kMaxRouteExperts + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n_warps = blockDim.x / 32;
  for (int64_t e = warp; e < n_experts; e += n_warps) {
    int32_t count = 0;
    for (int64_t j0 = 0; j0 < n_rows; j0 += 32) {
      const int64_t j = j0 + lane;
      count += __popc(__ballot_sync(0xffffffffu, j < n_rows && topk_idx[j] == e));
    }
    if (lane == 0) first[e + 1] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    first[0] = 0;
    for (int64_t e = 0; e < n_experts; ++e) first[e + 1] += first[e];
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e <= n_experts; e += blockDim.x) offsets[e] = first[e];
  const unsigned lower = (1u << lane) - 1u;
  for (int64_t e = warp; e < n_experts; e += n_warps) {
    const bool here = e >= expert_begin && e < expert_end;
    int32_t r = first[e];
    for (int64_t j0 = 0; j0 < n_rows; j0 += 32) {
      const int64_t j = j0 + lane;
      const bool mine = j < n_rows && topk_idx[j] == e;
      const unsigned hit = __ballot_sync(0xffffffffu, mine);
      if (mine) {
        const int32_t row = r + __popc(hit & lower);
        sorted_rows[row] = here ? static_cast<int32_t>(j / k) : -1;
        sorted_weights[row] = here ? topk_weights[j] : 0.f;
      }
      r += __popc(hit);
    }
  }
}

constexpr int kRowsPerPass = 8;  // rows of one expert a warp carries in registers

__device__ __forceinline__ void unpack8(const uint4& v, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 p = __bfloat1622float2(h[q]);
    f[2 * q] = p.x;
    f[2 * q + 1] = p.y;
  }
}

// out[r, n] = x[r, :] · w_g[n, :] for the rows r of group g = blockIdx.y, read from `offsets`.
// One warp per output column n; it streams w_g's row n once per 8 rows of the group (decode
// steps route a handful of rows to each expert), 16-byte loads when `vec` (BF16 only). A group
// without rows exits before reading anything, so idle experts cost no weight traffic.
template <typename TI, typename TO>
__global__ void grouped_rows_gemm_kernel(TO* out, const TI* x, const TI* const* w,
                                         const int32_t* offsets, int64_t first, int64_t n_out,
                                         int64_t K, bool vec) {
  const int64_t g = blockIdx.y;
  const int64_t begin = offsets[first + g];
  const int64_t end = offsets[first + g + 1];
  if (begin >= end) return;
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (n >= n_out) return;  // the same for the whole warp
  const TI* wn = w[g] + n * K;
  for (int64_t r0 = begin; r0 < end; r0 += kRowsPerPass) {
    const int nr = end - r0 < kRowsPerPass ? static_cast<int>(end - r0) : kRowsPerPass;
    float acc[kRowsPerPass];
#pragma unroll
    for (int i = 0; i < kRowsPerPass; ++i) acc[i] = 0.f;
    if constexpr (std::is_same_v<TI, __nv_bfloat16>) {
      if (vec) {
        for (int64_t k0 = lane * 8; k0 < K; k0 += 32 * 8) {
          float wf[8];
          unpack8(*reinterpret_cast<const uint4*>(wn + k0), wf);
#pragma unroll
          for (int i = 0; i < kRowsPerPass; ++i) {
            if (i < nr) {
              float xf[8];
              unpack8(*reinterpret_cast<const uint4*>(x + (r0 + i) * K + k0), xf);
#pragma unroll
              for (int q = 0; q < 8; ++q) acc[i] += wf[q] * xf[q];
            }
          }
        }
      }
    }
    if (!vec) {
      for (int64_t kk = lane; kk < K; kk += 32) {
        const float wf = load(wn, kk);
#pragma unroll
        for (int i = 0; i < kRowsPerPass; ++i)
          if (i < nr) acc[i] += wf * load(x, (r0 + i) * K + kk);
      }
    }
    // The 8 sums over the warp in 9 shuffles instead of 40: each of the first three rounds
    // halves the values a lane holds (lanes with the round's bit set keep the upper half), so
    // lane l ends with the partial sum of row ((l >> 2) & 7) over 4 lanes, and two more rounds
    // finish it.
    static_assert(kRowsPerPass == 8, "the butterfly below reduces 8 values");
#pragma unroll
    for (int half = 4, offset = 16; half >= 1; half /= 2, offset /= 2) {
      const bool upper = (lane & offset) != 0;
#pragma unroll
      for (int i = 0; i < half; ++i) {
        const float send = upper ? acc[i] : acc[i + half];
        const float keep = upper ? acc[i + half] : acc[i];
        acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
      }
    }
    float v = acc[0];
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    const int row = (lane >> 2) & 7;
    if (lane % 4 == 0 && row < nr) store(out, (r0 + row) * n_out + n, v);
  }
}

__global__ void count_routed_kernel(int32_t* counts, const int32_t* offsets, int64_t n) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e < n) counts[e] += offsets[e + 1] - offsets[e];
}

}  // namespace

void count_routed(Tensor counts, Tensor offsets, cudaStream_t stream) {
  check_count_routed(counts, offsets);
  check_on_device("count_routed", {&counts, &offsets});
  const int64_t n = counts.size(0);
  if (n == 0) return;
  count_routed_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(counts.i32(),
                                                                                  offsets.i32(), n);
  check_launch("count_routed");
}

void moe_route(Tensor sorted_rows, Tensor sorted_weights, Tensor offsets, Tensor topk_idx,
               Tensor topk_weights, int64_t expert_begin, int64_t expert_end, cudaStream_t stream) {
  const int64_t n_tokens = topk_idx.size(0);
  const int64_t k = topk_idx.size(1);
  const int64_t n_rows = n_tokens * k;
  const int64_t n_experts = offsets.size(0) - 1;
  check_moe_route(sorted_rows, sorted_weights, offsets, topk_idx, topk_weights, expert_begin,
                  expert_end);
  check_on_device("moe_route", {&sorted_rows, &sorted_weights, &offsets, &topk_idx, &topk_weights});
  SY_CHECK(n_experts <= kMaxRouteExperts, "moe_route: ", n_experts,
           " experts (the GPU layout takes at most ", kMaxRouteExperts, ")");
  moe_route_kernel<<<1, 1024, 0, stream>>>(sorted_rows.i32(), sorted_weights.f32(), offsets.i32(),
                                           topk_idx.i32(), topk_weights.f32(), n_rows, k, n_experts,
                                           expert_begin, expert_end);
  check_launch("moe_route");
}

void grouped_gemm_offsets(Tensor out, Tensor x, const void* const* w_device, bool w_aligned,
                          int64_t n_out, Tensor offsets, int64_t first, size_t n_groups,
                          int sm_major, cudaStream_t stream) {
  const int64_t K = x.size(1);
  check_float(x, "grouped_matmul_offsets.x", {-1, K});
  check_float(out, "grouped_matmul_offsets.out", {x.size(0), n_out});
  check_tensor(offsets, "grouped_matmul_offsets.offsets", DType::kI32, {-1});
  check_on_device("grouped_matmul_offsets", {&out, &x, &offsets});
  SY_CHECK(first >= 0 && first + static_cast<int64_t>(n_groups) < offsets.size(0),
           "grouped_matmul_offsets: groups [", first, ", ", first + static_cast<int64_t>(n_groups),
           ") of ", offsets.size(0) - 1);
  if (n_groups == 0 || n_out == 0 || x.size(0) == 0) return;
  SY_CHECK(n_groups <= 65535, "grouped_matmul_offsets: ", n_groups, " groups");
  if (x.size(0) > kRowsGemmMaxRows && grouped_mma_supported(x, w_aligned, sm_major))
    return grouped_mma_gemm(out, x, w_device, n_out, offsets, first, n_groups, stream);
  const bool vec = x.dtype == DType::kBF16 && w_aligned && K % 8 == 0 &&
                   reinterpret_cast<uintptr_t>(x.data) % 16 == 0;
  const int warps = 8;
  const dim3 grid(static_cast<unsigned>((n_out + warps - 1) / warps),
                  static_cast<unsigned>(n_groups));
  with_float_type(x.dtype, "grouped_matmul_offsets.x", [&](auto in_tag) {
    using TI = typename decltype(in_tag)::type;
    with_float_type(out.dtype, "grouped_matmul_offsets.out", [&](auto out_tag) {
      using TO = typename decltype(out_tag)::type;
      grouped_rows_gemm_kernel<TI, TO><<<grid, 32 * warps, 0, stream>>>(
          static_cast<TO*>(out.data), static_cast<const TI*>(x.data),
          reinterpret_cast<const TI* const*>(w_device), offsets.i32(), first, n_out, K, vec);
    });
  });
  check_launch("grouped_matmul_offsets");
}

}  // namespace sy::cuda
