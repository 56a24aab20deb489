// Sampling of the next token from a row of logits, in Hugging Face generate()'s order:
// repetition penalty, then temperature, top-k, top-p, min-p; greedy when temperature is 0.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace sy {

struct SamplingParams {
  float temperature = 0.f;         // 0 = greedy (argmax); otherwise logits / temperature
  int64_t top_k = 0;               // keep the k most likely tokens; 0 = off
  float top_p = 1.f;               // keep the smallest set with probability >= top_p; 1 = off
  float min_p = 0.f;               // drop tokens with p < min_p * p_max; 0 = off
  float repetition_penalty = 1.f;  // > 1 discourages tokens already in the context; 1 = off
  uint64_t seed = 0;               // same seed, same tokens

  // Throws naming the field and its allowed range.
  void validate() const;
};

class Sampler {
 public:
  Sampler(const SamplingParams& params, int64_t vocab_size);
  // Picks the next token from `logits` [vocab_size]; `context` holds the prompt and the tokens
  // generated so far (for the repetition penalty: it must extend the previous call's, as
  // penalty_ids). Allocates nothing once the context's distinct tokens are known.
  int32_t sample(const float* logits, const std::vector<int32_t>& context);
  // The next uniform number in [0, 1) of this sampler's stream (what sample() draws when the
  // temperature is not 0), for sampling on the device (Ops::sample) with the same stream.
  double draw();
  // The Ops::sample parameters of this sampler's next token, draw included (when the
  // temperature is not 0): out[Ops::kSampleParams]. A penalised sampler's logits take
  // Ops::repetition_penalty with penalty_ids first.
  void device_params(float* out);
  bool penalised() const { return params_.repetition_penalty != 1.f; }
  // The distinct tokens of `context` in [0, vocab_size), in order of first appearance: the ids
  // of Ops::repetition_penalty for this sampler's row. Incremental: `context` must extend the
  // one of the previous call (one sequence's tokens, which only grow).
  const std::vector<int32_t>& penalty_ids(const std::vector<int32_t>& context);
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  int64_t vocab_size_;
  std::mt19937_64 rng_;
  std::vector<float> scores_;   // [vocab_size]
  std::vector<int32_t> order_;  // [vocab_size]
  // penalty_ids: the context seen so far, its distinct tokens, and which those are (sized on
  // the first call).
  size_t noted_ = 0;
  std::vector<int32_t> context_ids_;
  std::vector<uint8_t> in_context_;
};

}  // namespace sy
