// Embedding gather with vocabulary-parallel row ranges.
#include <cstring>

#include "kernels/cpu/ops.h"

namespace sy::cpu {

void embedding(Tensor out, Tensor ids, Tensor table, int64_t row_offset) {
  const int64_t n_tokens = ids.size(0);
  const int64_t dim = table.size(1);
  check_tensor(out, "embedding.out", DType::kF32, {n_tokens, dim});
  check_tensor(ids, "embedding.ids", DType::kI32, {n_tokens});
  check_tensor(table, "embedding.table", DType::kF32, {-1, dim});
  const int64_t n_rows = table.size(0);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const int64_t row = static_cast<int64_t>(ids.i32()[t]) - row_offset;
    float* dst = out.f32() + t * dim;
    if (row >= 0 && row < n_rows) {
      std::memcpy(dst, table.f32() + row * dim, static_cast<size_t>(dim) * sizeof(float));
    } else {
      std::memset(dst, 0, static_cast<size_t>(dim) * sizeof(float));
    }
  }
}

}  // namespace sy::cpu
