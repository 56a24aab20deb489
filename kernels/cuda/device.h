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

// Waits until `stream` has finished its work. A fault of earlier work on it throws, naming
// `what`. While it waits it runs the wait check, if one is installed: the NCCL communicator
// installs one that throws when a communicator reports an asynchronous error (a peer that
// failed), so that a wait on a collective that can never finish ends with an error.
void wait_for_stream(cudaStream_t stream, const char* what);
// Installs `check` (null: none) for wait_for_stream. `check` throws to end the wait.
void set_wait_check(void (*check)());

}  // namespace sy::cuda
