// Elementwise add (residual connections).
#include "kernels/cpu/ops.h"

namespace sy::cpu {

void add(Tensor out, Tensor a, Tensor b) {
  SY_CHECK(a.numel() == b.numel() && out.numel() == a.numel(), "add: operand sizes ",
           out.shape_str(), " = ", a.shape_str(), " + ", b.shape_str());
  const int64_t n = a.numel();
  float* o = out.f32();
  const float* x = a.f32();
  const float* y = b.f32();
  for (int64_t i = 0; i < n; ++i) o[i] = x[i] + y[i];
}

}  // namespace sy::cpu
