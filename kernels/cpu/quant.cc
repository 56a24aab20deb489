// Dequantization of GGML's block formats (see quant.h).
#include "kernels/cpu/quant.h"

#include <algorithm>
#include <cmath>
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

// Q4_K (Five = false) and Q5_K (true: a fifth bit per element from the 32 bytes after the
// scales, bit s of byte i for element i of sub-block s; the nibbles follow them).
template <bool Five>
void dequant_qk(const uint8_t* b, float* y) {
  const float d = load_f16(b);
  const float dmin = load_f16(b + 2);
  uint8_t sm[16];
  q4_k_scales_mins(b + 4, sm);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + (Five ? 48 : 16);
  for (int s = 0; s < 8; ++s) {
    const float dl = d * static_cast<float>(sm[s]);
    const float ml = dmin * static_cast<float>(sm[8 + s]);
    const uint8_t* q = qs + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    for (int i = 0; i < 32; ++i) {
      int v = (q[i] >> shift) & 0x0F;
      if constexpr (Five) v |= ((qh[i] >> s) & 1) << 4;
      const float scaled = dl * static_cast<float>(v);
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

void store_f16(uint8_t* p, float v) {
  const uint16_t h = f32_to_f16(v);
  std::memcpy(p, &h, sizeof(h));
}

// ggml's roundf: halves away from zero, as gguf.quants' np_roundf.
float round_away(float v) {
  return std::round(v);
}

void quant_q8_0(const float* x, uint8_t* b) {
  float amax = 0;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  store_f16(b, d);
  for (int i = 0; i < 32; ++i) {
    const float scaled = x[i] * id;
    b[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(round_away(scaled)));
  }
}

void quant_q4_0(const float* x, uint8_t* b) {
  float amax = 0, max = 0;
  for (int i = 0; i < 32; ++i) {
    if (std::fabs(x[i]) > amax) {  // the first element of largest magnitude, sign kept
      amax = std::fabs(x[i]);
      max = x[i];
    }
  }
  const float d = max / -8.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  store_f16(b, d);
  uint8_t q[32];
  for (int i = 0; i < 32; ++i) {
    const float scaled = x[i] * id;
    const float shifted = scaled + 8.5f;
    q[i] = static_cast<uint8_t>(std::clamp(static_cast<int>(std::trunc(shifted)), 0, 15));
  }
  for (int i = 0; i < 16; ++i) b[2 + i] = static_cast<uint8_t>(q[i] | (q[i + 16] << 4));
}

int nearest_code(float v, float step, int top) {
  if (!(step > 0.f)) return 0;
  return std::clamp(static_cast<int>(std::lround(v / step)), 0, top);
}

void pack_q4_k_scales(const int* sc, const int* m, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>((m[j] & 63) | ((m[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4));
  }
}

void quant_q4_k(const float* x, uint8_t* b) {
  float scale[8], min[8], max_scale = 0, max_min = 0;
  for (int s = 0; s < 8; ++s) {
    float lo = 0, hi = -INFINITY;
    for (int i = 0; i < 32; ++i) {
      lo = std::min(lo, x[32 * s + i]);
      hi = std::max(hi, x[32 * s + i]);
    }
    scale[s] = std::max(0.f, (hi - lo) / 15.f);
    min[s] = -lo;
    max_scale = std::max(max_scale, scale[s]);
    max_min = std::max(max_min, min[s]);
  }
  store_f16(b, max_scale / 63.f);
  store_f16(b + 2, max_min / 63.f);
  const float d = load_f16(b), dmin = load_f16(b + 2);  // as the reader will see them
  int sc[8], m[8];
  for (int s = 0; s < 8; ++s) {
    sc[s] = nearest_code(scale[s], d, 63);
    m[s] = nearest_code(min[s], dmin, 63);
  }
  pack_q4_k_scales(sc, m, b + 4);
  uint8_t* qs = b + 16;
  std::memset(qs, 0, 128);
  for (int s = 0; s < 8; ++s) {
    const float dl = d * static_cast<float>(sc[s]);
    const float ml = dmin * static_cast<float>(m[s]);
    for (int i = 0; i < 32; ++i) {
      const int q = nearest_code(x[32 * s + i] + ml, dl, 15);
      qs[32 * (s / 2) + i] |= static_cast<uint8_t>(q << (4 * (s % 2)));
    }
  }
}

}  // namespace

GgmlType ggml_type_of(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return GgmlType::kF32;
    case DType::kF16:
      return GgmlType::kF16;
    case DType::kBF16:
      return GgmlType::kBF16;
    case DType::kQ8_0:
      return GgmlType::kQ8_0;
    case DType::kQ4_0:
      return GgmlType::kQ4_0;
    case DType::kQ4_K:
      return GgmlType::kQ4_K;
    case DType::kQ5_K:
      return GgmlType::kQ5_K;
    case DType::kQ6_K:
      return GgmlType::kQ6_K;
    case DType::kI32:
      break;
  }
  SY_FAIL("no GGML type for ", dtype_name(dtype));
}

bool dtype_of_ggml(GgmlType type, DType* dtype) {
  for (DType d : {DType::kF32, DType::kF16, DType::kBF16, DType::kQ8_0, DType::kQ4_0, DType::kQ4_K,
                  DType::kQ5_K, DType::kQ6_K}) {
    if (ggml_type_of(d) == type) {
      *dtype = d;
      return true;
    }
  }
  return false;
}

void row_to_f32(DType dtype, const void* src, float* dst, int64_t n) {
  if (dtype == DType::kF32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
    return;
  }
  dequantize_row(ggml_type_of(dtype), static_cast<const uint8_t*>(src), dst, n);
}

void row_from_f32(DType dtype, const float* src, void* dst, int64_t n) {
  const int64_t block = dtype_block_elems(dtype);
  SY_CHECK(n >= 0 && n % block == 0, "quantize: ", n, " elements of ", dtype_name(dtype),
           " (blocks of ", block, ")");
  auto* out = static_cast<uint8_t*>(dst);
  const int64_t block_bytes = dtype_block_bytes(dtype);
  for (int64_t i = 0; i < n / block; ++i) {
    const float* x = src + i * block;
    uint8_t* b = out + i * block_bytes;
    switch (dtype) {
      case DType::kF32:
        std::memcpy(b, x, 4);
        break;
      case DType::kF16: {
        const uint16_t h = f32_to_f16(*x);
        std::memcpy(b, &h, 2);
        break;
      }
      case DType::kBF16: {
        const uint16_t h = f32_to_bf16(*x);
        std::memcpy(b, &h, 2);
        break;
      }
      case DType::kQ8_0:
        quant_q8_0(x, b);
        break;
      case DType::kQ4_0:
        quant_q4_0(x, b);
        break;
      case DType::kQ4_K:
        quant_q4_k(x, b);
        break;
      default:
        SY_FAIL("quantize: no quantizer for ", dtype_name(dtype));
    }
  }
}

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
      return {"Q5_K", 256, 176, true};
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
        dequant_qk<false>(b, y);
        break;
      case GgmlType::kQ5_K:
        dequant_qk<true>(b, y);
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
