// Forced include (-include) of the kernel sources when the CUDA emulator compiles them as host
// C++: the device built-ins they use, mapped onto the emulator (emu.h).
#pragma once

// Kernel sources that need a different body on the emulator (inline PTX) test this.
#define SY_CUDA_EMU 1

// Before the toolkit headers, which define these only when they are not defined.
#define __shared__ static  // one copy per kernel instantiation; blocks run one at a time
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "tests/cuda_emu/emu.h"

#define threadIdx (::sy::emu::thread_index())
#define blockIdx (::sy::emu::block_index())
#define blockDim (::sy::emu::block_dim())
#define gridDim (::sy::emu::grid_dim())

inline void __syncthreads() {
  ::sy::emu::sync_block();
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  (void)mask;
  (void)width;
  return ::sy::emu::shfl_xor(v, lane_mask);
}

// __ballot_sync over a full warp (every lane must arrive): bit l is lane l's predicate.
inline void emu_ballot(const uint64_t* in, uint64_t* out) {
  uint64_t bits = 0;
  for (int lane = 0; lane < 32; ++lane) bits |= (in[lane] != 0 ? uint64_t{1} : 0) << lane;
  for (int lane = 0; lane < 32; ++lane) out[lane] = bits;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  (void)mask;
  const uint64_t in = pred != 0 ? 1 : 0;
  uint64_t out = 0;
  ::sy::emu::warp_combine(&in, 1, &out, 1, &emu_ballot);
  return static_cast<unsigned>(out);
}
inline int __popc(unsigned x) {
  return __builtin_popcount(x);
}

// Blocks run one at a time and their threads between barriers one after another, so a plain
// read-modify-write is atomic here.
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Single-precision arithmetic rounded once, never contracted (the host compiler is not asked to
// contract, so plain operators do).
inline float __fdiv_rn(float a, float b) {
  return a / b;
}
inline float __fmul_rn(float a, float b) {
  return a * b;
}
inline float __fsub_rn(float a, float b) {
  return a - b;
}
inline float __fadd_rn(float a, float b) {
  return a + b;
}

using std::isnan;  // CUDA's device isnan is a global function

inline float rsqrtf(float x) {
  return 1.f / std::sqrt(x);
}

inline unsigned long long max(unsigned long long a, unsigned long long b) {
  return a > b ? a : b;
}
inline unsigned long long min(unsigned long long a, unsigned long long b) {
  return a < b ? a : b;
}
