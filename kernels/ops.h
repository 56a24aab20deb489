// The ops interface: every op the model's forward pass calls, implemented once per backend.
//
// The model code (runtime/model.cc) is written against Ops; `--device cpu|cuda` picks the
// implementation at run time. Operands are views (kernels/tensor.h) on the backend's device.
// Every implementation checks shapes and dtypes at entry; shapes below use
//   n_tokens  tokens in this step (all sequences flattened)
//   n_heads / n_kv_heads   query / key-value heads held by this rank, head_dim per head
//   n_blocks, block_size   paged KV cache geometry
//
// Element types. Each backend has a storage dtype S (storage_dtype()): the dtype of its linear
// weights, embeddings, KV cache and of the activations that feed a GEMM. The CPU backend has
// S = F32 and takes F32 everywhere; the CUDA backend has S = BF16. The residual stream, norm
// weights, q/k/v before RoPE, router logits and weights, and logits stay F32 on every backend.
// Below, "F32|S" means either, as the operand's dtype says; the math is fp32 inside every op.
#pragma once

#include <cstddef>
#include <memory>

#include "kernels/tensor.h"

namespace sy {

// Where the attention of one step reads its keys and values from.
struct AttentionMeta {
  Tensor positions;        // I32 [n_tokens]: position of each token in its sequence
  Tensor token_seq;        // I32 [n_tokens]: index of each token's sequence in block_tables
  Tensor block_tables;     // I32 [n_seqs, max_blocks_per_seq]: physical block of each logical block
  int64_t block_size = 0;  // tokens per KV block
  int64_t sliding_window = 0;  // attend to the last `sliding_window` positions; 0 = all
};

class Ops {
 public:
  virtual ~Ops() = default;
  virtual Device device() const = 0;
  // Dtype of weights, KV cache and GEMM inputs on this backend (see the header comment).
  virtual DType storage_dtype() const = 0;

  // ---- memory ------------------------------------------------------------------------------
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* ptr) = 0;
  virtual void copy_from_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill_zero(Tensor t) = 0;
  virtual void synchronize() = 0;

  // ---- ops ---------------------------------------------------------------------------------
  // out[t] = table[ids[t] - row_offset] when that row is held here, else zeros (vocab-parallel).
  // out: F32 [n_tokens, dim]; ids: I32 [n_tokens]; table: F32|S [n_rows, dim].
  virtual void embedding(Tensor out, Tensor ids, Tensor table, int64_t row_offset) = 0;
  // out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * weight. x: F32 [n_tokens, dim]; weight: F32
  // [dim]; out: F32|S [n_tokens, dim], may alias x when F32.
  virtual void rmsnorm(Tensor out, Tensor x, Tensor weight, float eps) = 0;
  // out = a + b, elementwise, same shapes, F32; out may alias a or b.
  virtual void add(Tensor out, Tensor a, Tensor b) = 0;
  // out = x · wᵀ.   out: F32|S [m, n]; x: [m, k] and w: [n, k] (a Hugging Face Linear weight),
  // both F32 or both S; fp32 accumulation.
  virtual void matmul(Tensor out, Tensor x, Tensor w) = 0;
  // The experts of one MoE projection as one grouped GEMM: rows [offsets[g], offsets[g + 1]) of
  // out = the same rows of x · w[g]ᵀ, for g in [0, n_groups). offsets: host [n_groups + 1];
  // dtypes as matmul, every w[g] of one shape. Groups with no rows are skipped. The default runs
  // one matmul per group.
  virtual void grouped_matmul(Tensor out, Tensor x, const Tensor* w, const int64_t* offsets,
                              size_t n_groups);
  // Rotates q: F32 [n_tokens, n_heads, head_dim] and k: F32 [n_tokens, n_kv_heads, head_dim] in
  // place by their positions (Hugging Face rotate-half convention, base `theta`).
  virtual void rope(Tensor q, Tensor k, Tensor positions, double theta) = 0;
  // Writes k, v: F32 [n_tokens, n_kv_heads, head_dim] into the caches F32|S
  // [n_blocks, block_size, n_kv_heads, head_dim] at the slots of their positions.
  virtual void kv_append(Tensor k_cache, Tensor v_cache, Tensor k, Tensor v,
                         const AttentionMeta& meta) = 0;
  // Causal grouped-query attention of q: F32 [n_tokens, n_heads, head_dim] over each token's
  // sequence in the caches (F32|S), positions [max(0, p - window + 1), p]. out: F32|S, q's shape.
  virtual void attention(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache,
                         const AttentionMeta& meta) = 0;
  // Router: softmax(logits) in fp32, top-k, the k weights renormalised to sum 1.
  // logits: F32 [n_tokens, n_experts]; topk_idx: I32 [n_tokens, k]; topk_weights: F32 [n_tokens,
  // k].
  virtual void moe_gate(Tensor topk_idx, Tensor topk_weights, Tensor logits) = 0;
  // out[r] = x[rows[r]], or zeros where rows[r] < 0.   out: [n_rows, dim]; x: [n_tokens, dim],
  // out's dtype (any); rows: I32 [n_rows].
  virtual void gather_rows(Tensor out, Tensor x, Tensor rows) = 0;
  // out[rows[r]] += weights[r] * x[r] for every r with rows[r] >= 0, in order of r.
  // out: F32 [n_tokens, dim]; x: F32|S [n_rows, dim]; rows: I32 [n_rows]; weights: F32 [n_rows].
  virtual void scatter_add_weighted(Tensor out, Tensor x, Tensor rows, Tensor weights) = 0;
  // out = silu(gate) * up, elementwise. [n_rows, hidden_dim], all F32 or all S; out may alias
  // gate.
  virtual void swiglu(Tensor out, Tensor gate, Tensor up) = 0;

  // ---- routing without the host (a decode step that never waits for the GPU) ---------------
  // The MoE layout on the device: the (token, j) pairs of topk_idx: I32 [n_tokens, k] sorted by
  // expert, stable in token order, as runtime/moe.h's moe_layout does on the host.
  // sorted_rows: I32 [n_tokens * k], the token of each row, or -1 for the rows of experts
  // outside [expert_begin, expert_end) (computed elsewhere); sorted_weights: F32 [n_tokens * k],
  // the router weight (0 for those rows); offsets: I32 [n_experts + 1], the first row of each
  // expert. The default sorts on the host (copies out and back).
  virtual void moe_route(Tensor sorted_rows, Tensor sorted_weights, Tensor offsets, Tensor topk_idx,
                         Tensor topk_weights, int64_t expert_begin, int64_t expert_end);
  // counts[e] += offsets[e + 1] - offsets[e] for each expert e: the routed rows of a layout
  // that moe_route made, tallied on the device (counts: I32 [n], offsets: I32 [n + 1]). The
  // default works on host copies.
  virtual void count_routed(Tensor counts, Tensor offsets);
  // grouped_matmul with row ranges read from device memory: group g covers rows
  // [offsets[first + g], offsets[first + g + 1]) of x and out (offsets: I32, as moe_route
  // makes). Rows outside every group are left as they are. The default copies the offsets to
  // the host and calls grouped_matmul.
  virtual void grouped_matmul_offsets(Tensor out, Tensor x, const Tensor* w, Tensor offsets,
                                      int64_t first, size_t n_groups);

  // ---- sampling ----------------------------------------------------------------------------
  // One token per row of logits: F32 [n, vocab]; params: F32 [n, kSampleParams] per row
  // (temperature, top_k, top_p, min_p, u_hi, u_lo) with the draw u = u_hi + u_lo in [0, 1);
  // out_ids: I32 [n]. The semantics of kernels/cpu/sample.cc (greedy when temperature is 0).
  // The default copies the rows to the host and samples there.
  static constexpr int64_t kSampleParams = 6;
  // Temperatures below this sample greedily (as vLLM's epsilon): l / t would overflow to inf for
  // the smallest ones. NaN logits rank below every other (as -inf).
  static constexpr float kGreedyTemperature = 1e-5f;
  virtual void sample(Tensor out_ids, Tensor logits, Tensor params);
  // Logit biases, in place, before penalize: in row i of logits F32 [n, vocab], logits[i, ids[j]]
  // += values[j] for offsets[i] <= j < offsets[i + 1] (-inf bans the token). offsets: I32
  // [n + 1], non-decreasing from 0 to at most m; ids: I32 [m], distinct within a row (ids outside
  // [0, vocab) are skipped); values: F32 [m]. kernels/cpu/sample.cc's bias_row is the reference.
  // The default copies to the host and back.
  virtual void bias(Tensor logits, Tensor offsets, Tensor ids, Tensor values);
  // Repetition, presence and frequency penalties, in place, before sample: in row i of logits
  // F32 [n, vocab], each token ids[j], offsets[i] <= j < offsets[i + 1] (the row's distinct
  // context tokens, prompt and generated), first has its logit divided by the repetition penalty
  // params[i, 0] when positive and multiplied by it otherwise (Hugging Face's), then loses
  // fma(frequency, counts[j], counts[j] > 0 ? presence : 0) with presence params[i, 1] and
  // frequency params[i, 2] (OpenAI's; counts[j]: how many times ids[j] was generated).
  // offsets: I32 [n + 1], non-decreasing from 0 to at most m; ids, counts: I32 [m], ids distinct
  // within a row (ids outside [0, vocab) are skipped); params: F32 [n, kPenaltyParams]
  // ({1, 0, 0} leaves a row as it is). kernels/cpu/sample.cc's penalize_row is the reference.
  // The default copies to the host and back.
  static constexpr int64_t kPenaltyParams = 3;
  virtual void penalize(Tensor logits, Tensor offsets, Tensor ids, Tensor counts, Tensor params);
  // Log-probabilities (log-softmax, fp64 sums) of the token sampled from each of m logit rows
  // and of the row's `top` most likely tokens: logits F32 [m, vocab] holds the rows, row j's
  // token is chosen[rows[j]] (rows: I32 [m]; chosen: I32 [n], as sample wrote it);
  // out_logprobs F32 [m, 1 + top] gets the chosen token's, then the top tokens' best first
  // (ties: the lower id), whose ids go to out_ids I32 [m, top], 1 <= top <= vocab. The default
  // copies to the host.
  virtual void logprobs(Tensor out_logprobs, Tensor out_ids, Tensor logits, Tensor rows,
                        Tensor chosen);

  // ---- graphs ------------------------------------------------------------------------------
  // A backend with graphs records the ops issued between begin_graph() and end_graph(id) (none
  // of which may synchronise or copy from the host) as graph `id`, replacing any graph of that
  // id, without running them; launch_graph(id) runs it. The others have none.
  virtual bool supports_graphs() const { return false; }
  virtual bool has_graph(int64_t id) const {
    (void)id;
    return false;
  }
  virtual void begin_graph() { SY_FAIL("this backend has no graphs"); }
  virtual void end_graph(int64_t id) {
    (void)id;
    SY_FAIL("this backend has no graphs");
  }
  virtual void launch_graph(int64_t id) {
    (void)id;
    SY_FAIL("this backend has no graphs");
  }
  // Ends a recording that failed half way (the partial graph is dropped), so that the backend
  // runs ops again; a no-op when nothing is being recorded.
  virtual void abort_graph() {}
  // Frees graph `id` if there is one (its owner is going away).
  virtual void drop_graph(int64_t id) { (void)id; }
  // Makes this backend's device current for the calling thread (a rank's ops may be called from
  // a thread other than the one that built them).
  virtual void make_current() {}
};

// Operand checks shared by the backends' moe_route, count_routed and sample (shapes and dtypes
// as above).
void check_count_routed(const Tensor& counts, const Tensor& offsets);
void check_moe_route(const Tensor& sorted_rows, const Tensor& sorted_weights, const Tensor& offsets,
                     const Tensor& topk_idx, const Tensor& topk_weights, int64_t expert_begin,
                     int64_t expert_end);
void check_sample(const Tensor& out_ids, const Tensor& logits, const Tensor& params);
void check_penalize(const Tensor& logits, const Tensor& offsets, const Tensor& ids,
                    const Tensor& counts, const Tensor& params);
void check_bias(const Tensor& logits, const Tensor& offsets, const Tensor& ids,
                const Tensor& values);
void check_logprobs(const Tensor& out_logprobs, const Tensor& out_ids, const Tensor& logits,
                    const Tensor& rows, const Tensor& chosen);

// The CPU backend: plain C++ loops and BLAS GEMMs, fp32 throughout.
std::unique_ptr<Ops> make_cpu_ops();

// RAII device buffer from an Ops allocator.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Ops& ops, size_t bytes)
      : ops_(&ops), ptr_(bytes ? ops.alloc(bytes) : nullptr), bytes_(bytes) {}
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ops_(o.ops_), ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      ops_ = o.ops_;
      ptr_ = o.ptr_;
      bytes_ = o.bytes_;
      o.ptr_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }
  void reset() {
    if (ptr_ != nullptr) ops_->free(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  Ops* ops_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Carves 64-byte-aligned tensors out of one allocation: a pass with a null base sizes it (bytes()),
// a second pass over the same takes with the allocation's base places the views.
class Carver {
 public:
  explicit Carver(void* base, Device device) : base_(static_cast<char*>(base)), device_(device) {}
  Tensor take(DType dtype, std::initializer_list<int64_t> dims) {
    Tensor t(base_ == nullptr ? nullptr : base_ + offset_, dtype, dims, device_);
    offset_ += (t.bytes() + 63) / 64 * 64;
    return t;
  }
  size_t bytes() const { return offset_; }

 private:
  char* base_;
  Device device_;
  size_t offset_ = 0;
};

}  // namespace sy
