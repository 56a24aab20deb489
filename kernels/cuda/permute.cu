// Row permutations of the MoE block on the GPU: gather_rows (tokens into expert order) and
// scatter_add_weighted (expert outputs back to their tokens, weighted). CPU twin:
// kernels/cpu/permute.cc.
//
// scatter_add_weighted is deterministic and adds each token's rows in ascending r, as the CPU
// does: it builds the inverse of `rows` (for each token, the rows r that point at it) as a CSR
// table in a scratch buffer, sorts each token's short list, and then one block per token sums
// its rows in that order. No float atomics, so results do not depend on thread scheduling.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

// One block per output row; the row is copied as 16- or 32-bit words. Rows outside x give
// zeros (callers validate on the host; the kernel only refuses to read out of bounds).
template <typename W>
__global__ void gather_rows_kernel(W* out, const W* x, const int32_t* rows, int64_t n_src,
                                   int64_t width) {
  const int64_t r = blockIdx.x;
  const int64_t src = rows[r];
  const bool ok = src >= 0 && src < n_src;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x)
    out[r * width + i] = ok ? x[src * width + i] : W(0);
}

// counts[t + 1] = rows pointing at token t.
__global__ void count_kernel(int32_t* counts, const int32_t* rows, int64_t n_rows,
                             int64_t n_tokens) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n_rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t t = rows[r];
    if (t >= 0 && t < n_tokens) atomicAdd(&counts[t + 1], 1);
  }
}

// In place inclusive scan of counts[0..n] (counts[0] = 0), so counts[t] becomes the first entry
// of token t; cursor[t] = counts[t]. One block of 1024 threads walks the array in chunks.
__global__ void __launch_bounds__(1024) scan_kernel(int32_t* counts, int32_t* cursor, int64_t n) {
  __shared__ int32_t part[1024];
  __shared__ int32_t carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base <= n; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    part[threadIdx.x] = i <= n ? counts[i] : 0;
    __syncthreads();
    // Hillis-Steele scan over the chunk.
    for (unsigned step = 1; step < blockDim.x; step *= 2) {
      const int32_t add = threadIdx.x >= step ? part[threadIdx.x - step] : 0;
      __syncthreads();
      part[threadIdx.x] += add;
      __syncthreads();
    }
    if (i <= n) {
      counts[i] = carry + part[threadIdx.x];
      if (i < n) cursor[i] = counts[i];
    }
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry += part[threadIdx.x];
    __syncthreads();
  }
}

// entries[cursor[t]++] = r for every row r of token t (in any order; sorted below).
__global__ void fill_kernel(int32_t* entries, int32_t* cursor, const int32_t* rows, int64_t n_rows,
                            int64_t n_tokens) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < n_rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t t = rows[r];
    if (t >= 0 && t < n_tokens) entries[atomicAdd(&cursor[t], 1)] = static_cast<int32_t>(r);
  }
}

// One block per token: sorts its entries (thread 0; a token has about top-k of them), then
// out[t] += w[r] * x[r] for its rows r in ascending order.
template <typename T>
__global__ void apply_kernel(float* out, const T* x, const float* weights, int32_t* entries,
                             const int32_t* starts, int64_t dim) {
  const int64_t t = blockIdx.x;
  const int32_t begin = starts[t];
  const int32_t end = starts[t + 1];
  if (begin == end) return;
  if (threadIdx.x == 0) {
    for (int32_t i = begin + 1; i < end; ++i) {
      const int32_t v = entries[i];
      int32_t j = i - 1;
      while (j >= begin && entries[j] > v) {
        entries[j + 1] = entries[j];
        --j;
      }
      entries[j + 1] = v;
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
    float acc = out[t * dim + i];
    for (int32_t e = begin; e < end; ++e) {
      const int64_t r = entries[e];
      acc += weights[r] * load(x, r * dim + i);
    }
    out[t * dim + i] = acc;
  }
}

}  // namespace

void gather_rows(Tensor out, Tensor x, Tensor rows, cudaStream_t stream) {
  const int64_t n_rows = rows.size(0);
  const int64_t dim = x.size(1);
  check_tensor(rows, "gather_rows.rows", DType::kI32, {n_rows});
  check_tensor(x, "gather_rows.x", x.dtype, {-1, dim});
  check_tensor(out, "gather_rows.out", x.dtype, {n_rows, dim});
  check_on_device("gather_rows", {&out, &x, &rows});
  if (n_rows == 0 || dim == 0) return;
  const size_t bytes = dtype_size(x.dtype);
  if (bytes == 4) {
    gather_rows_kernel<uint32_t><<<static_cast<unsigned>(n_rows), 256, 0, stream>>>(
        static_cast<uint32_t*>(out.data), static_cast<const uint32_t*>(x.data), rows.i32(),
        x.size(0), dim);
  } else {
    SY_CHECK(bytes == 2, "gather_rows: ", dtype_name(x.dtype), " rows");
    gather_rows_kernel<uint16_t><<<static_cast<unsigned>(n_rows), 256, 0, stream>>>(
        static_cast<uint16_t*>(out.data), static_cast<const uint16_t*>(x.data), rows.i32(),
        x.size(0), dim);
  }
  check_launch("gather_rows");
}

int64_t scatter_scratch_size(int64_t n_tokens, int64_t n_rows) {
  return 2 * n_tokens + 1 + n_rows;
}

void scatter_add_weighted(Tensor out, Tensor x, Tensor rows, Tensor weights, int32_t* scratch,
                          int64_t scratch_size, cudaStream_t stream) {
  const int64_t n_rows = rows.size(0);
  const int64_t dim = out.size(1);
  const int64_t n_tokens = out.size(0);
  check_tensor(rows, "scatter_add_weighted.rows", DType::kI32, {n_rows});
  check_tensor(weights, "scatter_add_weighted.weights", DType::kF32, {n_rows});
  check_float(x, "scatter_add_weighted.x", {n_rows, dim});
  check_tensor(out, "scatter_add_weighted.out", DType::kF32, {-1, dim});
  check_on_device("scatter_add_weighted", {&out, &x, &rows, &weights});
  SY_CHECK(scatter_scratch_size(n_tokens, n_rows) <= scratch_size,
           "scatter_add_weighted: scratch of ", scratch_size, " for ", n_tokens, " tokens, ",
           n_rows, " rows");
  if (n_rows == 0 || n_tokens == 0) return;
  int32_t* starts = scratch;                // [n_tokens + 1]
  int32_t* cursor = starts + n_tokens + 1;  // [n_tokens]
  int32_t* entries = cursor + n_tokens;     // [n_rows]
  SY_CUDA_CHECK(cudaMemsetAsync(starts, 0, (n_tokens + 1) * sizeof(int32_t), stream));
  count_kernel<<<grid_for(n_rows, 256), 256, 0, stream>>>(starts, rows.i32(), n_rows, n_tokens);
  scan_kernel<<<1, 1024, 0, stream>>>(starts, cursor, n_tokens);
  fill_kernel<<<grid_for(n_rows, 256), 256, 0, stream>>>(entries, cursor, rows.i32(), n_rows,
                                                         n_tokens);
  with_float_type(x.dtype, "scatter_add_weighted.x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    apply_kernel<T><<<static_cast<unsigned>(n_tokens), 256, 0, stream>>>(
        out.f32(), static_cast<const T*>(x.data), weights.f32(), entries, starts, dim);
  });
  check_launch("scatter_add_weighted");
}

}  // namespace sy::cuda
