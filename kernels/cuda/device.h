// CUDA device discovery and error checking for the GPU backend.
#pragma once

#include <cuda_runtime.h>

#include "kernels/error.h"

#define SY_CUDA_CHECK(expr)                                                                  \
  do {                                                                                       \
    cudaError_t sy_err_ = (expr);                                                            \
    if (sy_err_ != cudaSuccess)                                                              \
      ::sy::detail::fail(__FILE__, __LINE__, #expr,                                          \
                         ::sy::detail::concat("CUDA error: ", cudaGetErrorString(sy_err_))); \
  } while (0)

namespace sy::cuda {

// Number of usable CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();

}  // namespace sy::cuda
