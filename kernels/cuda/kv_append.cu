// Appends this step's keys and values to the paged KV cache on the GPU, converting to the
// cache's dtype. CPU twin: kernels/cpu/kv_append.cc.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

// One block per token. A sequence outside the block table, a position beyond its block table or
// a block id outside the cache is
// skipped (the host validates both before the step; the kernel only refuses to write out of
// bounds).
template <typename T>
__global__ void kv_append_kernel(T* k_cache, T* v_cache, const float* k, const float* v,
                                 const int32_t* positions, const int32_t* token_seq,
                                 const int32_t* block_tables, int64_t n_seqs, int64_t max_blocks,
                                 int64_t block_size, int64_t n_blocks, int64_t row) {
  const int64_t t = blockIdx.x;
  const int64_t pos = positions[t];
  const int64_t logical = pos / block_size;
  if (pos < 0 || logical >= max_blocks) return;
  const int64_t seq = token_seq[t];
  if (seq < 0 || seq >= n_seqs) return;
  const int64_t block = block_tables[seq * max_blocks + logical];
  if (block < 0 || block >= n_blocks) return;
  const int64_t slot = block * block_size + pos % block_size;
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
    store(k_cache, slot * row + i, k[t * row + i]);
    store(v_cache, slot * row + i, v[t * row + i]);
  }
}

}  // namespace

void kv_append(Tensor k_cache, Tensor v_cache, Tensor k, Tensor v, const AttentionMeta& meta,
               cudaStream_t stream) {
  const int64_t n_tokens = k.size(0);
  const int64_t n_kv_heads = k.size(1);
  const int64_t head_dim = k.size(2);
  check_tensor(k, "kv_append.k", DType::kF32, {n_tokens, n_kv_heads, head_dim});
  check_tensor(v, "kv_append.v", DType::kF32, {n_tokens, n_kv_heads, head_dim});
  check_float(k_cache, "kv_append.k_cache", {-1, meta.block_size, n_kv_heads, head_dim});
  check_tensor(v_cache, "kv_append.v_cache", k_cache.dtype,
               {k_cache.size(0), meta.block_size, n_kv_heads, head_dim});
  check_tensor(meta.positions, "kv_append.positions", DType::kI32, {n_tokens});
  check_tensor(meta.token_seq, "kv_append.token_seq", DType::kI32, {n_tokens});
  check_tensor(meta.block_tables, "kv_append.block_tables", DType::kI32, {-1, -1});
  check_on_device("kv_append", {&k_cache, &v_cache, &k, &v, &meta.positions, &meta.token_seq,
                                &meta.block_tables});
  if (n_tokens == 0) return;
  with_float_type(k_cache.dtype, "kv_append.k_cache", [&](auto tag) {
    using T = typename decltype(tag)::type;
    kv_append_kernel<T><<<static_cast<unsigned>(n_tokens), 128, 0, stream>>>(
        static_cast<T*>(k_cache.data), static_cast<T*>(v_cache.data), k.f32(), v.f32(),
        meta.positions.i32(), meta.token_seq.i32(), meta.block_tables.i32(),
        meta.block_tables.size(0), meta.block_tables.size(1), meta.block_size, k_cache.size(0),
        n_kv_heads * head_dim);
  });
  check_launch("kv_append");
}

}  // namespace sy::cuda
