// Causal grouped-query attention over the paged KV cache on the GPU, for prefill chunks and
// decode tokens alike. CPU twin: kernels/cpu/attention.cc (same window, same GQA mapping).
//
// One block per (KV head, token, context split) serves all the query heads that share the KV
// head (up to kMaxGroup of them; larger groups take several blocks), so each key and value row
// is read once per block rather than once per query head. The block walks its part of the
// context in tiles of kTile positions with an online softmax (running max and sum per head, in
// fp32):
//   1. the tile's cache slots are looked up in the block table;
//   2. groups of kLanesPerKey lanes score one position each against every head of the group,
//      reading the key row together (coalesced) and reducing with warp shuffles;
//   3. one warp per head takes the tile's max and sum and rescales the running state;
//   4. each thread accumulates its output dimensions, for every head, over the tile's values.
// Scores, softmax and accumulation are fp32 whatever the cache dtype.
//
// Prefill on tensor cores: when some sequence has several tokens in the step, the BF16 cache's
// query tiles go to attention_mma.cu (plan.tile_tokens), and this kernel skips their tokens.
//
// Flash-decoding: when the step has too few (KV head, token) pairs to fill the GPU (decode at
// small batch), the context is cut into n_splits ranges of split_len positions, each its own
// block. Each writes its normalised partial output with its max and sum to a workspace, and a
// second kernel merges a token's partials (weights sum_z * exp(max_z - max)). The plan depends
// only on shapes (tokens, heads, block-table capacity, window), never on the positions, so a
// recorded decode step replays with the same grid.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

constexpr int kThreads = 128;     // threads per block
constexpr int kTile = 128;        // positions per tile
constexpr int kMaxHeadDim = 256;  // two output dimensions per thread
constexpr int kMaxGroup = 8;      // query heads per block
constexpr int kLanesPerKey = 8;   // lanes scoring one position together
constexpr int kKeysAtOnce = kThreads / kLanesPerKey;
constexpr int kMinSplitLen = 2 * kTile;  // a split shorter than this costs more than it gains
constexpr int64_t kMaxSplits = 64;

struct Shape {
  int64_t n_seqs, max_blocks, block_size, n_blocks;  // the paged cache
  int64_t n_heads, n_kv_heads, head_dim, window;
  int64_t group;       // query heads per KV head
  int64_t sub_blocks;  // blocks per (KV head, token): ceil(group / kMaxGroup)
  int64_t n_splits, split_len;
  int64_t tile_tokens;  // > 0: skip the tokens attention_mma takes
  float scale;
};

// A block's shared state: its heads' queries, a tile's scores (then softmax numerators) and
// cache slots, and the running softmax state per head.
struct Smem {
  float qs[kMaxGroup][kMaxHeadDim];
  float probs[kMaxGroup][kTile];
  int64_t slots[kTile];
  float run_max[kMaxGroup];
  float run_sum[kMaxGroup];
  float correction[kMaxGroup];
};

// 1. The tile's slots: -1 for positions past the range or without a readable block.
__device__ __forceinline__ void lookup_slots(Smem& sm, const int32_t* table, int64_t lo,
                                             int64_t base, int64_t n_tile, const Shape& s) {
  for (int i = threadIdx.x; i < kTile; i += blockDim.x) {
    int64_t slot = -1;
    if (i < n_tile) {
      const int64_t p = lo + base + i;
      const int64_t logical = p / s.block_size;
      const int64_t block = logical < s.max_blocks ? table[logical] : -1;
      if (block >= 0 && block < s.n_blocks) slot = block * s.block_size + p % s.block_size;
    }
    sm.slots[i] = slot;
  }
}

// 2. Scores of the tile's positions against the nh heads of KV head g. Every thread runs the
// same iterations, so the shuffles see full warps.
template <typename TC>
__device__ __forceinline__ void score_tile(Smem& sm, const TC* k_cache, int64_t g, int nh,
                                           const Shape& s) {
  const int key = threadIdx.x / kLanesPerKey;
  const int lane_in_key = threadIdx.x % kLanesPerKey;
  const int64_t head_dim = s.head_dim;
  for (int i = key; i < kTile; i += kKeysAtOnce) {
    const int64_t slot = sm.slots[i];
    float dot[kMaxGroup] = {};
    if (slot >= 0) {
      const TC* kh = k_cache + slot * s.n_kv_heads * head_dim + g * head_dim;
      for (int64_t d = lane_in_key; d < head_dim; d += kLanesPerKey) {
        const float kd = load(kh, d);
#pragma unroll
        for (int hh = 0; hh < kMaxGroup; ++hh)
          if (hh < nh) dot[hh] += sm.qs[hh][d] * kd;
      }
    }
#pragma unroll
    for (int hh = 0; hh < kMaxGroup; ++hh) {
      if (hh >= nh) break;
      float v = dot[hh];
      for (int offset = kLanesPerKey / 2; offset > 0; offset /= 2)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane_in_key == 0) sm.probs[hh][i] = slot >= 0 ? v * s.scale : -INFINITY;
    }
  }
}

// 3. Softmax over the tile, one warp per head. A tile with no readable position (never for a
// valid step) leaves the state unchanged.
__device__ __forceinline__ void softmax_tile(Smem& sm, int nh) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int hh = warp; hh < nh; hh += kThreads / 32) {
    float tile_max = -INFINITY;
    for (int i = lane; i < kTile; i += 32) tile_max = fmaxf(tile_max, sm.probs[hh][i]);
    tile_max = warp_reduce(tile_max, MaxOp{});
    const float old_max = sm.run_max[hh];
    const float new_max = fmaxf(old_max, tile_max);
    float tile_sum = 0.f;
    for (int i = lane; i < kTile; i += 32) {
      const float sc = sm.probs[hh][i];
      const float p = sc == -INFINITY ? 0.f : expf(sc - new_max);
      sm.probs[hh][i] = p;
      tile_sum += p;
    }
    tile_sum = warp_sum(tile_sum);
    if (lane == 0) {
      const float c = old_max == -INFINITY ? 0.f : expf(old_max - new_max);
      sm.correction[hh] = c;
      sm.run_sum[hh] = sm.run_sum[hh] * c + tile_sum;
      sm.run_max[hh] = new_max;
    }
  }
}

// 4. The running outputs (the thread's dimensions d0 and d1 of each head) rescaled, plus the tile's
// values.
template <typename TC>
__device__ __forceinline__ void accumulate_values(float (&acc)[kMaxGroup][2], const Smem& sm,
                                                  const TC* v_cache, int64_t g, int nh,
                                                  int64_t n_tile, int64_t d0, int64_t d1,
                                                  const Shape& s) {
  const int64_t head_dim = s.head_dim;
#pragma unroll
  for (int hh = 0; hh < kMaxGroup; ++hh) {
    if (hh >= nh) break;
    acc[hh][0] *= sm.correction[hh];
    acc[hh][1] *= sm.correction[hh];
  }
  for (int64_t i = 0; i < n_tile; ++i) {
    const int64_t slot = sm.slots[i];
    if (slot < 0) continue;
    const TC* vh = v_cache + slot * s.n_kv_heads * head_dim + g * head_dim;
    const float v0 = d0 < head_dim ? load(vh, d0) : 0.f;
    const float v1 = d1 < head_dim ? load(vh, d1) : 0.f;
#pragma unroll
    for (int hh = 0; hh < kMaxGroup; ++hh) {
      if (hh >= nh) break;
      acc[hh][0] += sm.probs[hh][i] * v0;
      acc[hh][1] += sm.probs[hh][i] * v1;
    }
  }
}

// The block's normalised outputs: to `out`, or with several splits to its partial and its max
// and sum.
template <typename TO>
__device__ __forceinline__ void write_output(TO* out, float* part_out, float* part_ml,
                                             const float (&acc)[kMaxGroup][2], const Smem& sm,
                                             int64_t t, int64_t h0, int nh, int64_t z, int64_t d0,
                                             int64_t d1, const Shape& s) {
  const int64_t head_dim = s.head_dim;
#pragma unroll
  for (int hh = 0; hh < kMaxGroup; ++hh) {
    if (hh >= nh) break;
    const float sum = sm.run_sum[hh];
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int64_t h = h0 + hh;
    if (s.n_splits == 1) {
      TO* oh = out + (t * s.n_heads + h) * head_dim;
      if (d0 < head_dim) store(oh, d0, acc[hh][0] * inv);
      if (d1 < head_dim) store(oh, d1, acc[hh][1] * inv);
    } else {
      const int64_t part = (t * s.n_heads + h) * s.n_splits + z;
      float* po = part_out + part * head_dim;
      if (d0 < head_dim) po[d0] = acc[hh][0] * inv;
      if (d1 < head_dim) po[d1] = acc[hh][1] * inv;
      if (threadIdx.x == 0) {
        part_ml[2 * part] = sm.run_max[hh];
        part_ml[2 * part + 1] = sum;
      }
    }
  }
}

template <typename TC, typename TO>
__global__ void attention_kernel(TO* out, float* part_out, float* part_ml, const float* q,
                                 const TC* k_cache, const TC* v_cache, const int32_t* positions,
                                 const int32_t* token_seq, const int32_t* block_tables, Shape s) {
  __shared__ Smem sm;
  const int64_t t = blockIdx.y;
  if (s.tile_tokens > 0 && token_seq[t] == token_seq[t / s.tile_tokens * s.tile_tokens]) return;
  const int64_t g = blockIdx.x / s.sub_blocks;  // the KV head
  const int64_t h0 = g * s.group + (blockIdx.x % s.sub_blocks) * kMaxGroup;
  const int64_t nh_left = (g + 1) * s.group - h0;
  const int nh = static_cast<int>(nh_left < kMaxGroup ? nh_left : kMaxGroup);  // block-uniform
  const int64_t z = blockIdx.z;
  const int64_t head_dim = s.head_dim;
  for (int64_t i = threadIdx.x; i < nh * head_dim; i += blockDim.x)
    sm.qs[i / head_dim][i % head_dim] = q[(t * s.n_heads + h0) * head_dim + i];
  if (threadIdx.x < kMaxGroup) {
    sm.run_max[threadIdx.x] = -INFINITY;
    sm.run_sum[threadIdx.x] = 0.f;
  }

  const int64_t pos = positions[t];
  const int64_t lo = s.window > 0 && pos - s.window + 1 > 0 ? pos - s.window + 1 : 0;
  const int64_t seq = token_seq[t];
  // A sequence outside the table (the host validates steps; never in a valid one) reads nothing.
  const bool seq_ok = seq >= 0 && seq < s.n_seqs;
  const int64_t n_ctx = seq_ok ? pos - lo + 1 : 0;
  const int32_t* table = block_tables + (seq_ok ? seq : 0) * s.max_blocks;
  const int64_t begin = z * s.split_len;
  const int64_t end = n_ctx < begin + s.split_len ? n_ctx : begin + s.split_len;
  const int64_t d0 = threadIdx.x;  // the thread's two output dimensions
  const int64_t d1 = threadIdx.x + kThreads;
  float acc[kMaxGroup][2] = {};
  __syncthreads();  // qs and the running state are ready

  for (int64_t base = begin; base < end; base += kTile) {
    const int64_t n_tile = end - base < kTile ? end - base : kTile;
    lookup_slots(sm, table, lo, base, n_tile, s);
    __syncthreads();
    score_tile(sm, k_cache, g, nh, s);
    __syncthreads();
    softmax_tile(sm, nh);
    __syncthreads();
    accumulate_values(acc, sm, v_cache, g, nh, n_tile, d0, d1, s);
    __syncthreads();  // the next tile overwrites slots, probs and correction
  }
  write_output(out, part_out, part_ml, acc, sm, t, h0, nh, z, d0, d1, s);
}

// Merges the n_splits partials of one (query head, token): out = sum_z w_z o_z / sum_z w_z with
// w_z = sum_z * exp(max_z - max over z). Splits past the context (sum 0) weigh nothing.
template <typename TO>
__global__ void attention_merge_kernel(TO* out, const float* part_out, const float* part_ml,
                                       int64_t n_heads, int64_t head_dim, int64_t n_splits) {
  const int64_t h = blockIdx.x;
  const int64_t t = blockIdx.y;
  const int64_t first = (t * n_heads + h) * n_splits;
  float max_all = -INFINITY;
  for (int64_t z = 0; z < n_splits; ++z)
    if (part_ml[2 * (first + z) + 1] > 0.f) max_all = fmaxf(max_all, part_ml[2 * (first + z)]);
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float num = 0.f;
    float den = 0.f;
    for (int64_t z = 0; z < n_splits; ++z) {
      const float sum = part_ml[2 * (first + z) + 1];
      if (!(sum > 0.f)) continue;
      const float w = sum * expf(part_ml[2 * (first + z)] - max_all);
      num += w * part_out[(first + z) * head_dim + d];
      den += w;
    }
    store(out + (t * n_heads + h) * head_dim, d, den > 0.f ? num / den : 0.f);
  }
}

}  // namespace

AttentionPlan plan_attention(int64_t n_tokens, int64_t n_seqs, int64_t n_heads, int64_t n_kv_heads,
                             int64_t head_dim, int64_t capacity, int64_t window, bool bf16_cache,
                             int sm_count, int sm_major) {
  AttentionPlan p;
  const int64_t group = n_kv_heads > 0 ? n_heads / n_kv_heads : 1;
  p.sub_blocks = (group + kMaxGroup - 1) / kMaxGroup;
  const int64_t max_ctx = window > 0 && window < capacity ? window : capacity;
  // A sequence with several tokens in the step (a prefill chunk): query tiles on tensor cores.
  if (n_tokens > n_seqs && attention_mma_supported(head_dim, bf16_cache, sm_major)) {
    p.tile_tokens = attention_mma_tile_tokens(n_heads, n_kv_heads);
    p.split_len = max_ctx > 0 ? max_ctx : 1;
    return p;
  }
  const int64_t blocks = n_tokens * n_kv_heads * p.sub_blocks;
  const int64_t target = 2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  p.split_len = max_ctx > 0 ? max_ctx : 1;
  if (blocks >= target || max_ctx <= kMinSplitLen) return p;
  int64_t want = (target + blocks - 1) / blocks;
  want = std::min({want, (max_ctx + kMinSplitLen - 1) / kMinSplitLen, kMaxSplits});
  if (want <= 1) return p;
  // Whole tiles per split; the last split may be shorter.
  const int64_t per = (max_ctx + want - 1) / want;
  p.split_len = (per + kTile - 1) / kTile * kTile;
  p.n_splits = (max_ctx + p.split_len - 1) / p.split_len;
  return p;
}

int64_t attention_workspace_floats(const AttentionPlan& plan, int64_t n_tokens, int64_t n_heads,
                                   int64_t head_dim) {
  return plan.n_splits > 1 ? n_tokens * n_heads * plan.n_splits * (head_dim + 2) : 0;
}

void attention(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache, const AttentionMeta& meta,
               const AttentionPlan& plan, float* workspace, int64_t workspace_floats,
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
  const int64_t group = n_heads / n_kv_heads;
  SY_CHECK(plan.sub_blocks == (group + kMaxGroup - 1) / kMaxGroup && plan.n_splits >= 1 &&
               plan.n_splits <= kMaxSplits && plan.split_len >= 1 &&
               !(plan.tile_tokens > 0 && plan.n_splits > 1),
           "attention: a launch plan (", plan.sub_blocks, " blocks per head group, ", plan.n_splits,
           " splits of ", plan.split_len, ") not made for ", n_heads, " heads over ", n_kv_heads,
           " KV heads");
  const int64_t need = attention_workspace_floats(plan, n_tokens, n_heads, head_dim);
  SY_CHECK(need <= workspace_floats && (need == 0 || workspace != nullptr),
           "attention: workspace of ", workspace_floats, " floats, the plan needs ", need);
  if (n_tokens == 0) return;
  Shape s;
  s.n_seqs = meta.block_tables.size(0);
  s.max_blocks = meta.block_tables.size(1);
  s.block_size = meta.block_size;
  s.n_blocks = k_cache.size(0);
  s.n_heads = n_heads;
  s.n_kv_heads = n_kv_heads;
  s.head_dim = head_dim;
  s.window = meta.sliding_window;
  s.group = group;
  s.sub_blocks = plan.sub_blocks;
  s.n_splits = plan.n_splits;
  s.split_len = plan.split_len;
  s.tile_tokens = plan.tile_tokens;
  s.scale = 1.f / sqrtf(static_cast<float>(head_dim));
  if (plan.tile_tokens > 0)
    attention_mma(out, q, k_cache, v_cache, meta, plan.tile_tokens, plan.sub_blocks, stream);
  float* part_out = workspace;
  float* part_ml = need > 0 ? workspace + n_tokens * n_heads * plan.n_splits * head_dim : nullptr;
  const dim3 grid(static_cast<unsigned>(n_kv_heads * plan.sub_blocks),
                  static_cast<unsigned>(n_tokens), static_cast<unsigned>(plan.n_splits));
  with_float_type(k_cache.dtype, "attention.k_cache", [&](auto cache_tag) {
    using TC = typename decltype(cache_tag)::type;
    with_float_type(out.dtype, "attention.out", [&](auto out_tag) {
      using TO = typename decltype(out_tag)::type;
      attention_kernel<TC, TO><<<grid, kThreads, 0, stream>>>(
          static_cast<TO*>(out.data), part_out, part_ml, q.f32(),
          static_cast<const TC*>(k_cache.data), static_cast<const TC*>(v_cache.data),
          meta.positions.i32(), meta.token_seq.i32(), meta.block_tables.i32(), s);
      if (plan.n_splits > 1) {
        const dim3 merge_grid(static_cast<unsigned>(n_heads), static_cast<unsigned>(n_tokens));
        attention_merge_kernel<TO><<<merge_grid, kThreads, 0, stream>>>(
            static_cast<TO*>(out.data), part_out, part_ml, n_heads, head_dim, plan.n_splits);
      }
    });
  });
  check_launch("attention");
}

}  // namespace sy::cuda
