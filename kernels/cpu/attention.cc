// Causal grouped-query attention over the paged KV cache, as Hugging Face's eager attention:
// scores = q·k / sqrt(head_dim) over positions [max(0, p - window + 1), p], softmax in fp32,
// weighted sum of v. Query head h reads KV head h / (n_heads / n_kv_heads).
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"
#include "kernels/cpu/threads.h"

namespace sy::cpu {
namespace {

// q · k over head_dim in 8 interleaved partial sums (element d into sum d % 8), added pairwise at
// the end: a fixed order the compiler can keep in one vector register, where a single running
// sum is a chain of dependent adds that it may not reorder.
float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int i = 0; i < 8; ++i) acc[i] += a[d + i] * b[d + i];
  for (int i = 0; d < n; ++d, ++i) acc[i] += a[d] * b[d];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// y += a * x, 8 elements at a time: a fixed inner count over pointers that do not alias, which
// the compiler vectorises at -O2 (each element is computed as before).
void axpy(float* __restrict y, const float* __restrict x, float a, int64_t n) {
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int i = 0; i < 8; ++i) y[d + i] += a * x[d + i];
  for (; d < n; ++d) y[d] += a * x[d];
}

}  // namespace

void attention(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache, const AttentionMeta& meta) {
  const int64_t n_tokens = q.size(0);
  const int64_t n_heads = q.size(1);
  const int64_t head_dim = q.size(2);
  check_tensor(q, "attention.q", DType::kF32, {n_tokens, n_heads, head_dim});
  check_tensor(out, "attention.out", DType::kF32, {n_tokens, n_heads, head_dim});
  check_tensor(k_cache, "attention.k_cache", DType::kF32, {-1, meta.block_size, -1, head_dim});
  check_tensor(v_cache, "attention.v_cache", DType::kF32,
               {k_cache.size(0), meta.block_size, k_cache.size(2), head_dim});
  check_tensor(meta.positions, "attention.positions", DType::kI32, {n_tokens});
  check_tensor(meta.token_seq, "attention.token_seq", DType::kI32, {n_tokens});
  const int64_t n_kv_heads = k_cache.size(2);
  SY_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "attention: ", n_heads,
           " query heads over ", n_kv_heads, " KV heads");
  const int64_t group = n_heads / n_kv_heads;
  const int64_t n_slots = k_cache.size(0) * meta.block_size;
  const int64_t row = n_kv_heads * head_dim;
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  // One (token, head) pair per item, split over the pool's threads (kernels/cpu/threads.h);
  // each pair's arithmetic is the same on any thread. Scratch is per thread and reused across
  // calls: it grows to the longest context seen, then never allocates.
  parallel_for(n_tokens * n_heads, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> scores;
    thread_local std::vector<int64_t> slots;
    int64_t slots_of = -1;  // the token whose slots are in `slots`
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / n_heads, h = i % n_heads;
      const int64_t seq = meta.token_seq.i32()[t];
      const int64_t pos = meta.positions.i32()[t];
      const int64_t lo =
          meta.sliding_window > 0 ? std::max<int64_t>(0, pos - meta.sliding_window + 1) : 0;
      const int64_t n_ctx = pos - lo + 1;
      if (static_cast<int64_t>(scores.size()) < n_ctx) {
        scores.resize(static_cast<size_t>(n_ctx));
        slots.resize(static_cast<size_t>(n_ctx));
        slots_of = -1;
      }
      if (slots_of != t) {
        for (int64_t j = 0; j < n_ctx; ++j) {
          slots[j] = kv_slot(meta, seq, lo + j);
          SY_CHECK(slots[j] >= 0 && slots[j] < n_slots, "attention: slot ", slots[j],
                   " outside the cache");
        }
        slots_of = t;
      }
      const float* qh = q.f32() + (t * n_heads + h) * head_dim;
      const int64_t g = h / group;
      float max_score = -INFINITY;
      for (int64_t j = 0; j < n_ctx; ++j) {
        const float* kh = k_cache.f32() + slots[j] * row + g * head_dim;
        const float s = dot(qh, kh, head_dim) * scale;
        scores[j] = s;
        max_score = std::max(max_score, s);
      }
      float sum = 0.f;
      for (int64_t j = 0; j < n_ctx; ++j) {
        scores[j] = std::exp(scores[j] - max_score);
        sum += scores[j];
      }
      float* oh = out.f32() + (t * n_heads + h) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) oh[d] = 0.f;
      for (int64_t j = 0; j < n_ctx; ++j) {
        const float p = scores[j] / sum;
        const float* vh = v_cache.f32() + slots[j] * row + g * head_dim;
        axpy(oh, vh, p, head_dim);
      }
    }
  });
}

}  // namespace sy::cpu
