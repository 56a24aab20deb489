// Dequantization of GGML's block formats (see quant.h).
#include "kernels/cpu/quant.h"

#include <cstring>

#include "kernels/error.h"
#include "kernels/tensor.h"

namespace sy::cpu {

namespace {

constexpr int64_t kQK = 256;  // elements of a K-quant block

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

float load_f16(const uint8_t* p) {
  return f16_to_f32(load_u16(p));
}

void dequant_q8_0(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
}

void dequant_q4_0(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const uint8_t* qs = b + 2;
  for (int i = 0; i < 16; ++i) {
    y[i] = d * static_cast<float>((qs[i] & 0x0F) - 8);
    y[i + 16] = d * static_cast<float>((qs[i] >> 4) - 8);
  }
}

// Sub-block j's 6-bit scale and min of a Q4_K block's 12 packed bytes.
void q4_k_scale_min(const uint8_t* s, int j, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

void dequant_q4_k(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const float dmin = load_f16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qs = b + 16;
  for (int s = 0; s < 8; ++s) {
    int sc = 0, m = 0;
    q4_k_scale_min(scales, s, &sc, &m);
    const float dl = d * static_cast<float>(sc);
    const float ml = dmin * static_cast<float>(m);
    const uint8_t* q = qs + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    for (int i = 0; i < 32; ++i) {
      const float scaled = dl * static_cast<float>((q[i] >> shift) & 0x0F);
      y[32 * s + i] = scaled - ml;
    }
  }
}

void dequant_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + kQK / 2;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + kQK / 2 + kQK / 4);
  const float d = load_f16(b + kQK / 2 + kQK / 4 + kQK / 16);
  for (int e = 0; e < kQK; ++e) {
    const int half = e / 128, rem = e % 128;
    const int lo = (ql[half * 64 + rem % 64] >> (4 * (rem / 64))) & 0x0F;
    const int hi = (qh[half * 32 + rem % 32] >> (2 * (rem / 32))) & 0x03;
    const float dl = d * static_cast<float>(scales[e / 16]);
    y[e] = dl * static_cast<float>((lo | (hi << 4)) - 32);
  }
}

}  // namespace

GgmlTypeInfo ggml_type_info(uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      return {"F32", 1, 4, true};
    case GgmlType::kF16:
      return {"F16", 1, 2, true};
    case GgmlType::kBF16:
      return {"BF16", 1, 2, true};
    case GgmlType::kQ4_0:
      return {"Q4_0", 32, 18, true};
    case GgmlType::kQ4_1:
      return {"Q4_1", 32, 20, false};
    case GgmlType::kQ5_0:
      return {"Q5_0", 32, 22, false};
    case GgmlType::kQ5_1:
      return {"Q5_1", 32, 24, false};
    case GgmlType::kQ8_0:
      return {"Q8_0", 32, 34, true};
    case GgmlType::kQ8_1:
      return {"Q8_1", 32, 36, false};
    case GgmlType::kQ2_K:
      return {"Q2_K", 256, 84, false};
    case GgmlType::kQ3_K:
      return {"Q3_K", 256, 110, false};
    case GgmlType::kQ4_K:
      return {"Q4_K", 256, 144, true};
    case GgmlType::kQ5_K:
      return {"Q5_K", 256, 176, false};
    case GgmlType::kQ6_K:
      return {"Q6_K", 256, 210, true};
    case GgmlType::kQ8_K:
      return {"Q8_K", 256, 292, false};
  }
  return {};
}

void dequantize_row(GgmlType type, const uint8_t* src, float* dst, int64_t n) {
  const GgmlTypeInfo info = ggml_type_info(static_cast<uint32_t>(type));
  SY_CHECK(info.dequantizes, "dequantize: type ", static_cast<uint32_t>(type),
           info.name != nullptr ? " (" : "", info.name != nullptr ? info.name : "",
           info.name != nullptr ? ")" : "", " is not supported");
  SY_CHECK(n >= 0 && n % info.block_elems == 0, "dequantize: ", n, " elements of ", info.name,
           " (blocks of ", info.block_elems, ")");
  const int64_t n_blocks = n / info.block_elems;
  for (int64_t i = 0; i < n_blocks; ++i) {
    const uint8_t* b = src + i * info.block_bytes;
    float* y = dst + i * info.block_elems;
    switch (type) {
      case GgmlType::kF32:
        std::memcpy(y, b, 4);
        break;
      case GgmlType::kF16:
        *y = load_f16(b);
        break;
      case GgmlType::kBF16:
        *y = bf16_to_f32(load_u16(b));
        break;
      case GgmlType::kQ8_0:
        dequant_q8_0(b, y);
        break;
      case GgmlType::kQ4_0:
        dequant_q4_0(b, y);
        break;
      case GgmlType::kQ4_K:
        dequant_q4_k(b, y);
        break;
      case GgmlType::kQ6_K:
        dequant_q6_k(b, y);
        break;
      default:
        SY_FAIL("dequantize: unreachable type ", info.name);
    }
  }
}

}  // namespace sy::cpu
