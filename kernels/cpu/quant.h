// Block-quantized weight formats of GGML (the formats of GGUF files), and their dequantization.
//
// A row of n elements is n / block_elems blocks of block_bytes each. The formats:
//   Q8_0  32 elements in 34 bytes: f16 scale d, 32 int8 q;              x = d * q
//   Q4_0  32 elements in 18 bytes: f16 d, 16 bytes of nibbles;          x = d * (q - 8), the low
//         nibbles holding elements 0..15, the high ones 16..31
//   Q4_K  256 elements in 144 bytes: f16 d, f16 dmin, 12 bytes of eight 6-bit scales and mins,
//         128 bytes of nibbles; sub-block s of 32 is x = (d * sc[s]) * q - dmin * m[s], the low
//         nibbles of bytes 32c..32c+31 holding sub-block 2c and the high ones 2c + 1
//   Q5_K  256 elements in 176 bytes: Q4_K's d, dmin and 12 scale bytes, then 32 bytes of fifth
//         bits (bit s of byte i: element i of sub-block s), then Q4_K's 128 bytes of nibbles;
//         x = (d * sc[s]) * (q + 16 * bit) - dmin * m[s]
//   Q6_K  256 elements in 210 bytes: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8
//         scales, f16 d; x = (d * sc[e / 16]) * (q - 32)
// Every product is rounded to f32 as it is formed (no fused multiply-add), the order of the
// `gguf` package's gguf.quants, so dequantization is bit-exact against it.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#include "kernels/tensor.h"

namespace sy::cpu {

// The eight 6-bit scales (out[0..7]) and mins (out[8..15]) of the 12 packed scale bytes of a
// Q4_K or Q5_K block: for j < 4, scale j = s[j] & 63 and min j = s[j + 4] & 63; for j >= 4 the
// low 4 bits come from s[j + 4] (scale: low nibble, min: high nibble) and the top 2 from bits 6-7
// of s[j - 4] (scale) and s[j] (min). Four bytes at a time with 32-bit masks.
inline void q4_k_scales_mins(const uint8_t* packed, uint8_t out[16]) {
  static_assert(std::endian::native == std::endian::little, "byte lanes of 32-bit words");
  uint32_t u[3], v[4];
  std::memcpy(u, packed, 12);
  const uint32_t six = 0x3f3f3f3fu, four = 0x0f0f0f0fu, two = 0x03030303u;
  v[0] = u[0] & six;                                         // scales 0-3
  v[1] = (u[2] & four) | (((u[0] >> 6) & two) << 4);         // scales 4-7
  v[2] = u[1] & six;                                         // mins 0-3
  v[3] = ((u[2] >> 4) & four) | (((u[1] >> 6) & two) << 4);  // mins 4-7
  std::memcpy(out, v, 16);
}

// GGML's type ids (ggml_type), as stored in GGUF tensor infos.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kBF16 = 30,
};

struct GgmlTypeInfo {
  const char* name = nullptr;  // null: an id this build does not know
  int64_t block_elems = 0;
  int64_t block_bytes = 0;
  bool dequantizes = false;  // dequantize_row takes it
};

// What the id `type` is (a zero info for ids outside the table).
GgmlTypeInfo ggml_type_info(uint32_t type);

// Elements [0, n) of a row of `type` from `src` into `dst` (F32); n a multiple of the type's
// block_elems. Requires ggml_type_info(type).dequantizes.
void dequantize_row(GgmlType type, const uint8_t* src, float* dst, int64_t n);

// The GGML type of a switchyard dtype (F32, F16, BF16 and the quantized ones), and back: false
// when `type` has no dtype.
GgmlType ggml_type_of(DType dtype);
bool dtype_of_ggml(GgmlType type, DType* dtype);

// Elements [0, n) of a row of `dtype` (any but I32) into F32.
void row_to_f32(DType dtype, const void* src, float* dst, int64_t n);
// A row of n F32 elements stored as `dtype` (any but I32); n a multiple of its block.
//   F16, BF16: round to nearest even.
//   Q8_0, Q4_0: the reference rounding of GGML, the order of gguf.quants' quantize (bit-exact).
//   Q4_K: per 32-element sub-block, scale (max - min) / 15 and min = min(x, 0), their 6-bit
//         codes rounded to nearest over the block's largest; then each element rounded to the
//         nearest code of its sub-block. (llama.cpp's quantizer searches further; this one is
//         simpler and less accurate, within the bounds tests/kernels/test_qmatmul.cc states.)
//   Q5_K and Q6_K are read only (throw).
void row_from_f32(DType dtype, const float* src, void* dst, int64_t n);

}  // namespace sy::cpu
