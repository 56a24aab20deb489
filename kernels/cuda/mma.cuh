// Warp-level tensor-core matrix multiply (mma.sync m16n8k16, bf16 inputs, fp32 accumulation) and
// the bf16 packing it takes, for sm_80 and later. On the CUDA emulator (SY_CUDA_EMU) the same
// function gathers the warp's fragments and multiplies them, with the documented fragment
// layouts, so a kernel that puts an element in the wrong register computes a wrong result there
// too.
//
// Fragments of one warp, lane = 4 * g + t (g = lane / 4, t = lane % 4); element pairs are packed
// into 32-bit registers, the lower column (or k) in the low half:
//   A (16 x 16, row major)  a[0]: row g,     cols 2t, 2t+1      a[1]: row g + 8, cols 2t, 2t+1
//                           a[2]: row g,     cols 2t+8, 2t+9    a[3]: row g + 8, cols 2t+8, 2t+9
//   B (16 x 8, k x n)       b[0]: k 2t, 2t+1, col g             b[1]: k 2t+8, 2t+9, col g
//   C, D (16 x 8, fp32)     d[0], d[1]: row g, cols 2t, 2t+1    d[2], d[3]: row g + 8, the same
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

namespace sy::cuda {

// The bf16 bits of fp32 `x`, rounded to nearest even.
__device__ __forceinline__ uint32_t bf16_bits(float x) {
  const __nv_bfloat16_raw r = __float2bfloat16_rn(x);
  return r.x;
}
__device__ __forceinline__ float bf16_value(uint32_t bits) {
  __nv_bfloat16_raw r;
  r.x = static_cast<unsigned short>(bits);
  return __bfloat162float(__nv_bfloat16(r));
}
// Two values in one register, `lo` in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  return bf16_bits(lo) | (bf16_bits(hi) << 16);
}
// x = hi + lo to about 16 significant bits: hi is x rounded to bf16, lo the rest rounded again.
// Two multiplies (hi and lo) give a product as precise as fp32 inputs would for tensor-core work.
__device__ __forceinline__ void split_bf16(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  hi = pack_bf16(x0, x1);
  lo = pack_bf16(x0 - bf16_value(hi & 0xffffu), x1 - bf16_value(hi >> 16));
}

// Aligned 4- and 16-byte accesses to arrays of bf16 bits (4- and 16-byte aligned addresses). On
// the emulator through memcpy, which host C++'s aliasing rules allow.
__device__ __forceinline__ uint32_t load_u32(const uint16_t* p) {
#ifdef SY_CUDA_EMU
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#else
  return *reinterpret_cast<const uint32_t*>(p);
#endif
}
__device__ __forceinline__ uint4 load_u128(const uint16_t* p) {
#ifdef SY_CUDA_EMU
  uint4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#else
  return *reinterpret_cast<const uint4*>(p);
#endif
}
__device__ __forceinline__ void store_u128(uint16_t* p, uint4 v) {
#ifdef SY_CUDA_EMU
  std::memcpy(p, &v, sizeof(v));
#else
  *reinterpret_cast<uint4*>(p) = v;
#endif
}

// Asynchronous 16-byte copies from global to shared memory (cp.async, sm_80 and later): the
// copy reads 16 bytes at `src` when `pred`, and writes zeros otherwise (`src` is not read).
// Copies committed as one group complete together; cp_async_wait<N>() waits until at most N
// groups are pending. Both pointers 16-byte aligned. On the emulator the copy happens at once,
// so it cannot show a missing wait.
#ifdef SY_CUDA_EMU
inline void cp_async_16(void* dst, const void* src, bool pred) {
  if (pred)
    std::memcpy(dst, src, 16);
  else
    std::memset(dst, 0, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}
#else
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(pred ? 16 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // "memory": no shared-memory access moves across the wait, barrier or not.
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif

#ifdef SY_CUDA_EMU
// The warp's product, once: in[lane * 6] holds a lane's a (2 words), b (1) and d (2 words, 4
// floats); out[lane * 2] its new d.
inline void emu_mma_bf16_16816(const uint64_t* in, uint64_t* out) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const uint64_t* w = in + lane * 6;
    const uint32_t ra[4] = {static_cast<uint32_t>(w[0]), static_cast<uint32_t>(w[0] >> 32),
                            static_cast<uint32_t>(w[1]), static_cast<uint32_t>(w[1] >> 32)};
    const uint32_t rb[2] = {static_cast<uint32_t>(w[2]), static_cast<uint32_t>(w[2] >> 32)};
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h)
        A[g + 8 * (r % 2)][2 * t + h + 8 * (r / 2)] = bf16_value(ra[r] >> (16 * h));
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) B[2 * t + h + 8 * r][g] = bf16_value(rb[r] >> (16 * h));
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    float d[4];
    std::memcpy(d, in + lane * 6 + 3, sizeof(d));
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      float acc = d[i];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
      d[i] = acc;
    }
    std::memcpy(out + lane * 2, d, sizeof(d));
  }
}
// d += A * B over the warp (every lane must call it together).
inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint64_t in[6] = {a[0] | (uint64_t{a[1]} << 32), a[2] | (uint64_t{a[3]} << 32),
                    b[0] | (uint64_t{b[1]} << 32)};
  std::memcpy(in + 3, d, sizeof(d));
  uint64_t out[2];
  ::sy::emu::warp_combine(in, 6, out, 2, &emu_mma_bf16_16816);
  std::memcpy(d, out, sizeof(d));
}
#else
// d += A * B over the warp (every lane must call it together). sm_80 and later; the launchers
// use it only on such devices.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4],
                                               const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
#endif

}  // namespace sy::cuda
