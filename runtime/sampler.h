// Sampling of the next token from a row of logits: the penalties (repetition as Hugging Face,
// then presence and frequency as OpenAI), then, in Hugging Face generate()'s order, temperature,
// top-k, top-p, min-p; greedy when temperature is 0.
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
  // Subtracted from the logit of every token generated so far (prompt tokens do not count):
  // presence once, frequency once per time it was generated; 0 = off, negative encourages.
  float presence_penalty = 0.f;
  float frequency_penalty = 0.f;
  uint64_t seed = 0;  // same seed, same tokens

  // Throws naming the field and its allowed range.
  void validate() const;
};

// A sampler's penalty context (Ops::penalize's ids and counts of its row): the distinct tokens
// of the context in [0, vocab_size), in order of first appearance, and how many times each was
// generated (0 for a token seen only in the prompt).
struct PenaltyContext {
  std::vector<int32_t> ids;
  std::vector<int32_t> counts;
};

class Sampler {
 public:
  // One sequence's sampler: its context begins with a prompt of `n_prompt` tokens.
  Sampler(const SamplingParams& params, int64_t vocab_size, size_t n_prompt);
  // Picks the next token from `logits` [vocab_size]; `context` holds the prompt and the tokens
  // generated so far (for the penalties: it must extend the previous call's, as
  // penalty_context). Allocates nothing once the context's distinct tokens are known.
  int32_t sample(const float* logits, const std::vector<int32_t>& context);
  // The next uniform number in [0, 1) of this sampler's stream (what sample() draws when the
  // temperature is not 0), for sampling on the device (Ops::sample) with the same stream.
  double draw();
  // The Ops::sample parameters of this sampler's next token, draw included (when the
  // temperature is not 0): out[Ops::kSampleParams]. A penalised sampler's logits take
  // Ops::penalize with penalty_context and penalty_params first.
  void device_params(float* out);
  bool penalised() const {
    return params_.repetition_penalty != 1.f || params_.presence_penalty != 0.f ||
           params_.frequency_penalty != 0.f;
  }
  // This sampler's row of Ops::penalize's params: out[Ops::kPenaltyParams].
  void penalty_params(float* out) const;
  // The penalty context of `context` (the prompt, then the tokens generated). Incremental:
  // `context` must extend the one of the previous call (one sequence's tokens, which only grow).
  const PenaltyContext& penalty_context(const std::vector<int32_t>& context);
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  int64_t vocab_size_;
  std::mt19937_64 rng_;
  std::vector<float> scores_;   // [vocab_size]
  std::vector<int32_t> order_;  // [vocab_size]
  // penalty_context: the prompt's length, the context seen so far, its distinct tokens and
  // their counts, and each token's index in them or -1 (sized on the first call).
  size_t n_prompt_;
  size_t noted_ = 0;
  PenaltyContext penalty_;
  std::vector<int32_t> slot_;
};

}  // namespace sy
