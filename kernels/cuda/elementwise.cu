// Elementwise GPU ops: embedding gather, residual add, SwiGLU.
// CPU twins: kernels/cpu/embedding.cc, add.cc, swiglu.cc.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

// One block per token: its table row (fp32 out), or zeros when another rank holds the row.
template <typename T>
__global__ void embedding_kernel(float* out, const int32_t* ids, const T* table, int64_t n_rows,
                                 int64_t dim, int64_t row_offset) {
  const int64_t t = blockIdx.x;
  const int64_t r = static_cast<int64_t>(ids[t]) - row_offset;
  float* o = out + t * dim;
  const bool held = r >= 0 && r < n_rows;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
    o[i] = held ? load(table, r * dim + i) : 0.f;
}

__global__ void add_kernel(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = a[i] + b[i];
}

// silu(g) * u = g / (1 + exp(-g)) * u, as the CPU twin.
template <typename T>
__global__ void swiglu_kernel(T* out, const T* gate, const T* up, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = load(gate, i);
    store(out, i, g / (1.f + expf(-g)) * load(up, i));
  }
}

}  // namespace

void embedding(Tensor out, Tensor ids, Tensor table, int64_t row_offset, cudaStream_t stream) {
  const int64_t n_tokens = ids.size(0);
  const int64_t dim = table.size(1);
  check_tensor(ids, "embedding.ids", DType::kI32, {n_tokens});
  check_float(table, "embedding.table", {-1, dim});
  check_tensor(out, "embedding.out", DType::kF32, {n_tokens, dim});
  check_on_device("embedding", {&out, &ids, &table});
  if (n_tokens == 0) return;
  with_float_type(table.dtype, "embedding.table", [&](auto tag) {
    using T = typename decltype(tag)::type;
    embedding_kernel<T><<<static_cast<unsigned>(n_tokens), 256, 0, stream>>>(
        out.f32(), ids.i32(), static_cast<const T*>(table.data), table.size(0), dim, row_offset);
  });
  check_launch("embedding");
}

void add(Tensor out, Tensor a, Tensor b, cudaStream_t stream) {
  SY_CHECK(a.dtype == DType::kF32 && b.dtype == DType::kF32 && out.dtype == DType::kF32,
           "add: F32 operands expected");
  SY_CHECK(a.numel() == b.numel() && out.numel() == a.numel(), "add: operand sizes ",
           out.shape_str(), " = ", a.shape_str(), " + ", b.shape_str());
  check_on_device("add", {&out, &a, &b});
  const int64_t n = a.numel();
  if (n == 0) return;
  add_kernel<<<grid_for(n, 256), 256, 0, stream>>>(out.f32(), a.f32(), b.f32(), n);
  check_launch("add");
}

void swiglu(Tensor out, Tensor gate, Tensor up, cudaStream_t stream) {
  SY_CHECK(up.dtype == gate.dtype && out.dtype == gate.dtype, "swiglu: dtypes differ");
  SY_CHECK(gate.numel() == up.numel() && out.numel() == gate.numel(), "swiglu: operand sizes ",
           out.shape_str(), ", ", gate.shape_str(), ", ", up.shape_str());
  check_on_device("swiglu", {&out, &gate, &up});
  const int64_t n = gate.numel();
  if (n == 0) return;
  with_float_type(gate.dtype, "swiglu", [&](auto tag) {
    using T = typename decltype(tag)::type;
    swiglu_kernel<T><<<grid_for(n, 256), 256, 0, stream>>>(static_cast<T*>(out.data),
                                                           static_cast<const T*>(gate.data),
                                                           static_cast<const T*>(up.data), n);
  });
  check_launch("swiglu");
}

}  // namespace sy::cuda
