// Embedding gather with vocabulary-parallel row ranges; tables of any float or block type.
#include <cstring>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/quant.h"

namespace sy::cpu {

void embedding(Tensor out, Tensor ids, Tensor table, int64_t row_offset) {
  const int64_t n_tokens = ids.size(0);
  const int64_t dim = table.size(1);
  check_tensor(out, "embedding.out", DType::kF32, {n_tokens, dim});
  check_tensor(ids, "embedding.ids", DType::kI32, {n_tokens});
  SY_CHECK(table.ndim == 2 && table.dtype != DType::kI32, "embedding.table: expected a 2-d table ",
           "of floats or blocks, got ", dtype_name(table.dtype), table.shape_str());
  const int64_t n_rows = table.size(0);
  const size_t row_bytes = dtype_bytes(table.dtype, dim);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const int64_t row = static_cast<int64_t>(ids.i32()[t]) - row_offset;
    float* dst = out.f32() + t * dim;
    if (row >= 0 && row < n_rows) {
      row_to_f32(table.dtype, static_cast<const char*>(table.data) + row * row_bytes, dst, dim);
    } else {
      std::memset(dst, 0, static_cast<size_t>(dim) * sizeof(float));
    }
  }
}

}  // namespace sy::cpu
