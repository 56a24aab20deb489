// The output processor (see output.h).
#include "runtime/engine/output.h"

#include <algorithm>

namespace sy {

namespace {

double ms_between(std::chrono::steady_clock::time_point a,
                  std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

}  // namespace

void OutputProcessor::process(const StepPlan& plan, const std::vector<int32_t>& tokens,
                              const StepSampler& sampler, std::vector<StepOutput>& out) const {
  const int64_t vocab = vocab_size_;
  out.clear();
  for (size_t j = 0; j < plan.prompt_rows.size(); ++j) {
    const StepPlan::PromptRow& r = plan.prompt_rows[j];
    Sequence& seq = *r.seq;
    const int64_t row = static_cast<int64_t>(plan.sampled.size() + j);
    SY_CHECK(r.token == seq.prompt_lp_next, "prompt logprobs of token ", r.token, " after ",
             seq.prompt_lp_next - 1);
    seq.prompt_lp.push_back(
        sampler.logprobs(row, std::min<int64_t>(seq.params.prompt_logprobs, vocab)));
    ++seq.prompt_lp_next;
  }
  const auto now = std::chrono::steady_clock::now();
  for (size_t i = 0; i < plan.sampled.size(); ++i) {
    Sequence& seq = *plan.sampled[i];
    StepOutput o;
    o.seq = &seq;
    o.finish = append(seq, tokens[i], o.event);
    if (seq.n_generated() == 1) {
      seq.first_token = now;
      if (seq.params.prompt_logprobs > 0) o.event.prompt_logprobs = std::move(seq.prompt_lp);
    }
    if (seq.params.logprobs > 0)
      o.event.logprobs.push_back(
          sampler.logprobs(static_cast<int64_t>(i), std::min<int64_t>(seq.params.logprobs, vocab)));
    out.push_back(std::move(o));
  }
}

FinishReason OutputProcessor::append(Sequence& seq, int32_t token, RequestEvent& event) const {
  seq.tokens.push_back(token);
  event.token_ids.push_back(token);
  FinishReason reason = FinishReason::kNone;
  const std::vector<int32_t>& stop_ids = seq.params.stop_token_ids;
  const bool eos = !seq.params.ignore_eos && tokenizer_.is_eos(token);
  if (eos || std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end())
    reason = FinishReason::kStop;
  else if (seq.n_generated() >= seq.params.max_tokens ||
           static_cast<int64_t>(seq.tokens.size()) >= context_limit_)
    reason = FinishReason::kLength;
  event.text = text_of(seq, token, reason);
  return reason;
}

std::string OutputProcessor::text_of(Sequence& seq, int32_t token, FinishReason& reason) const {
  // Before min_tokens tokens, stop strings are not looked for (as vLLM).
  std::string text = seq.held + seq.decoder->push(token);
  seq.held.clear();
  size_t cut = std::string::npos;
  const bool stops = seq.n_generated() >= seq.params.sampling.min_tokens;
  if (stops)
    for (const std::string& stop : seq.params.stop) cut = std::min(cut, text.find(stop));
  if (cut != std::string::npos) {
    text.resize(cut);
    reason = FinishReason::kStop;
  } else if (reason != FinishReason::kNone) {
    text += seq.decoder->flush();
  } else if (stops || seq.n_generated() + 1 == seq.params.sampling.min_tokens) {
    // The longest suffix that is a prefix of a stop string waits for the next token (which,
    // one token before min_tokens, is the first one looked at). Stop strings are valid UTF-8,
    // so the held suffix starts at a character boundary.
    size_t keep = 0;
    for (const std::string& stop : seq.params.stop)
      for (size_t n = std::min(stop.size() - 1, text.size()); n > keep; --n)
        if (text.compare(text.size() - n, n, stop, 0, n) == 0) {
          keep = n;
          break;
        }
    seq.held = text.substr(text.size() - keep);
    text.resize(text.size() - keep);
  }
  return text;
}

Usage OutputProcessor::usage(const Sequence& seq, std::chrono::steady_clock::time_point now) {
  Usage u;
  u.prompt_tokens = seq.n_prompt;
  u.completion_tokens = std::max<int64_t>(0, seq.n_generated());
  u.queue_time_ms = ms_between(seq.arrival, seq.started ? seq.first_step : now);
  u.time_to_first_token_ms = seq.n_generated() > 0 ? ms_between(seq.arrival, seq.first_token) : 0;
  u.total_time_ms = ms_between(seq.arrival, now);
  u.preemptions = seq.preemptions;
  u.cached_prompt_tokens = seq.cached_prompt;
  return u;
}

}  // namespace sy
