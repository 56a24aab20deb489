// Non-owning tensor views and the element types switchyard moves around.
//
// A Tensor is a row-major, contiguous view: data pointer, dtype, device and up to 4 dimensions.
// Ops take views and check shapes and dtypes at their entry; a failed check names the operand and
// prints the expected and actual shapes.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>

#include "kernels/error.h"

namespace sy {

// kQ8_0 .. kQ5_K: GGML's block-quantized weight formats (kernels/cpu/quant.h), held by CPU
// weights only. A row of a quantized tensor holds whole blocks.
enum class DType : uint8_t { kF32, kBF16, kF16, kI32, kQ8_0, kQ4_0, kQ4_K, kQ6_K, kQ5_K };
enum class Device : uint8_t { kCpu, kCuda };

// Bytes of one element; throws for the block-quantized types, which have none.
size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
bool dtype_is_quantized(DType dtype);
// Elements and bytes of one block (1 and dtype_size for the element types).
int64_t dtype_block_elems(DType dtype);
int64_t dtype_block_bytes(DType dtype);
// Bytes of n elements (n a multiple of the block for the quantized types).
size_t dtype_bytes(DType dtype, int64_t n);

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::kCpu;
  int ndim = 0;
  int64_t shape[4] = {0, 0, 0, 0};

  Tensor() = default;
  Tensor(void* data, DType dtype, std::initializer_list<int64_t> dims,
         Device device = Device::kCpu);

  int64_t size(int dim) const;
  int64_t numel() const;
  size_t bytes() const { return dtype_bytes(dtype, numel()); }
  // Elements in one index of dimension 0.
  int64_t row_numel() const {
    int64_t n = 1;
    for (int i = 1; i < ndim; ++i) n *= shape[i];
    return n;
  }
  // Rows [first, first + n) of dimension 0, as a view.
  Tensor rows(int64_t first, int64_t n) const;
  // The same memory with another shape of the same element count.
  Tensor reshape(std::initializer_list<int64_t> dims) const;

  float* f32() const;
  int32_t* i32() const;
  std::string shape_str() const;
};

// Checks `t` has dtype `dtype` and shape `dims` (-1 matches any extent). `name` names the operand.
void check_tensor(const Tensor& t, const char* name, DType dtype,
                  std::initializer_list<int64_t> dims);

// bf16 / f16 <-> f32 (round to nearest even).
inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint16_t f32_to_bf16(float f);
float f16_to_f32(uint16_t v);
uint16_t f32_to_f16(float f);

}  // namespace sy
