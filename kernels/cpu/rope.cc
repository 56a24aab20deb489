// Rotary position embedding, Hugging Face rotate-half convention:
//   inv_freq[i] = 1 / theta^(2i / head_dim),  angle = position * inv_freq[i]   (fp32, as HF)
//   x'[i]       = x[i] cos - x[i + head_dim/2] sin
//   x'[i + h/2] = x[i + head_dim/2] cos + x[i] sin
#include <cmath>

#include "kernels/cpu/ops.h"

namespace sy::cpu {
namespace {

void rotate(float* x, int64_t n_heads, int64_t head_dim, const float* cos_v, const float* sin_v) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < n_heads; ++h) {
    float* xh = x + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = xh[i];
      const float b = xh[i + half];
      xh[i] = a * cos_v[i] - b * sin_v[i];
      xh[i + half] = b * cos_v[i] + a * sin_v[i];
    }
  }
}

}  // namespace

void rope(Tensor q, Tensor k, Tensor positions, double theta) {
  const int64_t n_tokens = positions.size(0);
  const int64_t head_dim = q.size(2);
  check_tensor(positions, "rope.positions", DType::kI32, {n_tokens});
  check_tensor(q, "rope.q", DType::kF32, {n_tokens, -1, head_dim});
  check_tensor(k, "rope.k", DType::kF32, {n_tokens, -1, head_dim});
  SY_CHECK(head_dim % 2 == 0 && head_dim <= 4096, "rope: head_dim ", head_dim);
  const int64_t half = head_dim / 2;
  float inv_freq[2048];
  float cos_v[2048];
  float sin_v[2048];
  for (int64_t i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv_freq[i] = 1.f / std::pow(static_cast<float>(theta), exponent);
  }
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float pos = static_cast<float>(positions.i32()[t]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[i];
      cos_v[i] = std::cos(angle);
      sin_v[i] = std::sin(angle);
    }
    rotate(q.f32() + t * q.size(1) * head_dim, q.size(1), head_dim, cos_v, sin_v);
    rotate(k.f32() + t * k.size(1) * head_dim, k.size(1), head_dim, cos_v, sin_v);
  }
}

}  // namespace sy::cpu
