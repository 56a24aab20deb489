// Sampling of a step's tokens: one payload built from every logit row's request, then on the
// model's backend the logit biases, the penalties, the samples (Ops::bias, penalize, sample),
// the forced tokens, and the log-probabilities of the raw rows (Ops::logprobs). The engine,
// generate() and `bench engine` sample through it; on the CPU the ops are Sampler::sample's own
// row functions, on a GPU only the sampled ids and logprobs come back to the host.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/ops.h"
#include "runtime/engine/sampler.h"
#include "runtime/model/model.h"

namespace sy {

struct TopLogprob {
  int32_t token_id = 0;
  float logprob = 0;
};
// The log-probability of a row's token and of its `top` most likely tokens (best first).
struct TokenLogprobs {
  int32_t token_id = 0;
  float logprob = 0;
  std::vector<TopLogprob> top;
};

// What one logit row of a step asks of sampling.
struct SampleRequest {
  // The sequence's sampler (its parameters, draws, biases and penalties); null samples greedily
  // with none (a prompt logprob row, a benchmark).
  Sampler* sampler = nullptr;
  const std::vector<int32_t>* context = nullptr;  // prompt and generated tokens (penalties)
  int64_t n_generated = 0;                        // tokens generated so far (min_tokens' bans)
  int64_t logprobs = 0;                           // top log-probabilities wanted; 0 = none
  int32_t forced = -1;  // the token the row takes instead of a sampled one; -1 samples
};

// One step's sampling as the ops take it, on the host: row i's sample parameters, its logit
// biases ids/values[bias_offsets[i] .. bias_offsets[i + 1]), its penalties (penalty_ids/counts
// likewise, and penalty_params, {1, 0, 0} for none), its forced token (-1: sampled), and the rows
// whose log-probabilities are wanted, with `top` alternatives each.
struct SamplePayload {
  std::vector<float> params;             // [n, Ops::kSampleParams]
  std::vector<int32_t> bias_offsets;     // [n + 1], from 0
  std::vector<int32_t> bias_ids;         // distinct within a row
  std::vector<float> bias_values;        // -inf bans
  std::vector<int32_t> penalty_offsets;  // [n + 1], from 0
  std::vector<int32_t> penalty_ids;      // a row's distinct context tokens
  std::vector<int32_t> penalty_counts;   // times each was generated
  std::vector<float> penalty_params;     // [n, Ops::kPenaltyParams]
  std::vector<int32_t> forced;           // [n]
  std::vector<int32_t> logprob_rows;     // rows asked for log-probabilities, increasing
  int64_t top = 0;                       // alternatives per logprob row; 0 with no such row

  int64_t n_rows() const { return static_cast<int64_t>(forced.size()); }
  // The payload of `rows` (draws one number from each sampling row's stream, as Sampler::sample
  // would): the one builder of every caller.
  void build(const std::vector<SampleRequest>& rows, int64_t vocab_size);
};

class StepSampler {
 public:
  static constexpr int64_t kMaxTopLogprobs = 20;
  // The most logit biases of one row (SamplingParams::kMaxLogitBias and the end ids that
  // min_tokens bans fit).
  static constexpr int64_t kMaxBiasesPerRow = 2048;

  // Buffers on `model`'s backend, sized from its limits.
  explicit StepSampler(const Model& model);
  StepSampler(const StepSampler&) = delete;
  StepSampler& operator=(const StepSampler&) = delete;

  // One token per logit row of `model`'s last step (Model::step_logits, which it changes):
  // ids[i] for rows[i]; then logprobs() gives the rows that asked.
  void sample(Model& model, const std::vector<SampleRequest>& rows, int32_t* ids);
  // The same from a payload, checked against the capacities below first.
  void run(Model& model, const SamplePayload& payload, int32_t* ids);
  // After sample()/run(): logit row `row`'s token and `top` (at most the payload's) alternatives.
  TokenLogprobs logprobs(int64_t row, int64_t top) const;

  // Each step's sequences have at most one sampled row with penalties (prompt logprob rows have
  // none), with at most min(vocabulary, context) distinct tokens; likewise biases.
  int64_t penalty_capacity() const { return penalty_capacity_; }
  int64_t bias_capacity() const { return bias_capacity_; }

 private:
  void check(const SamplePayload& payload) const;
  void apply_biases(const SamplePayload& payload, Tensor logits);
  void apply_penalties(const SamplePayload& payload, Tensor logits);
  void overwrite_forced(const SamplePayload& payload, Tensor sampled);
  template <typename T>
  Tensor upload(Tensor buffer, const std::vector<T>& host);

  Ops& ops_;
  int64_t vocab_;
  int64_t max_rows_;
  int64_t penalty_capacity_;
  int64_t bias_capacity_;
  SamplePayload payload_;
  DeviceBuffer storage_;
  Tensor params_;           // F32 [max_rows, Ops::kSampleParams]
  Tensor ids_;              // I32 [max_rows]
  Tensor bias_offsets_;     // I32 [max_rows + 1]
  Tensor bias_ids_;         // I32 [bias_capacity]
  Tensor bias_values_;      // F32 [bias_capacity]
  Tensor penalty_offsets_;  // I32 [max_rows + 1]
  Tensor penalty_ids_;      // I32 [penalty_capacity]
  Tensor penalty_counts_;   // I32 [penalty_capacity]
  Tensor penalty_params_;   // F32 [max_rows * Ops::kPenaltyParams]
  Tensor logprob_rows_;     // I32 [max_rows]
  Tensor logprob_raw_;      // F32 [max_rows, vocab]   the logprob rows before biases and penalties
  Tensor logprob_out_;      // F32 [max_rows * (1 + kMaxTopLogprobs)]
  Tensor logprob_ids_;      // I32 [max_rows * kMaxTopLogprobs]
  std::vector<int32_t> tokens_;            // the run's tokens (host)
  std::vector<float> host_logprobs_;       // the run's [n_logprob_rows, 1 + top]
  std::vector<int32_t> host_logprob_ids_;  // [n_logprob_rows, top]
  std::vector<int64_t> logprob_slot_;      // per logit row: its logprob row, or -1
  int64_t top_ = 0;                        // the run's top
};

}  // namespace sy
