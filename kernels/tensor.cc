// Tensor views and dtype conversions (see tensor.h).
#include "kernels/tensor.h"

#include <cmath>
#include <sstream>

namespace sy {

int64_t dtype_block_elems(DType dtype) {
  switch (dtype) {
    case DType::kQ8_0:
    case DType::kQ4_0:
      return 32;
    case DType::kQ4_K:
    case DType::kQ5_K:
    case DType::kQ6_K:
      return 256;
    default:
      return 1;
  }
}

int64_t dtype_block_bytes(DType dtype) {
  switch (dtype) {
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kBF16:
    case DType::kF16:
      return 2;
    case DType::kQ8_0:
      return 34;
    case DType::kQ4_0:
      return 18;
    case DType::kQ4_K:
      return 144;
    case DType::kQ5_K:
      return 176;
    case DType::kQ6_K:
      return 210;
  }
  return 0;
}

bool dtype_is_quantized(DType dtype) {
  return dtype_block_elems(dtype) > 1;
}

size_t dtype_size(DType dtype) {
  SY_CHECK(!dtype_is_quantized(dtype), "dtype_size of the block-quantized type ",
           dtype_name(dtype));
  return static_cast<size_t>(dtype_block_bytes(dtype));
}

size_t dtype_bytes(DType dtype, int64_t n) {
  const int64_t block = dtype_block_elems(dtype);
  SY_CHECK(n % block == 0, n, " elements of ", dtype_name(dtype), " (blocks of ", block, ")");
  return static_cast<size_t>(n / block) * static_cast<size_t>(dtype_block_bytes(dtype));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kI32:
      return "I32";
    case DType::kQ8_0:
      return "Q8_0";
    case DType::kQ4_0:
      return "Q4_0";
    case DType::kQ4_K:
      return "Q4_K";
    case DType::kQ5_K:
      return "Q5_K";
    case DType::kQ6_K:
      return "Q6_K";
  }
  return "?";
}

Tensor::Tensor(void* data_, DType dtype_, std::initializer_list<int64_t> dims, Device device_)
    : data(data_), dtype(dtype_), device(device_) {
  SY_CHECK(dims.size() <= 4, "tensor of ", dims.size(), " dimensions (at most 4)");
  for (int64_t d : dims) {
    SY_CHECK(d >= 0, "negative tensor extent ", d);
    shape[ndim++] = d;
  }
}

int64_t Tensor::size(int dim) const {
  SY_CHECK(dim >= 0 && dim < ndim, "dimension ", dim, " of a ", ndim, "-d tensor");
  return shape[dim];
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

Tensor Tensor::rows(int64_t first, int64_t n) const {
  SY_CHECK(ndim >= 1 && first >= 0 && n >= 0 && first + n <= shape[0], "rows [", first, ", ",
           first + n, ") of tensor ", shape_str());
  Tensor t = *this;
  t.shape[0] = n;
  t.data = static_cast<char*>(data) + dtype_bytes(dtype, first * row_numel());
  return t;
}

Tensor Tensor::reshape(std::initializer_list<int64_t> dims) const {
  Tensor t(data, dtype, dims, device);
  SY_CHECK(t.numel() == numel(), "reshape of ", shape_str(), " to ", t.shape_str());
  return t;
}

float* Tensor::f32() const {
  SY_CHECK(dtype == DType::kF32, "expected an F32 tensor, got ", dtype_name(dtype));
  return static_cast<float*>(data);
}

int32_t* Tensor::i32() const {
  SY_CHECK(dtype == DType::kI32, "expected an I32 tensor, got ", dtype_name(dtype));
  return static_cast<int32_t*>(data);
}

std::string Tensor::shape_str() const {
  std::ostringstream out;
  out << "[";
  for (int i = 0; i < ndim; ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

void check_tensor(const Tensor& t, const char* name, DType dtype,
                  std::initializer_list<int64_t> dims) {
  bool ok = t.dtype == dtype && t.ndim == static_cast<int>(dims.size());
  int i = 0;
  for (int64_t d : dims) {
    if (ok && d >= 0 && t.shape[i] != d) ok = false;
    ++i;
  }
  if (ok) return;
  std::ostringstream want;
  want << dtype_name(dtype) << "[";
  i = 0;
  for (int64_t d : dims) {
    want << (i++ ? ", " : "");
    if (d < 0)
      want << "*";
    else
      want << d;
  }
  want << "]";
  SY_FAIL(name, ": expected ", want.str(), ", got ", dtype_name(t.dtype), t.shape_str());
}

uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint32_t sign = (bits >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((bits >> 23) & 0xff) - 127 + 15;
  uint32_t mant = bits & 0x7fffffu;
  if (((bits >> 23) & 0xff) == 0xff)
    return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) ++half;
  return static_cast<uint16_t>(half);
}

}  // namespace sy
