// Appends this step's keys and values to the paged KV cache.
#include <cstring>

#include "kernels/cpu/ops.h"

namespace sy::cpu {

int64_t kv_slot(const AttentionMeta& meta, int64_t seq, int64_t position) {
  const int64_t max_blocks = meta.block_tables.size(1);
  const int64_t logical = position / meta.block_size;
  SY_CHECK(seq >= 0 && seq < meta.block_tables.size(0) && logical < max_blocks,
           "kv cache: position ", position, " of sequence ", seq, " beyond its block table");
  const int64_t block = meta.block_tables.i32()[seq * max_blocks + logical];
  return block * meta.block_size + position % meta.block_size;
}

void kv_append(Tensor k_cache, Tensor v_cache, Tensor k, Tensor v, const AttentionMeta& meta) {
  const int64_t n_tokens = k.size(0);
  const int64_t n_kv_heads = k.size(1);
  const int64_t head_dim = k.size(2);
  check_tensor(k, "kv_append.k", DType::kF32, {n_tokens, n_kv_heads, head_dim});
  check_tensor(v, "kv_append.v", DType::kF32, {n_tokens, n_kv_heads, head_dim});
  check_tensor(k_cache, "kv_append.k_cache", DType::kF32,
               {-1, meta.block_size, n_kv_heads, head_dim});
  check_tensor(v_cache, "kv_append.v_cache", DType::kF32,
               {k_cache.size(0), meta.block_size, n_kv_heads, head_dim});
  const int64_t n_slots = k_cache.size(0) * meta.block_size;
  const int64_t row = n_kv_heads * head_dim;
  for (int64_t t = 0; t < n_tokens; ++t) {
    const int64_t slot = kv_slot(meta, meta.token_seq.i32()[t], meta.positions.i32()[t]);
    SY_CHECK(slot >= 0 && slot < n_slots, "kv_append: slot ", slot, " outside the cache of ",
             n_slots, " slots");
    std::memcpy(k_cache.f32() + slot * row, k.f32() + t * row, static_cast<size_t>(row) * 4);
    std::memcpy(v_cache.f32() + slot * row, v.f32() + t * row, static_cast<size_t>(row) * 4);
  }
}

}  // namespace sy::cpu
