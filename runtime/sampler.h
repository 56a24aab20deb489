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
  // generated so far (for the repetition penalty). Allocates nothing.
  int32_t sample(const float* logits, const std::vector<int32_t>& context);
  // The next uniform number in [0, 1) of this sampler's stream (what sample() draws when the
  // temperature is not 0), for sampling on the device (Ops::sample) with the same stream.
  double draw();
  // The Ops::sample parameters of this sampler's next token, draw included (when the
  // temperature is not 0): out[Ops::kSampleParams]. Only without a repetition penalty (which
  // needs the context, so it samples on the host).
  void device_params(float* out);
  // Whether Ops::sample can take this sampler's tokens (device_params): no repetition penalty.
  bool samples_on_device() const { return params_.repetition_penalty == 1.f; }
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  int64_t vocab_size_;
  std::mt19937_64 rng_;
  std::vector<float> scores_;   // [vocab_size]
  std::vector<int32_t> order_;  // [vocab_size]
  std::vector<uint8_t> seen_;   // [vocab_size]
};

}  // namespace sy
