// out = x · wᵀ through BLAS (row-major sgemm); w is a Hugging Face Linear weight [n, k].
#include <cblas.h>

#include "kernels/cpu/ops.h"

namespace sy::cpu {

void matmul(Tensor out, Tensor x, Tensor w) {
  const int64_t m = x.size(0);
  const int64_t k = x.size(1);
  const int64_t n = w.size(0);
  check_tensor(x, "matmul.x", DType::kF32, {m, k});
  check_tensor(w, "matmul.w", DType::kF32, {n, k});
  check_tensor(out, "matmul.out", DType::kF32, {m, n});
  if (m == 0 || n == 0) return;
  SY_CHECK(m < (1ll << 31) && n < (1ll << 31) && k < (1ll << 31), "matmul: extents too large");
  if (m == 1) {  // decode of one token: a matrix-vector product reads w once, with no packing
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(n), static_cast<int>(k), 1.f, w.f32(),
                static_cast<int>(k), x.f32(), 1, 0.f, out.f32(), 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), 1.f, x.f32(), static_cast<int>(k), w.f32(), static_cast<int>(k),
              0.f, out.f32(), static_cast<int>(n));
}

}  // namespace sy::cpu
