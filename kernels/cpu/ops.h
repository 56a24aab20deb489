// CPU kernels: the reference implementation of every op (see kernels/ops.h for the contracts).
// One op per file in this folder; each checks its operands and runs plain loops or BLAS.
#pragma once

#include <vector>

#include "kernels/ops.h"

namespace sy::cpu {

void embedding(Tensor out, Tensor ids, Tensor table, int64_t row_offset);
void rmsnorm(Tensor out, Tensor x, Tensor weight, float eps);
void add(Tensor out, Tensor a, Tensor b);
void matmul(Tensor out, Tensor x, Tensor w);
// matmul with w in F16, BF16 or a block type (qmatmul.cc); x and out F32.
void matmul_converted(Tensor out, Tensor x, Tensor w);

// Which SIMD paths the CPU kernels take: kAuto, AVX2 + FMA + F16C where the CPU has them
// (checked at run time); kPortable, plain C++ everywhere (the tests run both).
enum class Simd { kAuto, kPortable };
void set_simd(Simd simd);
bool simd_enabled();
void rope(Tensor q, Tensor k, Tensor positions, double theta);
void kv_append(Tensor k_cache, Tensor v_cache, Tensor k, Tensor v, const AttentionMeta& meta);
void attention(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache, const AttentionMeta& meta);
void moe_gate(Tensor topk_idx, Tensor topk_weights, Tensor logits);
void gather_rows(Tensor out, Tensor x, Tensor rows);
void scatter_add_weighted(Tensor out, Tensor x, Tensor rows, Tensor weights);
void swiglu(Tensor out, Tensor gate, Tensor up);

// One row of sampling (see sample.cc): `scores` [vocab] are divided by the temperature in
// place; `u` in [0, 1) is the draw; `order` is scratch.
int32_t sample_row(float* scores, int64_t vocab, float temperature, int64_t top_k, float top_p,
                   float min_p, double u, std::vector<int32_t>& order);

// The logit biases of one row of scores [vocab] (Ops::bias): scores[ids[j]] += values[j] for the
// n distinct `ids` (those outside [0, vocab) skipped). The reference of Ops::bias and what
// runtime/sampler.cc's Sampler applies before the penalties.
void bias_row(float* scores, int64_t vocab, const int32_t* ids, const float* values, int64_t n);

// The penalties of one row of scores [vocab] (Ops::penalize): each of the n distinct `ids` (those
// outside [0, vocab) skipped) first takes Hugging Face's repetition penalty (divided by
// `repetition` when positive, multiplied otherwise), then loses
// fma(frequency, counts[j], counts[j] > 0 ? presence : 0), counts[j] being how many times the
// id was generated. The reference of Ops::penalize and what runtime/sampler.cc's Sampler applies.
void penalize_row(float* scores, int64_t vocab, const int32_t* ids, const int32_t* counts,
                  int64_t n, float repetition, float presence, float frequency);

// Log-probabilities of one row of logits [vocab] (log-softmax, fp64 sums): out_logprobs[0] for
// `chosen`, then out_logprobs[1 + i] for the i-th most likely token (ties: the lower id), whose
// id goes to out_ids[i], i < top <= vocab. `order` is scratch. The reference of Ops::logprobs.
void logprobs_row(const float* logits, int64_t vocab, int32_t chosen, int64_t top,
                  float* out_logprobs, int32_t* out_ids, std::vector<int32_t>& order);

// Physical cache slot of `position` in sequence `seq` (checked against the table's extent).
int64_t kv_slot(const AttentionMeta& meta, int64_t seq, int64_t position);

}  // namespace sy::cpu
