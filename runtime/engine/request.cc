// The check of a request (see request.h).
#include "runtime/engine/request.h"

namespace sy {

namespace {

[[noreturn]] void bad(const std::string& message) {
  throw RequestError(RequestError::Code::kInvalidArgument, message);
}

std::string str(int64_t v) {
  return std::to_string(v);
}

void check_ids(const std::string& field, const std::vector<int32_t>& ids, int64_t vocab) {
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      bad(token_id_error(field, static_cast<int64_t>(i), ids[i], vocab));
}

void check_lengths(const RequestParams& p, const RequestLimits& l) {
  const int64_t n_prompt = static_cast<int64_t>(p.prompt.size());
  if (n_prompt == 0) bad("prompt: empty (at least 1 token)");
  check_ids("prompt", p.prompt, l.vocab_size);
  if (p.max_tokens < (l.allow_no_tokens ? 0 : 1))
    bad(l.allow_no_tokens ? "max_tokens: must be at least 0" : "max_tokens: must be at least 1");
  if (n_prompt + p.max_tokens > l.context_limit)
    bad("max_tokens: prompt of " + str(n_prompt) + " tokens plus max_tokens " + str(p.max_tokens) +
        " exceeds the context limit of " + str(l.context_limit) + " tokens");
  if (n_prompt > l.max_prompt_tokens)
    bad("prompt: " + str(n_prompt) + " tokens exceed the admission limit of " +
        str(l.max_prompt_tokens) + " prompt tokens (--max-queue-tokens)");
}

void check_stops(const RequestParams& p, const RequestLimits& l) {
  if (static_cast<int64_t>(p.stop.size()) > l.max_stop_strings)
    bad("stop: " + str(static_cast<int64_t>(p.stop.size())) + " stop strings (at most " +
        str(l.max_stop_strings) + ")");
  for (const std::string& s : p.stop)
    if (s.empty() || static_cast<int64_t>(s.size()) > l.max_stop_string_bytes)
      bad("stop: a stop string of " + str(static_cast<int64_t>(s.size())) + " bytes (1 to " +
          str(l.max_stop_string_bytes) + ")");
  if (static_cast<int64_t>(p.stop_token_ids.size()) > l.max_stop_strings)
    bad("stop_token_ids: more than " + str(l.max_stop_strings));
  check_ids("stop_token_ids", p.stop_token_ids, l.vocab_size);
}

void check_sampling(const RequestParams& p, const RequestLimits& l) {
  try {
    p.sampling.validate();
  } catch (const Error& e) {
    bad("sampling: " + e.message());
  }
  for (const auto& [id, value] : p.sampling.logit_bias)
    if (id >= l.vocab_size) bad(token_id_error("logit_bias", -1, id, l.vocab_size));
  if (p.sampling.min_tokens > p.max_tokens)
    bad("min_tokens: " + str(p.sampling.min_tokens) + " exceeds max_tokens " + str(p.max_tokens));
}

void check_logprobs(const RequestParams& p, const RequestLimits& l) {
  if (p.prompt_logprobs < 0 || p.prompt_logprobs > l.max_logprobs)
    bad("prompt_logprobs: " + str(p.prompt_logprobs) + " outside [0, " + str(l.max_logprobs) + "]");
  if (p.prompt_logprobs > 0 && l.prompt_logit_rows == 0)
    bad("prompt_logprobs: this server keeps no logit rows for prompts (its step has " +
        str(l.max_logit_rows) + " logit rows for " + str(l.max_running) + " running sequences)");
  if (p.logprobs < 0 || p.logprobs > l.max_logprobs)
    bad("logprobs: " + str(p.logprobs) + " outside [0, " + str(l.max_logprobs) + "]");
}

}  // namespace

std::string token_id_error(const std::string& field, int64_t index, int64_t id, int64_t vocab) {
  return field + (index >= 0 ? "[" + str(index) + "]" : "") + ": token id " + str(id) +
         " outside the vocabulary of " + str(vocab) + " tokens";
}

void validate_request(const RequestParams& p, const RequestLimits& l) {
  check_lengths(p, l);
  check_sampling(p, l);
  check_stops(p, l);
  check_logprobs(p, l);
}

}  // namespace sy
