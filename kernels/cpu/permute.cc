// Token permutation for the MoE block: gather token rows into expert-contiguous order, and the
// weighted scatter-add that brings expert outputs back to their tokens.
#include <cstring>

#include "kernels/cpu/ops.h"

namespace sy::cpu {

void gather_rows(Tensor out, Tensor x, Tensor rows) {
  const int64_t n_rows = rows.size(0);
  const int64_t dim = x.size(1);
  check_tensor(rows, "gather_rows.rows", DType::kI32, {n_rows});
  check_tensor(x, "gather_rows.x", DType::kF32, {-1, dim});
  check_tensor(out, "gather_rows.out", DType::kF32, {n_rows, dim});
  const int64_t n_tokens = x.size(0);
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t src = rows.i32()[r];
    SY_CHECK(src < n_tokens, "gather_rows: row ", src, " of ", n_tokens);
    if (src < 0)
      std::memset(out.f32() + r * dim, 0, static_cast<size_t>(dim) * 4);
    else
      std::memcpy(out.f32() + r * dim, x.f32() + src * dim, static_cast<size_t>(dim) * 4);
  }
}

void scatter_add_weighted(Tensor out, Tensor x, Tensor rows, Tensor weights) {
  const int64_t n_rows = rows.size(0);
  const int64_t dim = out.size(1);
  check_tensor(rows, "scatter_add_weighted.rows", DType::kI32, {n_rows});
  check_tensor(weights, "scatter_add_weighted.weights", DType::kF32, {n_rows});
  check_tensor(x, "scatter_add_weighted.x", DType::kF32, {n_rows, dim});
  check_tensor(out, "scatter_add_weighted.out", DType::kF32, {-1, dim});
  const int64_t n_tokens = out.size(0);
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t dst = rows.i32()[r];
    SY_CHECK(dst < n_tokens, "scatter_add_weighted: row ", dst, " of ", n_tokens);
    if (dst < 0) continue;  // a row computed on another rank
    const float w = weights.f32()[r];
    float* o = out.f32() + dst * dim;
    const float* xr = x.f32() + r * dim;
    for (int64_t i = 0; i < dim; ++i) o[i] += w * xr[i];
  }
}

}  // namespace sy::cpu
