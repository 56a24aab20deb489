// One request inside the engine: its tokens, its place in the KV cache, its sampler and its text
// decoder. The scheduler moves it between waiting and running; the output processor appends its
// tokens and sends its events.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/engine/request.h"
#include "runtime/engine/sampler.h"
#include "runtime/formats/tokenizer.h"

namespace sy {

struct Sequence {
  using Clock = std::chrono::steady_clock;
  uint64_t id = 0;
  RequestParams params;
  std::shared_ptr<RequestSink> sink;
  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int64_t n_prompt = 0;
  int64_t n_computed = 0;       // leading tokens whose keys and values are cached
  std::vector<int32_t> blocks;  // KV block table
  int64_t n_dropped = 0;        // leading blocks given back: out of the attention window (0s)
  int64_t n_recorded = 0;       // leading blocks recorded in the prefix cache
  bool recording = true;        // false once a block's content was found recorded elsewhere
  int64_t cached_prompt = 0;    // prompt tokens found in the prefix cache at admission
  std::vector<TokenLogprobs> prompt_lp;  // prompt logprobs gathered, not yet sent
  int64_t prompt_lp_next = 1;            // the next prompt token whose logprobs are wanted
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<StreamDecoder> decoder;
  std::string held;      // text held back: it may begin a stop string
  bool started = false;  // scheduled at least once (left the admission queue)
  Clock::time_point arrival, first_step, first_token, last_token;
  int64_t preemptions = 0;
  int64_t scheduled = 0;  // tokens of this step

  int64_t n_generated() const { return static_cast<int64_t>(tokens.size()) - n_prompt; }
  // Still owes prompt logprobs: its prompt is computed in full, and asks logit rows.
  bool wants_prompt_rows() const { return params.prompt_logprobs > 0 && prompt_lp_next < n_prompt; }
  // Logit rows for prompt logprobs that its next `take` tokens ask: positions p from n_computed
  // with prompt_lp_next - 1 <= p < n_prompt - 1 (the logits before token p + 1).
  int64_t prompt_rows(int64_t take) const {
    if (!wants_prompt_rows()) return 0;
    const int64_t lo = std::max(n_computed, prompt_lp_next - 1);
    const int64_t hi = std::min(n_computed + take, n_prompt - 1);
    return std::max<int64_t>(0, hi - lo);
  }
  // `take` cut so that it asks at most `rows` prompt logit rows.
  int64_t fit_prompt_rows(int64_t take, int64_t rows) const {
    if (prompt_rows(take) <= rows) return take;
    return std::max(n_computed, prompt_lp_next - 1) - n_computed + rows;
  }
  // Serving order: priority, then arrival (ids grow with submission).
  bool before(const Sequence& o) const {
    return params.priority < o.params.priority ||
           (params.priority == o.params.priority && id < o.id);
  }
};

}  // namespace sy
