// SwiGLU activation of the experts: out = silu(gate) * up, silu(x) = x / (1 + exp(-x)).
#include <cmath>

#include "kernels/cpu/ops.h"

namespace sy::cpu {

void swiglu(Tensor out, Tensor gate, Tensor up) {
  SY_CHECK(gate.numel() == up.numel() && out.numel() == gate.numel(), "swiglu: operand sizes ",
           out.shape_str(), ", ", gate.shape_str(), ", ", up.shape_str());
  const int64_t n = gate.numel();
  float* o = out.f32();
  const float* g = gate.f32();
  const float* u = up.f32();
  for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

}  // namespace sy::cpu
