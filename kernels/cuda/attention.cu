// Causal grouped-query attention over the paged KV cache on the GPU, for prefill chunks and
// decode tokens alike. CPU twin: kernels/cpu/attention.cc (same window, same GQA mapping).
//
// One block per (query head, token). The block walks the token's context in tiles of 128
// positions with an online softmax (running max and sum in fp32): each thread scores one
// position of the tile against q (held in shared memory), the block reduces the tile's max and
// sum, then each thread accumulates its output dimensions over the tile's values. Scores,
// softmax and accumulation are fp32 whatever the cache dtype.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

constexpr int kTile = 128;        // positions per tile = threads per block
constexpr int kMaxHeadDim = 256;  // two output dimensions per thread

template <typename TC, typename TO>
__global__ void attention_kernel(TO* out, const float* q, const TC* k_cache, const TC* v_cache,
                                 const int32_t* positions, const int32_t* token_seq,
                                 const int32_t* block_tables, int64_t n_seqs, int64_t max_blocks,
                                 int64_t block_size, int64_t n_blocks, int64_t n_heads,
                                 int64_t n_kv_heads, int64_t head_dim, int64_t window,
                                 float scale) {
  __shared__ float qs[kMaxHeadDim];
  __shared__ float probs[kTile];
  __shared__ int64_t slots[kTile];
  __shared__ float scratch[32];
  const int64_t h = blockIdx.x;
  const int64_t t = blockIdx.y;
  const int64_t g = h / (n_heads / n_kv_heads);
  const int64_t row = n_kv_heads * head_dim;
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x)
    qs[d] = q[(t * n_heads + h) * head_dim + d];
  __syncthreads();

  const int64_t pos = positions[t];
  const int64_t lo = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
  const int64_t seq = token_seq[t];
  // A sequence outside the table (the host validates steps; never in a valid one) reads nothing.
  const bool seq_ok = seq >= 0 && seq < n_seqs;
  const int64_t n_ctx = seq_ok ? pos - lo + 1 : 0;
  const int32_t* table = block_tables + (seq_ok ? seq : 0) * max_blocks;
  const int64_t d0 = threadIdx.x;
  const int64_t d1 = threadIdx.x + kTile;
  float running_max = -INFINITY;
  float running_sum = 0.f;
  float acc0 = 0.f;
  float acc1 = 0.f;
  for (int64_t base = 0; base < n_ctx; base += kTile) {
    const int64_t j = base + threadIdx.x;
    float s = -INFINITY;
    int64_t slot = -1;
    if (j < n_ctx) {
      const int64_t p = lo + j;
      const int64_t logical = p / block_size;
      const int64_t block = logical < max_blocks ? table[logical] : -1;
      if (block >= 0 && block < n_blocks) {
        slot = block * block_size + p % block_size;
        const TC* kh = k_cache + slot * row + g * head_dim;
        float dot = 0.f;
        for (int64_t d = 0; d < head_dim; ++d) dot += qs[d] * load(kh, d);
        s = dot * scale;
      }
    }
    slots[threadIdx.x] = slot;
    const float tile_max = block_max(s, scratch);
    const float new_max = fmaxf(running_max, tile_max);
    // A tile with no readable position (never for a valid step) leaves the state unchanged.
    const float p = s == -INFINITY ? 0.f : expf(s - new_max);
    probs[threadIdx.x] = p;
    const float tile_sum = block_sum(p, scratch);  // its barriers publish probs and slots
    const float correction = running_max == -INFINITY ? 0.f : expf(running_max - new_max);
    running_sum = running_sum * correction + tile_sum;
    acc0 *= correction;
    acc1 *= correction;
    const int64_t n_tile = n_ctx - base < kTile ? n_ctx - base : kTile;
    for (int64_t i = 0; i < n_tile; ++i) {
      const float pi = probs[i];
      if (slots[i] < 0) continue;
      const TC* vh = v_cache + slots[i] * row + g * head_dim;
      if (d0 < head_dim) acc0 += pi * load(vh, d0);
      if (d1 < head_dim) acc1 += pi * load(vh, d1);
    }
    running_max = new_max;
    __syncthreads();  // the next tile overwrites probs and slots
  }
  const float inv = running_sum > 0.f ? 1.f / running_sum : 0.f;
  TO* oh = out + (t * n_heads + h) * head_dim;
  if (d0 < head_dim) store(oh, d0, acc0 * inv);
  if (d1 < head_dim) store(oh, d1, acc1 * inv);
}

}  // namespace

void attention(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache, const AttentionMeta& meta,
               cudaStream_t stream) {
  const int64_t n_tokens = q.size(0);
  const int64_t n_heads = q.size(1);
  const int64_t head_dim = q.size(2);
  check_tensor(q, "attention.q", DType::kF32, {n_tokens, n_heads, head_dim});
  check_float(out, "attention.out", {n_tokens, n_heads, head_dim});
  check_float(k_cache, "attention.k_cache", {-1, meta.block_size, -1, head_dim});
  check_tensor(v_cache, "attention.v_cache", k_cache.dtype,
               {k_cache.size(0), meta.block_size, k_cache.size(2), head_dim});
  check_tensor(meta.positions, "attention.positions", DType::kI32, {n_tokens});
  check_tensor(meta.token_seq, "attention.token_seq", DType::kI32, {n_tokens});
  check_tensor(meta.block_tables, "attention.block_tables", DType::kI32, {-1, -1});
  check_on_device("attention", {&out, &q, &k_cache, &v_cache, &meta.positions, &meta.token_seq,
                                &meta.block_tables});
  const int64_t n_kv_heads = k_cache.size(2);
  SY_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "attention: ", n_heads,
           " query heads over ", n_kv_heads, " KV heads");
  SY_CHECK(head_dim <= kMaxHeadDim, "attention: head_dim ", head_dim, " above the GPU kernel's ",
           kMaxHeadDim);
  SY_CHECK(n_tokens <= 65535, "attention: ", n_tokens, " tokens in one launch (at most 65535)");
  if (n_tokens == 0) return;
  const float scale = 1.f / sqrtf(static_cast<float>(head_dim));
  const dim3 grid(static_cast<unsigned>(n_heads), static_cast<unsigned>(n_tokens));
  with_float_type(k_cache.dtype, "attention.k_cache", [&](auto cache_tag) {
    using TC = typename decltype(cache_tag)::type;
    with_float_type(out.dtype, "attention.out", [&](auto out_tag) {
      using TO = typename decltype(out_tag)::type;
      attention_kernel<TC, TO><<<grid, kTile, 0, stream>>>(
          static_cast<TO*>(out.data), q.f32(), static_cast<const TC*>(k_cache.data),
          static_cast<const TC*>(v_cache.data), meta.positions.i32(), meta.token_seq.i32(),
          meta.block_tables.i32(), meta.block_tables.size(0), meta.block_tables.size(1),
          meta.block_size, k_cache.size(0), n_heads, n_kv_heads, head_dim, meta.sliding_window,
          scale);
    });
  });
  check_launch("attention");
}

}  // namespace sy::cuda
