// Picks the kernel instantiation for an operand's float dtype (F32 or BF16).
#pragma once

#include <cuda_bf16.h>

#include "kernels/tensor.h"

namespace sy::cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<float>) or f(TypeTag<__nv_bfloat16>) for `dtype`; other dtypes throw naming
// `what`.
template <typename F>
void with_float_type(DType dtype, const char* what, F&& f) {
  if (dtype == DType::kF32)
    f(TypeTag<float>{});
  else if (dtype == DType::kBF16)
    f(TypeTag<__nv_bfloat16>{});
  else
    SY_FAIL(what, ": dtype ", dtype_name(dtype), "; F32 or BF16 expected");
}

}  // namespace sy::cuda
