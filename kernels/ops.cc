// Default implementations of the ops interface (see ops.h).
#include "kernels/ops.h"

namespace sy {

void Ops::grouped_matmul(Tensor out, Tensor x, const Tensor* w, const int64_t* offsets,
                         size_t n_groups) {
  SY_CHECK(x.ndim == 2 && out.ndim == 2 && x.size(0) == out.size(0), "grouped_matmul: x ",
           x.shape_str(), ", out ", out.shape_str());
  SY_CHECK(offsets[0] >= 0 && offsets[n_groups] <= x.size(0), "grouped_matmul: rows [", offsets[0],
           ", ", offsets[n_groups], ") outside ", x.size(0));
  for (size_t g = 0; g < n_groups; ++g) {
    const int64_t n = offsets[g + 1] - offsets[g];
    SY_CHECK(n >= 0, "grouped_matmul: offsets decrease at group ", g);
    if (n > 0) matmul(out.rows(offsets[g], n), x.rows(offsets[g], n), w[g]);
  }
}

}  // namespace sy
