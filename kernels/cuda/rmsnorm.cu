// RMSNorm on the GPU: out = x / sqrt(mean(x^2) + eps) * weight, fp32 accumulation.
// CPU twin: kernels/cpu/rmsnorm.cc.
#include "kernels/cuda/device.h"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

// ---- kernels ----------------------------------------------------------------------------------

// One block per row; threads stride over the row and reduce sum(x^2) through shared memory.
__global__ void rmsnorm_kernel(float* out, const float* x, const float* weight, int64_t dim,
                               float eps) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  float* outr = out + row * dim;
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += xr[i] * xr[i];
  __shared__ float partial[32];
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    sum = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2)
      sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (threadIdx.x == 0) partial[0] = sum;
  }
  __syncthreads();
  const float scale = rsqrtf(partial[0] / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) outr[i] = xr[i] * scale * weight[i];
}

}  // namespace

// ---- launchers --------------------------------------------------------------------------------

void rmsnorm(Tensor out, Tensor x, Tensor weight, float eps, cudaStream_t stream) {
  const int64_t n_tokens = x.size(0);
  const int64_t dim = x.size(1);
  check_tensor(x, "rmsnorm.x", DType::kF32, {n_tokens, dim});
  check_tensor(out, "rmsnorm.out", DType::kF32, {n_tokens, dim});
  check_tensor(weight, "rmsnorm.weight", DType::kF32, {dim});
  SY_CHECK(
      x.device == Device::kCuda && out.device == Device::kCuda && weight.device == Device::kCuda,
      "rmsnorm: operands must be on the GPU");
  if (n_tokens == 0) return;
  rmsnorm_kernel<<<static_cast<unsigned>(n_tokens), 256, 0, stream>>>(out.f32(), x.f32(),
                                                                      weight.f32(), dim, eps);
  SY_CUDA_CHECK(cudaGetLastError());
}

}  // namespace sy::cuda
