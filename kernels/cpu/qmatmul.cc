// out = x · wᵀ for weights held in F16, BF16 or a GGML block type (kernels/cpu/quant.h).
//
// Block types: each row of x is first quantized to 8-bit blocks (as llama.cpp does): 32 elements
// and an f32 scale for Q8_0 and Q4_0 weights, 256 elements, an f32 scale and the sums of every
// 16 for Q4_K and Q6_K. A weight block times an activation block is then an integer dot product
// scaled once: out[i, j] = sum over blocks of d_w * d_x * sum(q_w * q_x) (and, for Q4_K, the
// minimums' term, which the 16-element sums give without touching the elements). F16 and BF16
// weights are widened to f32 in registers and multiplied in f32.
//
// Weight rows are taken in panels that stay in L2 while every group of up to kRows rows of x
// passes over them; within a group, each weight block is loaded and decoded once for all its
// rows. So the weights stream from memory once per call, whatever m is, and are never repacked.
// The output columns are split between the threads of the pool (kernels/cpu/threads.h).
//
// Two paths compute the same integer sums: AVX2 (+FMA, F16C) when the CPU has them, chosen at
// run time, and portable C++ (set_simd(Simd::kPortable) forces it; the tests run both). Their
// results differ only in the order of the f32 additions.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/threads.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SY_QMATMUL_AVX2 1
#endif

namespace sy::cpu {
namespace {

constexpr int kRows = 4;                   // rows of x per register tile
constexpr int kRowsHalf = 2;               // F16 / BF16: four accumulators a row
constexpr size_t kPanelBytes = 96 * 1024;  // weight rows per panel: about this many bytes

// Activation blocks.
struct ActQ8 {  // for Q8_0 and Q4_0 weights
  float d;
  int8_t q[32];
};
struct ActQ8K {  // for Q4_K and Q6_K weights
  float d;
  int8_t q[256];
  int16_t sums[16];  // of q[16g .. 16g + 15]
};

Simd g_simd = Simd::kAuto;

uint16_t u16_at(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
float f16_at(const uint8_t* p) {
  return f16_to_f32(u16_at(p));
}

// Quantizes `block` floats to int8 with scale max|x| / 127 (round to nearest even, one cvtss2si
// each): the scale.
float quantize_act(const float* x, int block, int8_t* q) {
  float amax = 0;
  for (int i = 0; i < block; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.f;
  const float id = d > 0 ? 1.f / d : 0.f;
  for (int i = 0; i < block; ++i) q[i] = static_cast<int8_t>(std::lrint(x[i] * id));
  return d;
}

// quantize_act or its AVX2 twin (the same bytes and scale).
using QuantizeFn = float (*)(const float* x, int block, int8_t* q);

void quantize_q8(QuantizeFn quantize, const float* x, int64_t k, ActQ8* out) {
  static_assert(sizeof(ActQ8) == 36);
  for (int64_t b = 0; b < k / 32; ++b) out[b].d = quantize(x + 32 * b, 32, out[b].q);
}

void quantize_q8k(QuantizeFn quantize, const float* x, int64_t k, ActQ8K* out) {
  for (int64_t b = 0; b < k / 256; ++b) {
    out[b].d = quantize(x + 256 * b, 256, out[b].q);
    for (int g = 0; g < 16; ++g) {
      int s = 0;
      for (int i = 0; i < 16; ++i) s += out[b].q[16 * g + i];
      out[b].sums[g] = static_cast<int16_t>(s);
    }
  }
}

// ---- portable dot products: one weight row against R activation rows ----------------------

void dot_q8_0(const uint8_t* w, const ActQ8* const* x, int R, int64_t nb, float* out) {
  for (int r = 0; r < R; ++r) {
    float sum = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = w + 34 * b;
      int s = 0;
      for (int i = 0; i < 32; ++i) s += static_cast<int8_t>(wb[2 + i]) * x[r][b].q[i];
      sum += f16_at(wb) * x[r][b].d * static_cast<float>(s);
    }
    out[r] = sum;
  }
}

void dot_q4_0(const uint8_t* w, const ActQ8* const* x, int R, int64_t nb, float* out) {
  for (int r = 0; r < R; ++r) {
    float sum = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = w + 18 * b;
      int s = 0;
      for (int i = 0; i < 16; ++i) {
        s += ((wb[2 + i] & 0x0F) - 8) * x[r][b].q[i];
        s += ((wb[2 + i] >> 4) - 8) * x[r][b].q[i + 16];
      }
      sum += f16_at(wb) * x[r][b].d * static_cast<float>(s);
    }
    out[r] = sum;
  }
}

// Q4_K (Five = false) and Q5_K (true), as dequant_qk lays them out.
template <bool Five>
void dot_qk(const uint8_t* w, const ActQ8K* const* x, int R, int64_t nb, float* out) {
  for (int r = 0; r < R; ++r) {
    float sum = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = w + (Five ? 176 : 144) * b;
      const ActQ8K& a = x[r][b];
      uint8_t sm[16];
      q4_k_scales_mins(wb + 4, sm);
      int dot = 0, mins = 0;
      for (int s = 0; s < 8; ++s) {
        const uint8_t* q = wb + (Five ? 48 : 16) + 32 * (s / 2);
        int ds = 0;
        for (int i = 0; i < 32; ++i) {
          int v = (q[i] >> (4 * (s % 2))) & 0x0F;
          if constexpr (Five) v |= ((wb[16 + i] >> s) & 1) << 4;
          ds += v * a.q[32 * s + i];
        }
        dot += sm[s] * ds;
        mins += sm[8 + s] * (a.sums[2 * s] + a.sums[2 * s + 1]);
      }
      sum += f16_at(wb) * a.d * static_cast<float>(dot) -
             f16_at(wb + 2) * a.d * static_cast<float>(mins);
    }
    out[r] = sum;
  }
}

void dot_q6_k(const uint8_t* w, const ActQ8K* const* x, int R, int64_t nb, float* out) {
  for (int r = 0; r < R; ++r) {
    float sum = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* wb = w + 210 * b;
      const ActQ8K& a = x[r][b];
      const uint8_t* ql = wb;
      const uint8_t* qh = wb + 128;
      const auto* scales = reinterpret_cast<const int8_t*>(wb + 192);
      int dot = 0;
      for (int g = 0; g < 16; ++g) {
        int ds = 0;
        for (int i = 0; i < 16; ++i) {
          const int e = 16 * g + i, half = e / 128, rem = e % 128;
          const int lo = (ql[half * 64 + rem % 64] >> (4 * (rem / 64))) & 0x0F;
          const int hi = (qh[half * 32 + rem % 32] >> (2 * (rem / 32))) & 0x03;
          ds += (lo | (hi << 4)) * a.q[e];
        }
        dot += scales[g] * (ds - 32 * a.sums[g]);
      }
      sum += f16_at(wb + 208) * a.d * static_cast<float>(dot);
    }
    out[r] = sum;
  }
}

#ifdef SY_QMATMUL_AVX2
#define SY_AVX2 __attribute__((target("avx2,fma,f16c")))

// An f16 scale through F16C (the same value as f16_to_f32, without its branches and call).
SY_AVX2 inline float f16c_at(const uint8_t* p) {
  return _cvtsh_ss(u16_at(p));
}

// quantize_act for blocks of a multiple of 32: the same max, scale and round to nearest even
// (cvtps2dq under the default rounding mode, as lrint), 32 at a time.
SY_AVX2 float avx2_quantize_act(const float* x, int block, int8_t* q) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < block; i += 8)
    m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  const float amax = _mm_cvtss_f32(h);
  const float d = amax / 127.f;
  const __m256 id = _mm256_set1_ps(d > 0 ? 1.f / d : 0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int i = 0; i < block; i += 32) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), id));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), id));
    const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), id));
    const __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), id));
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, e));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i),
                        _mm256_permutevar8x32_epi32(packed, order));
  }
  return d;
}

SY_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Q8_0 and Q4_0: block b's 32 weights as signed bytes and its scale.
SY_AVX2 inline __m256i q8_0_block(const uint8_t* wb) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 2));
}
SY_AVX2 inline __m256i q4_0_block(const uint8_t* wb) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 2));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  return _mm256_sub_epi8(_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(8));
}

// One weight row of 32-element blocks (Q8_0: 34 bytes, Q4_0: 18) against R rows of ActQ8.
// Even and odd blocks go to two sets of accumulators, so the FMA chains of a row overlap.
template <int R, int BlockBytes, __m256i (*Load)(const uint8_t*)>
SY_AVX2 void avx2_q32(const uint8_t* w, const ActQ8* const* x, int64_t nb, float* out) {
  __m256 acc[2][R];
  for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  auto block = [&](int64_t b, __m256* a) SY_AVX2 {
    const uint8_t* wb = w + BlockBytes * b;
    const __m256i qw = Load(wb);
    const float dw = f16c_at(wb);
    const __m256i ax = _mm256_sign_epi8(qw, qw);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r][b].q));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(qx, qw)),
                                          _mm256_set1_epi16(1));
      a[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[r][b].d), _mm256_cvtepi32_ps(p), a[r]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    block(b, acc[0]);
    block(b + 1, acc[1]);
  }
  if (b < nb) block(b, acc[0]);
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
}

// Q4_K (Five = false) and Q5_K (true: each element's fifth bit from the 32 bytes after the
// scales, bit s of byte i for element i of sub-block s). Per block and row: eight 32-element
// integer dots, each scaled by its sub-block's 6-bit scale in 16 bits (madd), summed in i32;
// the mins' term is the 16 activation sums against the mins (one more madd), kept in a second
// f32 accumulator. Nothing per element but the dots.
template <int R, bool Five>
SY_AVX2 void avx2_qk(const uint8_t* w, const ActQ8K* const* x, int64_t nb, float* out) {
  // Per block, the weights are decoded 64 elements (two sub-blocks) at a time and used at once
  // by every row, whose integer sums stay in registers: few values live across the rows.
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + (Five ? 176 : 144) * b;
    alignas(16) uint8_t sm[16];
    q4_k_scales_mins(wb + 4, sm);
    const __m128i sm8 = _mm_load_si128(reinterpret_cast<const __m128i*>(sm));
    // Scales as 16-bit lanes, both halves: lanes 0-7 scale 0-7. Sub-block s's scale in every
    // lane: a byte shuffle picking bytes 2s and 2s + 1.
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm8));
    const uint8_t* qs = wb + (Five ? 48 : 16);
    __m256i qh;
    if constexpr (Five) qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 16));
    __m256i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
      __m256i lo = _mm256_and_si256(q, low4);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
      if constexpr (Five) {
        const __m256i one = _mm256_set1_epi8(1);
        lo = _mm256_or_si256(
            lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one), 4));
        hi = _mm256_or_si256(
            hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one), 4));
      }
      const __m256i slo = _mm256_shuffle_epi8(
          sc16, _mm256_set1_epi16(static_cast<int16_t>(0x0100 * (4 * c + 1) + 4 * c)));
      const __m256i shi = _mm256_shuffle_epi8(
          sc16, _mm256_set1_epi16(static_cast<int16_t>(0x0100 * (4 * c + 3) + 4 * c + 2)));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* aq = x[r][b].q + 64 * c;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq + 32));
        sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), slo));
        sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), shi));
      }
    }
    // Mins, each twice (the two 16-element sums of its sub-block), as 16 lanes of 16 bits.
    const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm8, sm8));
    const float d = f16c_at(wb), dmin = f16c_at(wb + 2);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const ActQ8K& a = x[r][b];
      const __m256i sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.sums));
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(sum[r]), acc[r]);
      acc[r] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * a.d),
                                _mm256_cvtepi32_ps(_mm256_madd_epi16(sums, mins16)), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// Run t's scales of a Q6_K block (elements [32t, 32t + 32)): scale 2t in the low 8 lanes of 16
// bits, 2t + 1 in the high 8, picked by one byte shuffle from the scales' 16-bit lanes.
SY_AVX2 inline __m256i q6_run_scale(__m256i sc_lo, __m256i sc_hi, int t) {
  const char a = static_cast<char>(2 * (2 * t % 8)), b = static_cast<char>(a + 2);
  const char a1 = static_cast<char>(a + 1), b1 = static_cast<char>(b + 1);
  const __m256i pick = _mm256_setr_epi8(a, a1, a, a1, a, a1, a, a1, a, a1, a, a1, a, a1, a, a1, b,
                                        b1, b, b1, b, b1, b, b1, b, b1, b, b1, b, b1, b, b1);
  return _mm256_shuffle_epi8(t < 4 ? sc_lo : sc_hi, pick);
}

// Bits [shift, shift + 2) of each byte of a Q6_K block's high bits, moved to bits 4 and 5.
SY_AVX2 inline __m256i q6_high(__m256i hi, int shift, __m256i two) {
  return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, shift), two), 4);
}

template <int R>
SY_AVX2 void avx2_q6_k(const uint8_t* w, const ActQ8K* const* x, int64_t nb, float* out) {
  // As avx2_qk: 64 elements decoded at a time and used by every row at once.
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wb = w + 210 * b;
    const auto* scales = reinterpret_cast<const int8_t*>(wb + 192);
    // The 16 scales as 16-bit lanes: 0-7 in both halves of sc_lo, 8-15 in both of sc_hi.
    const __m256i sc16 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales)));
    const __m256i sc_lo = _mm256_permute2x128_si256(sc16, sc16, 0x00);
    const __m256i sc_hi = _mm256_permute2x128_si256(sc16, sc16, 0x11);
    __m256i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
      // The 256 elements as eight runs of 32 unsigned 6-bit values, run t covering elements
      // [32t, 32t + 32) (scales 2t and 2t + 1): half h holds runs 4h .. 4h + 3, taken in pairs
      // (4h + p, 4h + p + 2) that share their low-nibble bytes.
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 128 + 32 * h));
#pragma GCC unroll 2
      for (int p = 0; p < 2; ++p) {
        const __m256i l =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 64 * h + 32 * p));
        const int t0 = 4 * h + p, t1 = 4 * h + p + 2;
        const __m256i q0 = _mm256_or_si256(_mm256_and_si256(l, low4), q6_high(hi, 2 * p, two));
        const __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l, 4), low4),
                                           q6_high(hi, 2 * p + 4, two));
        const __m256i s0 = q6_run_scale(sc_lo, sc_hi, t0), s1 = q6_run_scale(sc_lo, sc_hi, t1);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const int8_t* aq = x[r][b].q;
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq + 32 * t0));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq + 32 * t1));
          sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q0, x0), s0));
          sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q1, x1), s1));
        }
      }
    }
    // The -32 offset of every element: 32 * scale[g] against the activations' 16-element sums.
    const __m256i bias_scale = _mm256_slli_epi16(
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales))), 5);
    const float d = f16c_at(wb + 208);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const ActQ8K& a = x[r][b];
      const __m256i sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.sums));
      const __m256i total = _mm256_sub_epi32(sum[r], _mm256_madd_epi16(sums, bias_scale));
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(total), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// F16 / BF16 weights: 8 elements widened to f32.
template <DType W>
SY_AVX2 inline __m256 load8(const uint8_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (W == DType::kF16) {
    return _mm256_cvtph_ps(h);
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <DType W, int R>
SY_AVX2 void avx2_half(const uint8_t* w, const float* const* x, int64_t k, float* out) {
  // Four sets of accumulators (element i into set (i / 8) % 4), whatever R: a row's FMA chains
  // overlap, so one row alone is not held to one FMA latency per 8 weights, and a row sums in
  // the same order in a tile of any size (tiles hold at most kRowsHalf rows).
  constexpr int C = 4;
  __m256 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * C <= k; i += 8 * C) {
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const __m256 wv = load8<W>(w + 2 * (i + 8 * c));
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r)
        acc[c][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x[r] + i + 8 * c), wv, acc[c][r]);
    }
  }
  for (int c = 0; i + 8 <= k; i += 8, ++c) {
    const __m256 wv = load8<W>(w + 2 * i);
    for (int r = 0; r < R; ++r)
      acc[c][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x[r] + i), wv, acc[c][r]);
  }
  for (int r = 0; r < R; ++r) {
    float v = hsum(
        _mm256_add_ps(_mm256_add_ps(acc[0][r], acc[1][r]), _mm256_add_ps(acc[2][r], acc[3][r])));
    for (int64_t t = i; t < k; ++t) {
      const uint16_t h = u16_at(w + 2 * t);
      v += x[r][t] * (W == DType::kF16 ? f16_to_f32(h) : bf16_to_f32(h));
    }
    out[r] = v;
  }
}

bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

void portable_half(DType W, const uint8_t* w, const float* const* x, int R, int64_t k, float* out) {
  for (int r = 0; r < R; ++r) {
    float v = 0;
    for (int64_t t = 0; t < k; ++t) {
      const uint16_t h = u16_at(w + 2 * t);
      v += x[r][t] * (W == DType::kF16 ? f16_to_f32(h) : bf16_to_f32(h));
    }
    out[r] = v;
  }
}

// `cols` consecutive weight rows (w_row_bytes apart) against R (<= kRows) rows of prepared
// activations: out[r * ldo + j] for weight row j.
using PanelFn = void (*)(const uint8_t* w, size_t w_row_bytes, int64_t cols, const void* const* x,
                         int R, int64_t k, float* out, int64_t ldo);

template <typename Act, void (*Portable)(const uint8_t*, const Act* const*, int, int64_t, float*),
          int Block>
void portable_panel(const uint8_t* w, size_t w_row_bytes, int64_t cols, const void* const* x, int R,
                    int64_t k, float* out, int64_t ldo) {
  float res[kRows];
  for (int64_t j = 0; j < cols; ++j) {
    Portable(w + w_row_bytes * static_cast<size_t>(j), reinterpret_cast<const Act* const*>(x), R,
             k / Block, res);
    for (int r = 0; r < R; ++r) out[r * ldo + j] = res[r];
  }
}

template <DType W>
void portable_half_panel(const uint8_t* w, size_t w_row_bytes, int64_t cols, const void* const* x,
                         int R, int64_t k, float* out, int64_t ldo) {
  float res[kRows];
  for (int64_t j = 0; j < cols; ++j) {
    portable_half(W, w + w_row_bytes * static_cast<size_t>(j),
                  reinterpret_cast<const float* const*>(x), R, k, res);
    for (int r = 0; r < R; ++r) out[r * ldo + j] = res[r];
  }
}

#ifdef SY_QMATMUL_AVX2
// The loop over a panel's weight rows for a fixed R, the kernel inlined into it.
template <typename Act, template <int> class Fn, int Block, int R>
SY_AVX2 void avx2_panel_r(const uint8_t* w, size_t w_row_bytes, int64_t cols, const Act* const* a,
                          int64_t k, float* out, int64_t ldo) {
  float res[R];
  for (int64_t j = 0; j < cols; ++j) {
    Fn<R>::run(w + w_row_bytes * static_cast<size_t>(j), a, k / Block, res);
    for (int r = 0; r < R; ++r) out[r * ldo + j] = res[r];
  }
}
// R rows through the instance for R (R <= MaxR).
template <typename Act, template <int> class Fn, int Block, int MaxR>
void avx2_panel_dispatch(int R, const uint8_t* w, size_t w_row_bytes, int64_t cols,
                         const Act* const* a, int64_t k, float* out, int64_t ldo) {
  if constexpr (MaxR > 1) {
    if (R < MaxR)
      return avx2_panel_dispatch<Act, Fn, Block, MaxR - 1>(R, w, w_row_bytes, cols, a, k, out, ldo);
  }
  avx2_panel_r<Act, Fn, Block, MaxR>(w, w_row_bytes, cols, a, k, out, ldo);
}
template <typename Act, template <int> class Fn, int Block, int MaxR = kRows>
void avx2_panel(const uint8_t* w, size_t w_row_bytes, int64_t cols, const void* const* x, int R,
                int64_t k, float* out, int64_t ldo) {
  avx2_panel_dispatch<Act, Fn, Block, MaxR>(R, w, w_row_bytes, cols,
                                            reinterpret_cast<const Act* const*>(x), k, out, ldo);
}
template <int R>
struct Q8_0Fn {
  SY_AVX2 static void run(const uint8_t* w, const ActQ8* const* x, int64_t nb, float* out) {
    avx2_q32<R, 34, q8_0_block>(w, x, nb, out);
  }
};
template <int R>
struct Q4_0Fn {
  SY_AVX2 static void run(const uint8_t* w, const ActQ8* const* x, int64_t nb, float* out) {
    avx2_q32<R, 18, q4_0_block>(w, x, nb, out);
  }
};
template <int R>
struct Q4_KFn {
  SY_AVX2 static void run(const uint8_t* w, const ActQ8K* const* x, int64_t nb, float* out) {
    avx2_qk<R, false>(w, x, nb, out);
  }
};
template <int R>
struct Q5_KFn {
  SY_AVX2 static void run(const uint8_t* w, const ActQ8K* const* x, int64_t nb, float* out) {
    avx2_qk<R, true>(w, x, nb, out);
  }
};
template <int R>
struct Q6_KFn {
  SY_AVX2 static void run(const uint8_t* w, const ActQ8K* const* x, int64_t nb, float* out) {
    avx2_q6_k<R>(w, x, nb, out);
  }
};
// F16 / BF16 through the same loop: Block 1, the activations' f32 rows.
template <DType W>
struct HalfFn {
  template <int R>
  struct Fn {
    SY_AVX2 static void run(const uint8_t* w, const float* const* x, int64_t k, float* out) {
      avx2_half<W, R>(w, x, k, out);
    }
  };
};
template <int R>
using F16Fn = HalfFn<DType::kF16>::Fn<R>;
template <int R>
using BF16Fn = HalfFn<DType::kBF16>::Fn<R>;
#endif

// The row function for `w` on the path in use, and how activations are prepared for it.
enum class ActKind { kF32, kQ8, kQ8K };
struct Kernel {
  PanelFn panel = nullptr;
  ActKind act = ActKind::kF32;
  int rows = kRows;  // rows of x per tile (<= kRows)
};

Kernel kernel_for(DType w) {
#ifdef SY_QMATMUL_AVX2
  if (simd_enabled()) {
    switch (w) {
      case DType::kQ8_0:
        return {avx2_panel<ActQ8, Q8_0Fn, 32>, ActKind::kQ8};
      case DType::kQ4_0:
        return {avx2_panel<ActQ8, Q4_0Fn, 32>, ActKind::kQ8};
      case DType::kQ4_K:
        return {avx2_panel<ActQ8K, Q4_KFn, 256>, ActKind::kQ8K};
      case DType::kQ5_K:
        return {avx2_panel<ActQ8K, Q5_KFn, 256>, ActKind::kQ8K};
      case DType::kQ6_K:
        return {avx2_panel<ActQ8K, Q6_KFn, 256>, ActKind::kQ8K};
      case DType::kF16:
        return {avx2_panel<float, F16Fn, 1, kRowsHalf>, ActKind::kF32, kRowsHalf};
      case DType::kBF16:
        return {avx2_panel<float, BF16Fn, 1, kRowsHalf>, ActKind::kF32, kRowsHalf};
      default:
        break;
    }
  }
#endif
  switch (w) {
    case DType::kQ8_0:
      return {portable_panel<ActQ8, dot_q8_0, 32>, ActKind::kQ8};
    case DType::kQ4_0:
      return {portable_panel<ActQ8, dot_q4_0, 32>, ActKind::kQ8};
    case DType::kQ4_K:
      return {portable_panel<ActQ8K, dot_qk<false>, 256>, ActKind::kQ8K};
    case DType::kQ5_K:
      return {portable_panel<ActQ8K, dot_qk<true>, 256>, ActKind::kQ8K};
    case DType::kQ6_K:
      return {portable_panel<ActQ8K, dot_q6_k, 256>, ActKind::kQ8K};
    case DType::kF16:
      return {portable_half_panel<DType::kF16>, ActKind::kF32};
    case DType::kBF16:
      return {portable_half_panel<DType::kBF16>, ActKind::kF32};
    default:
      SY_FAIL("matmul: no kernel for weights of ", dtype_name(w));
  }
}

// Per thread: the activations of the last call, prepared (quantized rows).
thread_local std::vector<uint8_t> t_act;

}  // namespace

void set_simd(Simd simd) {
  g_simd = simd;
}

bool simd_enabled() {
#ifdef SY_QMATMUL_AVX2
  return g_simd == Simd::kAuto && have_avx2();
#else
  return false;
#endif
}

void matmul_converted(Tensor out, Tensor x, Tensor w) {
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  check_tensor(x, "matmul.x", DType::kF32, {m, k});
  SY_CHECK(w.ndim == 2 && w.shape[1] == k, "matmul.w: expected ", dtype_name(w.dtype), "[*, ", k,
           "], got ", w.shape_str());
  check_tensor(out, "matmul.out", DType::kF32, {m, n});
  SY_CHECK(k % dtype_block_elems(w.dtype) == 0, "matmul.w: rows of ", k, " elements are not whole ",
           dtype_name(w.dtype), " blocks");
  if (m == 0 || n == 0) return;
  const Kernel kern = kernel_for(w.dtype);
  // Activations: the rows of x themselves, or quantized once here for all threads.
  size_t act_row_bytes = static_cast<size_t>(k) * sizeof(float);
  if (kern.act == ActKind::kQ8) act_row_bytes = static_cast<size_t>(k / 32) * sizeof(ActQ8);
  if (kern.act == ActKind::kQ8K) act_row_bytes = static_cast<size_t>(k / 256) * sizeof(ActQ8K);
  const uint8_t* act = reinterpret_cast<const uint8_t*>(x.f32());
  if (kern.act != ActKind::kF32) {
    QuantizeFn quantize = quantize_act;
#ifdef SY_QMATMUL_AVX2
    if (simd_enabled()) quantize = avx2_quantize_act;
#endif
    std::vector<uint8_t>& buf = t_act;  // the caller's (the lambda runs on other threads too)
    buf.resize(act_row_bytes * static_cast<size_t>(m));
    parallel_for(m, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        uint8_t* dst = buf.data() + act_row_bytes * static_cast<size_t>(r);
        if (kern.act == ActKind::kQ8)
          quantize_q8(quantize, x.f32() + r * k, k, reinterpret_cast<ActQ8*>(dst));
        else
          quantize_q8k(quantize, x.f32() + r * k, k, reinterpret_cast<ActQ8K*>(dst));
      }
    });
    act = buf.data();
  }
  const size_t w_row_bytes = dtype_bytes(w.dtype, k);
  const int64_t panel = std::max<int64_t>(1, static_cast<int64_t>(kPanelBytes / w_row_bytes));
  const auto* wdata = static_cast<const uint8_t*>(w.data);
  float* o = out.f32();
  parallel_for(n, [&](int64_t j_begin, int64_t j_end) {
    for (int64_t j0 = j_begin; j0 < j_end; j0 += panel) {
      const int64_t j1 = std::min(j_end, j0 + panel);
      for (int64_t i0 = 0; i0 < m; i0 += kern.rows) {
        const int R = static_cast<int>(std::min<int64_t>(kern.rows, m - i0));
        const void* rows[kRows];
        for (int r = 0; r < R; ++r) rows[r] = act + act_row_bytes * static_cast<size_t>(i0 + r);
        kern.panel(wdata + w_row_bytes * static_cast<size_t>(j0), w_row_bytes, j1 - j0, rows, R, k,
                   o + i0 * n + j0, n);
      }
    }
  });
}

}  // namespace sy::cpu
