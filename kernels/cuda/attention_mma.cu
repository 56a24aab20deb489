// Paged attention for prefill on tensor cores (sm_80+, BF16 cache, head_dim 64 or 128): the
// query-tiled (flash) form of kernels/cuda/attention.cu, whose CPU twin is
// kernels/cpu/attention.cc.
//
// A block takes a tile of `tile_tokens` consecutive step tokens and the query heads of one KV
// head (up to 8 per block, as attention.cu): 64 query rows, row = token * heads_per_block + head,
// 16 rows per warp. The tile's tokens of the sequence of its first token are its own (the rest,
// at a boundary between sequences, are attention.cu's). The block walks the union of its rows'
// key ranges (causal, sliding window) in tiles of 64 positions:
//   1. the tile's cache slots from the block table; K rows into shared memory as they are, V
//      rows transposed (both bf16, rows padded by 8 elements against bank conflicts);
//   2. S = Q K^T with mma.sync m16n8k16 (kernels/cuda/mma.cuh), each warp 16 rows x 64 keys; Q
//      sits in registers as two bf16 halves (hi + lo), so S is as precise as with fp32 queries;
//   3. masking and scale, then the online softmax per row in fp32 (running max and sum; the four
//      lanes holding a row reduce with shuffles), the output rescaled;
//   4. O += P V with mma.sync, P also split hi + lo, straight from S's registers (the
//      accumulator layout of S is the A-operand layout of P).
// Each lane holds rows g and g + 8 of its warp's 16 (g = lane / 4) and, of every 8 columns, the
// two at 2 * (lane % 4): o[n] covers output dims 8n .. 8n + 7.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/mma.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

constexpr int kRows = 64;  // query rows per block
constexpr int kKeys = 64;  // key positions per tile
constexpr int kThreads = 128;
constexpr int kMaxGroup = 8;  // query heads per block, as attention.cu

struct MmaShape {
  int64_t n_tokens, n_seqs, max_blocks, block_size, n_blocks;
  int64_t n_heads, n_kv_heads, window, group, sub_blocks, tile_tokens;
  float scale;
};

// The block's share of the step: its KV head, its query heads and its tile of tokens.
struct MmaBlock {
  int64_t g;             // the KV head
  int64_t h0;            // the first query head
  int nh;                // query heads of the block (<= kMaxGroup)
  int hpb;               // row stride: query heads per token row of the tile
  int64_t t0;            // the tile's first token
  int nt;                // tokens in the tile
  int32_t seq0;          // the sequence of its first token
  bool seq_ok;           // seq0 is a row of the block table
  const int32_t* table;  // seq0's block table (row 0 when !seq_ok)
};

__device__ __forceinline__ MmaBlock mma_block(const int32_t* token_seq, const int32_t* block_tables,
                                              const MmaShape& s) {
  MmaBlock b;
  b.g = blockIdx.x / s.sub_blocks;
  b.h0 = b.g * s.group + (blockIdx.x % s.sub_blocks) * kMaxGroup;
  const int64_t nh_left = (b.g + 1) * s.group - b.h0;
  b.nh = static_cast<int>(nh_left < kMaxGroup ? nh_left : kMaxGroup);
  b.hpb = static_cast<int>(s.group < kMaxGroup ? s.group : kMaxGroup);
  b.t0 = blockIdx.y * s.tile_tokens;
  const int64_t nt_left = s.n_tokens - b.t0;
  b.nt = static_cast<int>(nt_left < s.tile_tokens ? nt_left : s.tile_tokens);
  b.seq0 = token_seq[b.t0];
  b.seq_ok = b.seq0 >= 0 && b.seq0 < s.n_seqs;
  b.table = block_tables + (b.seq_ok ? b.seq0 : 0) * s.max_blocks;
  return b;
}

// The tile's tokens: which are ours, their positions and windows (tok_pos, tok_lo), and the keys
// they span (key_range, written by thread 0 after the barrier; the caller syncs before reading).
__device__ __forceinline__ void mark_tile_tokens(int32_t* tok_pos, int32_t* tok_lo,
                                                 int32_t* key_range, const MmaBlock& b,
                                                 const int32_t* positions, const int32_t* token_seq,
                                                 const MmaShape& s) {
  const int tid = threadIdx.x;
  if (tid < kRows) {
    int32_t pos = -1, lo = 0x7fffffff;
    if (tid < b.nt && token_seq[b.t0 + tid] == b.seq0) {
      // -2: ours, with no key to see (also a negative position, which -1 would disown)
      pos = b.seq_ok && positions[b.t0 + tid] >= 0 ? positions[b.t0 + tid] : -2;
      if (pos >= 0) lo = s.window > 0 && pos - s.window + 1 > 0 ? pos - s.window + 1 : 0;
    }
    tok_pos[tid] = pos;
    tok_lo[tid] = lo;
  }
  __syncthreads();
  if (tid == 0) {
    int32_t kmin = 0x7fffffff, kmax = -1;
    for (int i = 0; i < b.nt; ++i) {
      if (tok_pos[i] < 0) continue;
      kmin = tok_lo[i] < kmin ? tok_lo[i] : kmin;
      kmax = tok_pos[i] > kmax ? tok_pos[i] : kmax;
    }
    key_range[0] = kmin;
    key_range[1] = kmax;
  }
}

// This lane's two rows (g and g + 8 of its warp's 16): (token, head) of the tile, whether we
// answer for them, their visible key ranges.
struct LaneRows {
  int64_t token[2];
  int head[2];
  bool ok[2];
  int32_t pos[2], lo[2];
};

__device__ __forceinline__ LaneRows lane_rows(const MmaBlock& b, const int32_t* tok_pos,
                                              const int32_t* tok_lo, int warp, int lg) {
  LaneRows rows;
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + lg + 8 * i;
    const int tok = r / b.hpb, hh = r % b.hpb;
    rows.token[i] = b.t0 + tok;
    rows.head[i] = hh;
    rows.ok[i] = tok < b.nt && hh < b.nh && tok_pos[tok] != -1;
    rows.pos[i] = rows.ok[i] ? tok_pos[tok] : -1;
    rows.lo[i] = rows.ok[i] ? tok_lo[tok] : 0x7fffffff;
  }
  return rows;
}

// Q of the two rows as A fragments, split into bf16 hi + lo.
template <int HD>
__device__ __forceinline__ void load_q_split(uint32_t (&qhi)[HD / 16][4],
                                             uint32_t (&qlo)[HD / 16][4], const float* q,
                                             const LaneRows& rows, const MmaBlock& b,
                                             const MmaShape& s, int lt) {
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int which = i % 2;
      const int col = 16 * kk + 2 * lt + 8 * (i / 2);
      float x0 = 0.f, x1 = 0.f;
      if (rows.ok[which]) {
        const float* qr = q + (rows.token[which] * s.n_heads + b.h0 + rows.head[which]) * HD;
        x0 = qr[col];
        x1 = qr[col + 1];
      }
      split_bf16(x0, x1, qhi[kk][i], qlo[kk][i]);
    }
  }
}

// Stage 1: the slots of positions base .. base + kKeys - 1, then the K and V tiles (zeros where
// there is no readable position); both ready for every thread on return.
template <int HD>
__device__ __forceinline__ void load_kv_tile(uint16_t (&ks)[kKeys][HD + 8],
                                             uint16_t (&vt)[HD][kKeys + 8], int64_t* slots,
                                             int64_t base, int32_t kmax, const uint16_t* k_cache,
                                             const uint16_t* v_cache, const MmaBlock& b,
                                             const MmaShape& s) {
  const int tid = threadIdx.x;
  if (tid < kKeys) {
    const int64_t p = base + tid;
    slots[tid] = p <= kmax ? paged_slot(b.table, p, s.block_size, s.max_blocks, s.n_blocks) : -1;
  }
  __syncthreads();
  // Item v is a 16-byte piece of K and one of V. K's go row by row (the lanes of a key read
  // its row's pieces in order); V's, which go in transposed, key by key, so that consecutive
  // lanes take consecutive keys of one 8-dim piece and each 2-byte store of a warp covers 64
  // consecutive bytes of one vt row (with K's order, stores 8 dims apart, 288 words, all hit
  // one bank).
  const int64_t row_elems = s.n_kv_heads * HD;
  for (int v = tid; v < kKeys * (HD / 8); v += kThreads) {
    const int key = v / (HD / 8), c = (v % (HD / 8)) * 8;
    const int vkey = v % kKeys, vc = (v / kKeys) * 8;
    const int64_t slot = slots[key], vslot = slots[vkey];
    uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
    if (slot >= 0) kv = load_u128(k_cache + slot * row_elems + b.g * HD + c);
    if (vslot >= 0) vv = load_u128(v_cache + vslot * row_elems + b.g * HD + vc);
    store_u128(&ks[key][c], kv);
    const uint32_t w[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      vt[vc + 2 * j][vkey] = static_cast<uint16_t>(w[j] & 0xffffu);
      vt[vc + 2 * j + 1][vkey] = static_cast<uint16_t>(w[j] >> 16);
    }
  }
  __syncthreads();
}

// Stage 2: S = Q K^T, 8 column tiles of 8 keys.
template <int HD>
__device__ __forceinline__ void score_tile(float (&sc)[kKeys / 8][4],
                                           const uint16_t (&ks)[kKeys][HD + 8],
                                           const uint32_t (&qhi)[HD / 16][4],
                                           const uint32_t (&qlo)[HD / 16][4], int lg, int lt) {
#pragma unroll
  for (int j = 0; j < kKeys / 8; ++j) {
    sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      const uint32_t b[2] = {load_u32(&ks[8 * j + lg][16 * kk + 2 * lt]),
                             load_u32(&ks[8 * j + lg][16 * kk + 8 + 2 * lt])};
      mma_bf16_16816(sc[j], qhi[kk], b);
      mma_bf16_16816(sc[j], qlo[kk], b);
    }
  }
}

// Stage 3: mask and scale S, then the online softmax of each row: m and l (the running max and
// sum of the lane's two rows) updated, S turned into P, the output o rescaled.
template <int HD>
__device__ __forceinline__ void online_softmax(float (&sc)[kKeys / 8][4], float (&m)[2],
                                               float (&l)[2], float (&o)[HD / 8][4],
                                               const LaneRows& rows, const int64_t* slots,
                                               int64_t base, float scale, int lt) {
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int which = i / 2;
      const int key = 8 * j + 2 * lt + i % 2;
      const int64_t p = base + key;
      const bool ok = p >= rows.lo[which] && p <= rows.pos[which] && slots[key] >= 0;
      sc[j][i] = ok ? sc[j][i] * scale : -INFINITY;
      tile_max[which] = fmaxf(tile_max[which], sc[j][i]);
    }
  }
  float corr[2];
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    float mx = tile_max[which];
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(m[which], mx);
    corr[which] = m_new == -INFINITY ? 1.f : expf(m[which] - m_new);
    m[which] = m_new;
  }
  float tile_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int which = i / 2;
      const float p = sc[j][i] == -INFINITY ? 0.f : expf(sc[j][i] - m[which]);
      sc[j][i] = p;
      tile_sum[which] += p;
    }
  }
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    float sum = tile_sum[which];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    l[which] = l[which] * corr[which] + sum;
  }
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) {
    o[n][0] *= corr[0];
    o[n][1] *= corr[0];
    o[n][2] *= corr[1];
    o[n][3] *= corr[1];
  }
}

// Stage 4: O += P V, 4 steps of 16 keys; P's A fragment is two column tiles of S.
template <int HD>
__device__ __forceinline__ void accumulate_pv(float (&o)[HD / 8][4],
                                              const float (&sc)[kKeys / 8][4],
                                              const uint16_t (&vt)[HD][kKeys + 8], int lg, int lt) {
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    uint32_t phi[4], plo[4];
    split_bf16(sc[2 * kk][0], sc[2 * kk][1], phi[0], plo[0]);
    split_bf16(sc[2 * kk][2], sc[2 * kk][3], phi[1], plo[1]);
    split_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1], phi[2], plo[2]);
    split_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3], phi[3], plo[3]);
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      const uint32_t b[2] = {load_u32(&vt[8 * n + lg][16 * kk + 2 * lt]),
                             load_u32(&vt[8 * n + lg][16 * kk + 8 + 2 * lt])};
      mma_bf16_16816(o[n], phi, b);
      mma_bf16_16816(o[n], plo, b);
    }
  }
}

// The lane's rows of the output, normalised by their sums.
template <int HD, typename TO>
__device__ __forceinline__ void store_rows(TO* out, const float (&o)[HD / 8][4],
                                           const float (&l)[2], const LaneRows& rows,
                                           const MmaBlock& b, const MmaShape& s, int lt) {
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    if (!rows.ok[which]) continue;
    const float inv = l[which] > 0.f ? 1.f / l[which] : 0.f;
    TO* orow = out + (rows.token[which] * s.n_heads + b.h0 + rows.head[which]) * HD;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      store(orow, 8 * n + 2 * lt, o[n][2 * which] * inv);
      store(orow, 8 * n + 2 * lt + 1, o[n][2 * which + 1] * inv);
    }
  }
}

template <int HD, typename TO>
__global__ void __launch_bounds__(kThreads)
    attention_mma_kernel(TO* out, const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                         const int32_t* positions, const int32_t* token_seq,
                         const int32_t* block_tables, MmaShape s) {
  __shared__ __align__(16) uint16_t ks[kKeys][HD + 8];  // bf16 bits, [key][dim]
  __shared__ __align__(16) uint16_t vt[HD][kKeys + 8];  // bf16 bits, [dim][key]
  __shared__ int64_t slots[kKeys];
  __shared__ int32_t tok_pos[kRows];  // per token of the tile: its position, -1 if not ours
  __shared__ int32_t tok_lo[kRows];   // ... and its first visible position
  __shared__ int32_t key_range[2];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lg = lane / 4, lt = lane % 4;
  const MmaBlock b = mma_block(token_seq, block_tables, s);
  mark_tile_tokens(tok_pos, tok_lo, key_range, b, positions, token_seq, s);
  const LaneRows rows = lane_rows(b, tok_pos, tok_lo, warp, lg);
  uint32_t qhi[HD / 16][4], qlo[HD / 16][4];
  load_q_split<HD>(qhi, qlo, q, rows, b, s, lt);

  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};
  float o[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  __syncthreads();  // key_range is ready
  const int32_t kmin = key_range[0], kmax = key_range[1];

  for (int64_t base = kmin; base <= kmax; base += kKeys) {
    load_kv_tile<HD>(ks, vt, slots, base, kmax, k_cache, v_cache, b, s);
    float sc[kKeys / 8][4];
    score_tile<HD>(sc, ks, qhi, qlo, lg, lt);
    online_softmax<HD>(sc, m, l, o, rows, slots, base, s.scale, lt);
    accumulate_pv<HD>(o, sc, vt, lg, lt);
    __syncthreads();  // the next tile overwrites slots, ks and vt
  }
  store_rows<HD>(out, o, l, rows, b, s, lt);
}

}  // namespace

bool attention_mma_supported(int64_t head_dim, bool bf16_cache, int sm_major) {
  return bf16_cache && sm_major >= 8 && (head_dim == 64 || head_dim == 128);
}

int64_t attention_mma_tile_tokens(int64_t n_heads, int64_t n_kv_heads) {
  const int64_t group = n_kv_heads > 0 ? n_heads / n_kv_heads : 1;
  return kRows / std::min<int64_t>(group, kMaxGroup);
}

void attention_mma(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache, const AttentionMeta& meta,
                   int64_t tile_tokens, int64_t sub_blocks, cudaStream_t stream) {
  const int64_t n_tokens = q.size(0);
  const int64_t n_heads = q.size(1);
  const int64_t head_dim = q.size(2);
  const int64_t n_kv_heads = k_cache.size(2);
  SY_CHECK(k_cache.dtype == DType::kBF16 && (head_dim == 64 || head_dim == 128),
           "attention_mma: BF16 cache and head_dim 64 or 128, got ", dtype_name(k_cache.dtype),
           " and ", head_dim);
  SY_CHECK(tile_tokens == attention_mma_tile_tokens(n_heads, n_kv_heads),
           "attention_mma: a tile of ", tile_tokens, " tokens not planned for ", n_heads,
           " heads over ", n_kv_heads);
  SY_CHECK(reinterpret_cast<uintptr_t>(k_cache.data) % 16 == 0 &&
               reinterpret_cast<uintptr_t>(v_cache.data) % 16 == 0,
           "attention_mma: caches must be 16-byte aligned");
  if (n_tokens == 0) return;
  const int64_t n_tiles = (n_tokens + tile_tokens - 1) / tile_tokens;
  SY_CHECK(n_tiles <= 65535, "attention_mma: ", n_tokens, " tokens in one launch");
  MmaShape s;
  s.n_tokens = n_tokens;
  s.n_seqs = meta.block_tables.size(0);
  s.max_blocks = meta.block_tables.size(1);
  s.block_size = meta.block_size;
  s.n_blocks = k_cache.size(0);
  s.n_heads = n_heads;
  s.n_kv_heads = n_kv_heads;
  s.window = meta.sliding_window;
  s.group = n_heads / n_kv_heads;
  s.sub_blocks = sub_blocks;
  s.tile_tokens = tile_tokens;
  s.scale = 1.f / sqrtf(static_cast<float>(head_dim));
  const dim3 grid(static_cast<unsigned>(n_kv_heads * sub_blocks), static_cast<unsigned>(n_tiles));
  const auto* kc = static_cast<const uint16_t*>(k_cache.data);
  const auto* vc = static_cast<const uint16_t*>(v_cache.data);
  with_float_type(out.dtype, "attention_mma.out", [&](auto out_tag) {
    using TO = typename decltype(out_tag)::type;
    if (head_dim == 128)
      attention_mma_kernel<128, TO><<<grid, kThreads, 0, stream>>>(
          static_cast<TO*>(out.data), q.f32(), kc, vc, meta.positions.i32(), meta.token_seq.i32(),
          meta.block_tables.i32(), s);
    else
      attention_mma_kernel<64, TO><<<grid, kThreads, 0, stream>>>(
          static_cast<TO*>(out.data), q.f32(), kc, vc, meta.positions.i32(), meta.token_seq.i32(),
          meta.block_tables.i32(), s);
  });
  check_launch("attention_mma");
}

}  // namespace sy::cuda
