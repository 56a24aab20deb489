// GPU ops. Each has a CPU twin of the same name in kernels/cpu/ops.h, its reference in tests;
// the contracts (shapes, dtypes) are those of kernels/ops.h, with F32|S meaning F32 or BF16.
// Every launcher checks its operands, enqueues on `stream` and never synchronises.
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "kernels/ops.h"

namespace sy::cuda {

void embedding(Tensor out, Tensor ids, Tensor table, int64_t row_offset, cudaStream_t stream);
void rmsnorm(Tensor out, Tensor x, Tensor weight, float eps, cudaStream_t stream);
void add(Tensor out, Tensor a, Tensor b, cudaStream_t stream);
void rope(Tensor q, Tensor k, Tensor positions, double theta, cudaStream_t stream);
void kv_append(Tensor k_cache, Tensor v_cache, Tensor k, Tensor v, const AttentionMeta& meta,
               cudaStream_t stream);
// How attention covers a step (attention.cu): blocks per (KV head, token) for the query heads
// sharing the KV head, the context splits of flash-decoding (1: none), and for prefill on tensor
// cores (attention_mma.cu) the tokens per query tile (0: none). A function of shapes only:
// `n_seqs` the block table's rows, `capacity` its positions (max_blocks * block_size), `window`
// the sliding window (0: none), `bf16_cache` the cache dtype, `sm_count` and `sm_major` the
// GPU's multiprocessors and compute capability.
struct AttentionPlan {
  int64_t sub_blocks = 1;
  int64_t n_splits = 1;
  int64_t split_len = 1;    // positions per split
  int64_t tile_tokens = 0;  // > 0: a step token whose sequence is that of the first token of its
                            // tile (token / tile_tokens) is attention_mma's, the rest the
                            // per-token kernel's
};
AttentionPlan plan_attention(int64_t n_tokens, int64_t n_seqs, int64_t n_heads, int64_t n_kv_heads,
                             int64_t head_dim, int64_t capacity, int64_t window, bool bf16_cache,
                             int sm_count, int sm_major);
// fp32 device workspace the plan needs (0 without splits).
int64_t attention_workspace_floats(const AttentionPlan& plan, int64_t n_tokens, int64_t n_heads,
                                   int64_t head_dim);
void attention(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache, const AttentionMeta& meta,
               const AttentionPlan& plan, float* workspace, int64_t workspace_floats,
               cudaStream_t stream);
// The tensor-core prefill kernel (attention_mma.cu): whether it runs for these operands, its
// tile, and its launch for the tokens the plan gives it.
bool attention_mma_supported(int64_t head_dim, bool bf16_cache, int sm_major);
int64_t attention_mma_tile_tokens(int64_t n_heads, int64_t n_kv_heads);
void attention_mma(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache, const AttentionMeta& meta,
                   int64_t tile_tokens, int64_t sub_blocks, cudaStream_t stream);
// d = a * b on the tensor cores, a and b rounded to bf16 ([16, 16] and [16, 8] row-major F32):
// a check of mma.cuh's fragment layouts (mma_check.cu).
void mma_check(Tensor d, Tensor a, Tensor b, int sm_major, cudaStream_t stream);
void moe_gate(Tensor topk_idx, Tensor topk_weights, Tensor logits, cudaStream_t stream);
void gather_rows(Tensor out, Tensor x, Tensor rows, cudaStream_t stream);
// Needs int32 device scratch of scatter_scratch_size(out rows, rows) elements.
void scatter_add_weighted(Tensor out, Tensor x, Tensor rows, Tensor weights, int32_t* scratch,
                          int64_t scratch_size, cudaStream_t stream);
int64_t scatter_scratch_size(int64_t n_tokens, int64_t n_rows);
void swiglu(Tensor out, Tensor gate, Tensor up, cudaStream_t stream);
void sample(Tensor out_ids, Tensor logits, Tensor params, cudaStream_t stream);
void penalize(Tensor logits, Tensor offsets, Tensor ids, Tensor counts, Tensor params,
              cudaStream_t stream);
void bias(Tensor logits, Tensor offsets, Tensor ids, Tensor values, cudaStream_t stream);
void logprobs(Tensor out_logprobs, Tensor out_ids, Tensor logits, Tensor rows, Tensor chosen,
              cudaStream_t stream);
void moe_route(Tensor sorted_rows, Tensor sorted_weights, Tensor offsets, Tensor topk_idx,
               Tensor topk_weights, int64_t expert_begin, int64_t expert_end, cudaStream_t stream);
void count_routed(Tensor counts, Tensor offsets, cudaStream_t stream);
// Ops::grouped_matmul_offsets for x and weights both BF16 or both F32: `w_device` is a device
// array of the n_groups weight pointers ([n_out, K] each, x's dtype; `w_aligned`: all 16-byte
// aligned). Steps of at most kRowsGemmMaxRows rows take the warp-per-column kernel
// (moe_route.cu), larger ones the tensor-core kernel (grouped_mma.cu) where it runs.
constexpr int64_t kRowsGemmMaxRows = 64;
void grouped_gemm_offsets(Tensor out, Tensor x, const void* const* w_device, bool w_aligned,
                          int64_t n_out, Tensor offsets, int64_t first, size_t n_groups,
                          int sm_major, cudaStream_t stream);
// The tensor-core kernel: whether it takes x (BF16, 16-byte aligned, K a multiple of 8) with
// weights all 16-byte aligned on a device of compute capability `sm_major`, and its launch
// (operands checked by the caller).
bool grouped_mma_supported(const Tensor& x, bool w_aligned, int sm_major);
void grouped_mma_gemm(Tensor out, Tensor x, const void* const* w_device, int64_t n_out,
                      Tensor offsets, int64_t first, size_t n_groups, cudaStream_t stream);

// The CUDA backend on device `device` (made current): cuBLAS GEMMs, the kernels above, one
// non-blocking stream. `storage` (Ops::storage_dtype) is BF16 for serving, or F32 for a run
// whose only difference from the CPU backend is the order of fp32 arithmetic. Throws when there
// is no such device.
std::unique_ptr<Ops> make_cuda_ops(int device, DType storage = DType::kBF16);
// The stream every op of `ops` (a CUDA backend) runs on; device communicators enqueue on it.
cudaStream_t stream_of(Ops& ops);

}  // namespace sy::cuda
