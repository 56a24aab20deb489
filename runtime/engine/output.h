// The output processor: turns a step's sampled tokens into each request's event. It appends the
// token, decodes its text (cut at a stop string, or holding back a tail that may begin one),
// attaches the logprobs and the prompt logprobs, and says why a request ends: its stop ids or
// end of sequence, its length, or a stop string.
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

#include "runtime/engine/request.h"
#include "runtime/engine/sampling.h"
#include "runtime/engine/scheduler.h"
#include "runtime/engine/sequence.h"
#include "runtime/formats/tokenizer.h"

namespace sy {

// One sequence's result of a step.
struct StepOutput {
  Sequence* seq = nullptr;
  RequestEvent event;
  FinishReason finish = FinishReason::kNone;  // kNone: it goes on
};

class OutputProcessor {
 public:
  OutputProcessor(const Tokenizer& tokenizer, int64_t vocab_size, int64_t context_limit)
      : tokenizer_(tokenizer), vocab_size_(vocab_size), context_limit_(context_limit) {}

  // The outputs of `plan`'s sampled sequences, whose tokens are tokens[i] (one per logit row,
  // the sampled rows first) and logprobs in `sampler`; the prompt logprob rows go to their
  // sequences first, so that a sequence's first token carries all of them.
  void process(const StepPlan& plan, const std::vector<int32_t>& tokens, const StepSampler& sampler,
               std::vector<StepOutput>& out) const;
  // The usage of `seq` for its last event, at `now`.
  static Usage usage(const Sequence& seq, std::chrono::steady_clock::time_point now);

 private:
  // Appends `token` to `seq`, with its text in event; returns why `seq` ends.
  FinishReason append(Sequence& seq, int32_t token, RequestEvent& event) const;
  // The text of `seq`'s new token cut at a stop string (reason becomes kStop), or all of it at
  // the end, or short of a tail that may begin a stop string (held back for the next token).
  std::string text_of(Sequence& seq, int32_t token, FinishReason& reason) const;

  const Tokenizer& tokenizer_;
  int64_t vocab_size_;  // the model's
  int64_t context_limit_;
};

}  // namespace sy
