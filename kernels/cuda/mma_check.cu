// A check of the tensor-core fragment layouts of mma.cuh: one warp loads A (16 x 16) and B
// (16 x 8) from row-major fp32 matrices into fragments by the documented layout, multiplies, and
// writes D (16 x 8) back by the same layout. tests/kernels/test_cuda_ops.cc compares it with a
// plain product, on a GPU (where it checks our reading of the PTX layouts against the hardware)
// and on the emulator (which implements those layouts).
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

__global__ void mma_check_kernel(float* d, const float* a, const float* b) {
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  uint32_t fa[4], fb[2];
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
    fa[r] = pack_bf16(a[row * 16 + col], a[row * 16 + col + 1]);
  }
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * t + 8 * r;
    fb[r] = pack_bf16(b[k * 8 + g], b[(k + 1) * 8 + g]);
  }
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  mma_bf16_16816(acc, fa, fb);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
}

}  // namespace

void mma_check(Tensor d, Tensor a, Tensor b, int sm_major, cudaStream_t stream) {
  check_tensor(d, "mma_check.d", DType::kF32, {16, 8});
  check_tensor(a, "mma_check.a", DType::kF32, {16, 16});
  check_tensor(b, "mma_check.b", DType::kF32, {16, 8});
  SY_CHECK(sm_major >= 8, "mma_check: tensor-core bf16 needs sm_80 or later, this device is sm_",
           sm_major, "x");
  mma_check_kernel<<<1, 32, 0, stream>>>(d.f32(), a.f32(), b.f32());
  check_launch("mma_check");
}

}  // namespace sy::cuda
