// Sampling on the GPU (Ops::sample), one block per row, with the semantics of the CPU twin
// (kernels/cpu/sample.cc) without sorting the vocabulary. Each token gets a 64-bit key, its score
// (as ordered bits) above its inverted id, so that a larger key means earlier in the twin's order
// (score descending, then id ascending). Every cut of the twin is a prefix of that order, so it
// is a key threshold, found by binary search over the key space with block-wide counts and sums:
//   top-k   the largest T with at least k keys >= T
//   top-p   the largest T whose prefix holds probability >= top_p
//   min-p   tokens of the prefix with probability >= min_p x the top's (a prefix too)
//   draw    the largest key T whose prefix holds more than u x (the kept probability): its token
// Probabilities are fp64 as in the twin; only the order of summation differs, which moves a cut
// only when u or top_p falls within ~1e-15 of a boundary.
//
// A search only ever raises its lower bound, and keys below it never count again. Once at most
// kCompact keys lie at or above the bound, the block copies them and their probabilities into
// shared memory (in a fixed order, so sums stay deterministic) and every later pass whose keys
// all lie above that floor walks the copy instead of the vocabulary: for the usual peaked rows
// most of the ~190 passes touch a few hundred keys, not tens of thousands, and compute no exp.
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops.h"

namespace sy::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kCompact = 2048;  // keys the shared-memory copy holds
using u64 = unsigned long long;

__device__ __forceinline__ u64 key_of(float score, int64_t id) {
  if (score == 0.f) score = 0.f;  // -0 and +0 are one score, ordered by id as in the twin
  uint32_t b = __float_as_uint(score);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<u64>(b) << 32) | static_cast<u64>(0xFFFFFFFFu - static_cast<uint32_t>(id));
}
__device__ __forceinline__ int64_t id_of(u64 key) {
  return static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFu));
}

// The shared memory of a row's block: reduction scratch, and the copy of the keys >= c_floor
// (when compacted) with their probabilities, and the per-thread and per-warp counts that place
// them.
struct SampleSmem {
  u64 ksh[32];
  double dsh[32];
  u64 ck[kCompact];
  double cp[kCompact];
  int32_t counts[kThreads];
  int32_t warp_counts[kThreads / 32];
};

// One thread's view of the block's row: its scores and keys, and the passes over them. The
// state below `top` is block-uniform: every thread makes the same calls in the same order.
struct RowSampler {
  SampleSmem& sm;
  const float* l;
  int64_t vocab;
  float temperature;
  bool greedy;
  u64 top = 0;
  double max_s = 0;
  bool compacted = false;
  u64 c_floor = 0;
  int32_t n_c = 0;
  u64 seen = 0;  // keys the last count or mass looked at

  // NaN ranks last, as -inf (the CPU twin's rule).
  __device__ float score(int64_t i) const {
    const float x = greedy ? l[i] : l[i] / temperature;
    return isnan(x) ? -INFINITY : x;
  }
  __device__ double p(int64_t i) const { return exp(static_cast<double>(score(i)) - max_s); }
  __device__ void find_top() {
    u64 best = 0;
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) best = max(best, key_of(score(i), i));
    top = block_reduce(best, sm.ksh, MaxOp{}, u64{0});
  }
  // Copies the keys >= floor (at most kCompact of them): thread t's in its order, after those
  // of threads < t, so the copy's order is a function of the row alone.
  __device__ void compact(u64 floor) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int32_t mine = 0;
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) mine += key_of(score(i), i) >= floor;
    sm.counts[threadIdx.x] = mine;
    __syncthreads();
    int32_t before = 0, warp_total = 0;
    for (int other = 0; other < 32; ++other) {
      const int32_t c = sm.counts[warp * 32 + other];
      before += other < lane ? c : 0;
      warp_total += c;
    }
    if (lane == 0) sm.warp_counts[warp] = warp_total;
    __syncthreads();
    for (int w = 0; w < warp; ++w) before += sm.warp_counts[w];
    int32_t total_n = 0;
    for (int w = 0; w < kThreads / 32; ++w) total_n += sm.warp_counts[w];
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const u64 k = key_of(score(i), i);
      if (k >= floor) {
        sm.ck[before] = k;
        sm.cp[before] = p(i);
        ++before;
      }
    }
    __syncthreads();
    compacted = true;
    c_floor = floor;
    n_c = total_n;
  }
  // Whether a pass over the keys >= t can walk the copy.
  __device__ bool in_copy(u64 t) const { return compacted && t >= c_floor; }
  // Calls f(key, prob) for this thread's keys >= bound, from the copy when it holds them all;
  // prob() is the key's probability (an exp on the vocabulary path, so called only if needed).
  template <typename F>
  __device__ void visit(u64 bound, F f) const {
    if (in_copy(bound)) {
      for (int32_t j = threadIdx.x; j < n_c; j += kThreads)
        if (sm.ck[j] >= bound) f(sm.ck[j], [&] { return sm.cp[j]; });
    } else {
      for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
        const u64 k = key_of(score(i), i);
        if (k >= bound) f(k, [&] { return p(i); });
      }
    }
  }
  // The largest T in [lo, hi] with pred(T) (pred(lo) holds, pred is monotone); pred counts the
  // keys >= max(T, floor) it looked at into `seen`. A raised bound with few enough keys at or
  // above it makes the copy.
  template <typename Pred>
  __device__ u64 search(u64 lo, u64 hi, u64 floor, Pred pred) {
    while (lo < hi) {
      const u64 mid = lo + (hi - lo) / 2 + ((hi - lo) & 1);  // rounds up, cannot overflow
      if (pred(mid)) {
        lo = mid;
        const u64 bound = lo > floor ? lo : floor;
        if (!in_copy(bound) && seen <= static_cast<u64>(kCompact)) compact(bound);
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }
  __device__ u64 count_at_least(u64 t) {
    u64 c = 0;
    visit(t, [&](u64, auto) { ++c; });
    seen = block_reduce(c, sm.ksh, SumOp{}, u64{0});
    return seen;
  }
  // Sum of p over the keys >= max(t, floor_key) whose probability p / norm is at least
  // `threshold` (the top always counts); norm = 1 and threshold < 0 count every key.
  __device__ double mass_at_least(u64 t, u64 floor_key, double threshold, double norm) {
    double s = 0;
    u64 c = 0;
    visit(t > floor_key ? t : floor_key, [&](u64 k, auto prob) {
      ++c;
      const double pi = prob();
      if (k == top || pi / norm >= threshold) s += pi;
    });
    seen = block_reduce(c, sm.ksh, SumOp{}, u64{0});
    return block_reduce(s, sm.dsh, SumOp{}, 0.0);
  }
  // The kept key the draw lands on: `chosen` when it is kept, else (rounding left no prefix
  // above the target) the smallest kept key, the twin's last kept token.
  __device__ u64 kept_key(u64 cut, u64 chosen, double threshold, double total) const {
    u64 smallest = ~0ull;
    bool found = false;
    visit(cut, [&](u64 k, auto prob) {
      if (k == top || prob() / total >= threshold) {
        smallest = min(smallest, k);
        found = found || k == chosen;
      }
    });
    smallest = ~block_reduce(~smallest, sm.ksh, MaxOp{}, u64{0});
    const u64 any_found = block_reduce(static_cast<u64>(found ? 1 : 0), sm.ksh, SumOp{}, u64{0});
    return any_found ? chosen : smallest;
  }
};

__global__ void __launch_bounds__(kThreads)
    sample_kernel(int32_t* out_ids, const float* logits, const float* params, int64_t vocab) {
  __shared__ SampleSmem sm;
  const int64_t row = blockIdx.x;
  const float* q = params + row * Ops::kSampleParams;
  const int64_t top_k = static_cast<int64_t>(q[1]);
  const float top_p = q[2];
  const float min_p = q[3];
  const double u = static_cast<double>(q[4]) + static_cast<double>(q[5]);
  // Greedy below Ops::kGreedyTemperature (the CPU twin's rule).
  RowSampler r{sm, logits + row * vocab, vocab, q[0], q[0] < Ops::kGreedyTemperature};
  r.find_top();
  if (r.greedy) {  // the lowest id among the largest logits
    if (threadIdx.x == 0) out_ids[row] = static_cast<int32_t>(id_of(r.top));
    return;
  }
  r.max_s = r.score(id_of(r.top));
  const u64 top = r.top;
  // top-k
  u64 cut = 0;
  if (top_k > 0 && top_k < vocab)
    cut =
        r.search(0, top, 0, [&](u64 t) { return r.count_at_least(t) >= static_cast<u64>(top_k); });
  const double total = r.mass_at_least(0, cut, -1.0, 1.0);
  // top-p: the shortest prefix with probability >= top_p
  if (top_p < 1.f)
    cut = r.search(cut, top, cut,
                   [&](u64 t) { return r.mass_at_least(t, cut, -1.0, 1.0) / total >= top_p; });
  // min-p: probability >= min_p x the top's (the top's p is exp(0) = 1), as the twin compares
  const double threshold = min_p > 0.f ? min_p * (1.0 / total) : -1.0;
  const double kept = r.mass_at_least(0, cut, threshold, total);
  const double target = u * kept;
  // The draw: the last key whose prefix still holds more than `target`.
  const u64 chosen = r.search(
      cut, top, cut, [&](u64 t) { return r.mass_at_least(t, cut, threshold, total) > target; });
  const u64 key = r.kept_key(cut, chosen, threshold, total);
  if (threadIdx.x == 0) out_ids[row] = static_cast<int32_t>(id_of(key));
}

// Ops::penalize: one block per row, a thread per id (distinct within the row, so no two threads
// touch one logit). Offsets past the ids are clamped, never followed. The operations are the CPU
// twin's, each rounded once: an IEEE division or product, one fma, one subtraction.
__global__ void penalize_kernel(float* __restrict__ logits, int64_t vocab,
                                const int32_t* __restrict__ offsets,
                                const int32_t* __restrict__ ids, const int32_t* __restrict__ counts,
                                int32_t n_ids, const float* __restrict__ params) {
  const int64_t row = blockIdx.x;
  const int32_t begin = min(max(offsets[row], 0), n_ids);
  const int32_t end = min(max(offsets[row + 1], begin), n_ids);
  const float repetition = params[row * 3];
  const float presence = params[row * 3 + 1];
  const float frequency = params[row * 3 + 2];
  float* lg = logits + row * vocab;
  for (int32_t j = begin + static_cast<int32_t>(threadIdx.x); j < end;
       j += static_cast<int32_t>(blockDim.x)) {
    const int32_t id = ids[j];
    if (id < 0 || id >= vocab) continue;
    float s = lg[id];
    s = s > 0.f ? __fdiv_rn(s, repetition) : __fmul_rn(s, repetition);
    const int32_t c = counts[j];
    lg[id] = __fsub_rn(s, fmaf(frequency, static_cast<float>(c), c > 0 ? presence : 0.f));
  }
}

// Ops::bias: one block per row, a thread per id (distinct within the row); offsets clamped as in
// penalize_kernel. One IEEE addition, as the CPU twin.
__global__ void bias_kernel(float* __restrict__ logits, int64_t vocab,
                            const int32_t* __restrict__ offsets, const int32_t* __restrict__ ids,
                            int32_t n_ids, const float* __restrict__ values) {
  const int64_t row = blockIdx.x;
  const int32_t begin = min(max(offsets[row], 0), n_ids);
  const int32_t end = min(max(offsets[row + 1], begin), n_ids);
  float* lg = logits + row * vocab;
  for (int32_t j = begin + static_cast<int32_t>(threadIdx.x); j < end;
       j += static_cast<int32_t>(blockDim.x)) {
    const int32_t id = ids[j];
    if (id >= 0 && id < vocab) lg[id] = __fadd_rn(lg[id], values[j]);
  }
}

// Ops::logprobs: one block per row. The log-sum-exp as the CPU twin (float max, fp64 sum of
// exp(l - max) in a fixed order of its own); the top tokens one block-wide key maximum at a time,
// each below the last (keys order by logit, then lower id, as the twin's sort).
constexpr int kLogprobThreads = 256;
__global__ void __launch_bounds__(kLogprobThreads)
    logprobs_kernel(float* __restrict__ out_logprobs, int32_t* __restrict__ out_ids,
                    const float* __restrict__ logits, const int32_t* __restrict__ rows,
                    const int32_t* __restrict__ chosen, int64_t n_chosen, int64_t vocab,
                    int32_t top) {
  __shared__ float fsh[32];
  __shared__ double dsh[32];
  __shared__ u64 ksh[32];
  const int64_t j = blockIdx.x;
  const float* l = logits + j * vocab;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < vocab; i += kLogprobThreads) m = fmaxf(m, l[i]);
  m = block_reduce(m, fsh, MaxOp{}, -INFINITY);
  double s = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += kLogprobThreads)
    s += exp(static_cast<double>(l[i] - m));
  s = block_reduce(s, dsh, SumOp{}, 0.0);
  const double lse = static_cast<double>(m) + log(s);
  float* out = out_logprobs + j * (top + 1);
  if (threadIdx.x == 0) {
    const int64_t r = rows[j];
    const int64_t token = r >= 0 && r < n_chosen ? chosen[r] : -1;
    out[0] =
        token >= 0 && token < vocab ? static_cast<float>(static_cast<double>(l[token]) - lse) : NAN;
  }
  u64 last = 0;
  for (int32_t t = 0; t < top; ++t) {
    u64 best = 0;
    for (int64_t i = threadIdx.x; i < vocab; i += kLogprobThreads) {
      const u64 k = key_of(l[i], i);
      if (t == 0 || k < last) best = max(best, k);
    }
    best = block_reduce(best, ksh, MaxOp{}, u64{0});
    if (threadIdx.x == 0) {
      const int64_t id = id_of(best);
      out_ids[j * top + t] = static_cast<int32_t>(id);
      out[1 + t] = static_cast<float>(static_cast<double>(l[id]) - lse);
    }
    last = best;
  }
}

}  // namespace

void logprobs(Tensor out_logprobs, Tensor out_ids, Tensor logits, Tensor rows, Tensor chosen,
              cudaStream_t stream) {
  check_logprobs(out_logprobs, out_ids, logits, rows, chosen);
  check_on_device("logprobs", {&out_logprobs, &out_ids, &logits, &rows, &chosen});
  const int64_t m = logits.size(0);
  if (m == 0) return;
  logprobs_kernel<<<static_cast<unsigned>(m), kLogprobThreads, 0, stream>>>(
      out_logprobs.f32(), out_ids.i32(), logits.f32(), rows.i32(), chosen.i32(), chosen.size(0),
      logits.size(1), static_cast<int32_t>(out_ids.size(1)));
  check_launch("logprobs");
}

void penalize(Tensor logits, Tensor offsets, Tensor ids, Tensor counts, Tensor params,
              cudaStream_t stream) {
  check_penalize(logits, offsets, ids, counts, params);
  check_on_device("penalize", {&logits, &offsets, &ids, &counts, &params});
  const int64_t n = logits.size(0);
  if (n == 0 || ids.size(0) == 0) return;
  static_assert(Ops::kPenaltyParams == 3);
  penalize_kernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(
      logits.f32(), logits.size(1), offsets.i32(), ids.i32(), counts.i32(),
      static_cast<int32_t>(ids.size(0)), params.f32());
  check_launch("penalize");
}

void bias(Tensor logits, Tensor offsets, Tensor ids, Tensor values, cudaStream_t stream) {
  check_bias(logits, offsets, ids, values);
  check_on_device("bias", {&logits, &offsets, &ids, &values});
  const int64_t n = logits.size(0);
  if (n == 0 || ids.size(0) == 0) return;
  bias_kernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(
      logits.f32(), logits.size(1), offsets.i32(), ids.i32(), static_cast<int32_t>(ids.size(0)),
      values.f32());
  check_launch("bias");
}

void sample(Tensor out_ids, Tensor logits, Tensor params, cudaStream_t stream) {
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  check_sample(out_ids, logits, params);
  check_on_device("sample", {&out_ids, &logits, &params});
  if (n == 0) return;
  sample_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(out_ids.i32(), logits.f32(),
                                                                   params.f32(), vocab);
  check_launch("sample");
}

}  // namespace sy::cuda
