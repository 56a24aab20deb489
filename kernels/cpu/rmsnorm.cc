// RMSNorm, as Hugging Face MixtralRMSNorm: variance in fp32, x * rsqrt(var + eps) * weight.
#include <cmath>

#include "kernels/cpu/ops.h"

namespace sy::cpu {

void rmsnorm(Tensor out, Tensor x, Tensor weight, float eps) {
  const int64_t n_tokens = x.size(0);
  const int64_t dim = x.size(1);
  check_tensor(x, "rmsnorm.x", DType::kF32, {n_tokens, dim});
  check_tensor(out, "rmsnorm.out", DType::kF32, {n_tokens, dim});
  check_tensor(weight, "rmsnorm.weight", DType::kF32, {dim});
  const float* w = weight.f32();
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* xr = x.f32() + t * dim;
    float* outr = out.f32() + t * dim;
    float sum = 0.f;
    for (int64_t i = 0; i < dim; ++i) sum += xr[i] * xr[i];
    const float scale = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) outr[i] = w[i] * (xr[i] * scale);
  }
}

}  // namespace sy::cpu
