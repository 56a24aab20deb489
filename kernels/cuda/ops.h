// GPU ops. Each has a CPU twin of the same name in kernels/cpu/ops.h, its reference in tests.
#pragma once

#include <cuda_runtime.h>

#include "kernels/tensor.h"

namespace sy::cuda {

// out[t, :] = x[t, :] * rsqrt(mean(x[t, :]^2) + eps) * weight.   x, out: [n_tokens, dim] F32.
void rmsnorm(Tensor out, Tensor x, Tensor weight, float eps, cudaStream_t stream);

}  // namespace sy::cuda
