// Shared device helpers of the CUDA kernels: element loads and stores in fp32 for F32 and BF16
// operands, block-wide reductions, the paged cache's slot lookup, and the launch check that names
// the failing op.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/device.h"
#include "kernels/tensor.h"

namespace sy::cuda {

// Reads element i of an F32 or BF16 array as fp32.
__device__ __forceinline__ float load(const float* p, int64_t i) {
  return p[i];
}
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
// Writes fp32 `v` to element i, rounding to nearest even for BF16 (as the CPU's f32_to_bf16).
__device__ __forceinline__ void store(float* p, int64_t i, float v) {
  p[i] = v;
}
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

// Reductions over a warp and over the block with `op` (a binary functor) and its identity. The
// block version must be called by every thread of the block; blockDim.x is a multiple of 32 and
// at most 1024; `scratch` is 32 values of shared memory, free on entry and again on return.
// Every thread gets the result. T: float, double or unsigned long long.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, Op op, T identity) {
  v = warp_reduce(v, op);
  const int lane = threadIdx.x % 32;
  if (lane == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  v = warp_reduce(lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : identity, op);
  __syncthreads();
  return v;
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ unsigned long long operator()(unsigned long long a,
                                                           unsigned long long b) const {
    return a > b ? a : b;
  }
};

__device__ __forceinline__ float warp_sum(float v) {
  return warp_reduce(v, SumOp{});
}
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  return block_reduce(v, scratch, SumOp{}, 0.f);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
  return block_reduce(v, scratch, MaxOp{}, -INFINITY);
}

// The slot of position `p` in the paged cache: the block that `table` (max_blocks entries) names
// for it, times block_size, plus p's place in that block; -1 where the table has no entry for p
// or names a block outside [0, n_blocks).
__device__ __forceinline__ int64_t paged_slot(const int32_t* table, int64_t p, int64_t block_size,
                                              int64_t max_blocks, int64_t n_blocks) {
  const int64_t logical = p / block_size;
  const int64_t block = logical < max_blocks ? table[logical] : -1;
  return block >= 0 && block < n_blocks ? block * block_size + p % block_size : -1;
}

// Grid size for `n` items at `per_block` items per block, capped at the grid's x limit (kernels
// using it stride over their items).
inline unsigned grid_for(int64_t n, int64_t per_block) {
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 32 ? 65535 * 32 : blocks));
}

// Throws naming `op` when its launch failed (bad configuration, a sticky earlier fault).
inline void check_launch(const char* op) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) SY_FAIL("CUDA kernel ", op, " failed: ", cudaGetErrorString(e));
}

// Checks that every operand of `op` lives on the GPU.
inline void check_on_device(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    SY_CHECK(t->device == Device::kCuda, op, ": an operand ", t->shape_str(),
             " is in host memory; the CUDA backend needs device tensors");
}

// Checks `t` is F32 or BF16 with shape `dims` (-1: any). Kernels template on the two.
inline void check_float(const Tensor& t, const char* name, std::initializer_list<int64_t> dims) {
  SY_CHECK(t.dtype == DType::kF32 || t.dtype == DType::kBF16, name, ": dtype ", dtype_name(t.dtype),
           "; F32 or BF16 expected");
  check_tensor(t, name, t.dtype, dims);
}

}  // namespace sy::cuda
