// Rotary position embedding on the GPU, Hugging Face rotate-half convention, fp32 angles
// computed as the CPU twin does (kernels/cpu/rope.cc): inv_freq = 1 / theta^(2i / head_dim),
// angle = position * inv_freq.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

// One block per token; threads stride over the (head, i) pairs of q and then of k.
__global__ void rope_kernel(float* q, float* k, const int32_t* positions, int64_t n_q_heads,
                            int64_t n_k_heads, int64_t head_dim, float theta) {
  const int64_t t = blockIdx.x;
  const int64_t half = head_dim / 2;
  const float pos = static_cast<float>(positions[t]);
  const int64_t n_pairs = (n_q_heads + n_k_heads) * half;
  for (int64_t p = threadIdx.x; p < n_pairs; p += blockDim.x) {
    const int64_t head = p / half;
    const int64_t i = p % half;
    float* xh = head < n_q_heads ? q + (t * n_q_heads + head) * head_dim
                                 : k + (t * n_k_heads + head - n_q_heads) * head_dim;
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    const float inv_freq = 1.f / powf(theta, exponent);
    const float angle = pos * inv_freq;
    const float c = cosf(angle);
    const float s = sinf(angle);
    const float a = xh[i];
    const float b = xh[i + half];
    xh[i] = a * c - b * s;
    xh[i + half] = b * c + a * s;
  }
}

}  // namespace

void rope(Tensor q, Tensor k, Tensor positions, double theta, cudaStream_t stream) {
  const int64_t n_tokens = positions.size(0);
  const int64_t head_dim = q.size(2);
  check_tensor(positions, "rope.positions", DType::kI32, {n_tokens});
  check_tensor(q, "rope.q", DType::kF32, {n_tokens, -1, head_dim});
  check_tensor(k, "rope.k", DType::kF32, {n_tokens, -1, head_dim});
  check_on_device("rope", {&q, &k, &positions});
  SY_CHECK(head_dim % 2 == 0 && head_dim <= 4096, "rope: head_dim ", head_dim);
  if (n_tokens == 0) return;
  rope_kernel<<<static_cast<unsigned>(n_tokens), 256, 0, stream>>>(
      q.f32(), k.f32(), positions.i32(), q.size(1), k.size(1), head_dim, static_cast<float>(theta));
  check_launch("rope");
}

}  // namespace sy::cuda
