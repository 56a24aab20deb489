// Sampling of the next token from a row of logits: the logit biases (OpenAI's logit_bias, and the
// bans of min_tokens), the penalties (repetition as Hugging Face, then presence and frequency as
// OpenAI), then, in Hugging Face generate()'s order, temperature, top-k, top-p, min-p; greedy when
// temperature is 0.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
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
  // Added to the logits of these tokens before the penalties (OpenAI's logit_bias): distinct
  // ids, at most kMaxLogitBias of them, each value in [-100, 100].
  std::vector<std::pair<int32_t, float>> logit_bias;
  // The tokens that end generation (the sampler's end ids) are banned until this many tokens
  // have been generated; 0 = off.
  int64_t min_tokens = 0;
  static constexpr int64_t kMaxLogitBias = 1024;

  // Throws naming the field and its allowed range.
  void validate() const;
};

// A sampler's logit biases (Ops::bias's ids and values of its row): distinct ids.
struct BiasList {
  std::vector<int32_t> ids;
  std::vector<float> values;
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
  // One sequence's sampler: its context begins with a prompt of `n_prompt` tokens; `end_ids`
  // are the tokens that would end its generation (end of sequence, stop ids), which
  // params.min_tokens holds back. Throws naming a logit_bias id outside the vocabulary.
  Sampler(const SamplingParams& params, int64_t vocab_size, size_t n_prompt,
          const std::vector<int32_t>& end_ids = {});
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
  // The logit biases of the next token after `n_generated` tokens (Ops::bias's row, applied
  // before Ops::penalize): logit_bias, with the end ids at -inf while n_generated < min_tokens.
  // Empty when there are none.
  const BiasList& bias_list(int64_t n_generated) const {
    return n_generated < params_.min_tokens ? held_back_ : bias_;
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
  BiasList bias_;       // logit_bias
  BiasList held_back_;  // logit_bias and the end ids' bans (before min_tokens)
  size_t noted_ = 0;
  PenaltyContext penalty_;
  std::vector<int32_t> slot_;
};

}  // namespace sy
