// RMSNorm on the GPU: out = x * rsqrt(mean(x^2) + eps) * weight, fp32 math, out F32 or BF16.
// CPU twin: kernels/cpu/rmsnorm.cc.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

// One block per row: the threads stride over the row, reduce sum(x^2), then scale. Each thread
// reads x[i] and writes out[i] for the same i after the reduction, so out may alias x (F32).
template <typename T>
__global__ void rmsnorm_kernel(T* out, const float* x, const float* weight, int64_t dim,
                               float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * dim;
  float sum = 0.f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum += xr[i] * xr[i];
  sum = block_sum(sum, scratch);
  const float scale = rsqrtf(sum / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
    store(out, row * dim + i, xr[i] * scale * weight[i]);
}

}  // namespace

void rmsnorm(Tensor out, Tensor x, Tensor weight, float eps, cudaStream_t stream) {
  const int64_t n_tokens = x.size(0);
  const int64_t dim = x.size(1);
  check_tensor(x, "rmsnorm.x", DType::kF32, {n_tokens, dim});
  check_float(out, "rmsnorm.out", {n_tokens, dim});
  check_tensor(weight, "rmsnorm.weight", DType::kF32, {dim});
  check_on_device("rmsnorm", {&out, &x, &weight});
  SY_CHECK(out.data != x.data || out.dtype == DType::kF32, "rmsnorm: a BF16 out cannot alias x");
  if (n_tokens == 0) return;
  with_float_type(out.dtype, "rmsnorm.out", [&](auto tag) {
    using T = typename decltype(tag)::type;
    rmsnorm_kernel<T><<<static_cast<unsigned>(n_tokens), 256, 0, stream>>>(
        static_cast<T*>(out.data), x.f32(), weight.f32(), dim, eps);
  });
  check_launch("rmsnorm");
}

}  // namespace sy::cuda
