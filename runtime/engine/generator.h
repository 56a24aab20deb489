// Single-request generation on one model: chunked prefill of the prompt, then token-by-token
// decode with sampling. Used by `switchyard generate` and by the tests.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "runtime/engine/sampler.h"
#include "runtime/model/loader.h"
#include "runtime/model/model.h"

namespace sy {

struct GenerateOptions {
  int64_t max_tokens = 16;         // tokens to generate at most
  SamplingParams sampling;         // greedy by default
  bool ignore_eos = false;         // keep going past an end-of-sequence token
  std::vector<int64_t> eos_ids;    // tokens that end generation (unless ignore_eos)
  bool all_prompt_logits = false;  // fill GenerateResult::prompt_logits
};

struct GenerateResult {
  std::vector<int32_t> tokens;       // generated ids (the EOS that ended it included)
  std::vector<float> prompt_logits;  // [n_prompt, vocab] when all_prompt_logits
  std::string finish_reason;         // "stop" (EOS) or "length"
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

// Runs one request to completion. `on_token` is called with each generated id as it is sampled.
// With a parallel model every rank calls it with the same arguments; rank 0's sampled token is
// broadcast so all ranks continue in lockstep.
GenerateResult generate(Model& model, const std::vector<int32_t>& prompt,
                        const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token = nullptr);

}  // namespace sy
