// A request as the engine takes it, the events it sends back, and the one check of a request
// against a server's limits (validate_request), which the engine, generate() and the RPC
// service's conversions share.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/engine/sampler.h"
#include "runtime/engine/sampling.h"

namespace sy {

// Why a request was refused at submit(); maps to a gRPC status code.
class RequestError : public Error {
 public:
  enum class Code { kInvalidArgument, kResourceExhausted, kUnavailable };
  RequestError(Code code, const std::string& message) : Error(message), code_(code) {}
  Code code() const { return code_; }

 private:
  Code code_;
};

struct RequestParams {
  std::vector<int32_t> prompt;  // token ids (BOS already added for text prompts)
  int64_t max_tokens = 16;      // tokens to generate at most
  SamplingParams sampling;
  std::vector<std::string> stop;        // stop strings (not included in the output)
  std::vector<int32_t> stop_token_ids;  // tokens that end generation (included in the output)
  bool ignore_eos = false;
  int64_t logprobs = 0;  // top-n logprobs per token; 0 = none
  // Top-n logprobs of each prompt token after the first, given the tokens before it; 0 = none.
  // Such a request computes its whole prompt (no prefix cache) in chunks that fit the step's
  // prompt logit rows (Engine::prompt_logit_rows).
  int64_t prompt_logprobs = 0;
  std::optional<std::chrono::steady_clock::time_point> deadline;
  // Lower values are served first; first come first served within one value. A waiting request
  // takes step tokens, running slots and KV blocks from running requests of higher values.
  int32_t priority = 0;
};

// What a server takes of one request.
struct RequestLimits {
  int64_t vocab_size = 0;
  int64_t context_limit = 0;  // prompt plus max_tokens
  int64_t max_prompt_tokens = 1 << 20;
  int64_t max_stop_strings = 16;  // stop strings, and stop token ids
  int64_t max_stop_string_bytes = 256;
  int64_t max_logprobs = 20;
  int64_t prompt_logit_rows = 0;  // 0 refuses prompt logprobs
  // For the refusal's message: the step's logit rows and running sequences.
  int64_t max_logit_rows = 0;
  int64_t max_running = 0;
  bool allow_no_tokens = false;  // max_tokens 0: the prompt's logits alone (generate())
};

// Throws RequestError (kInvalidArgument) naming the first field outside `limits`.
void validate_request(const RequestParams& params, const RequestLimits& limits);
// "<field>[<index>]: token id <id> outside the vocabulary of <vocab> tokens": the message of
// every token id check (index -1 leaves it out).
std::string token_id_error(const std::string& field, int64_t index, int64_t id, int64_t vocab);

enum class FinishReason { kNone, kStop, kLength, kCancelled, kDeadline, kError, kUnavailable };

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double queue_time_ms = 0;
  double time_to_first_token_ms = 0;
  double total_time_ms = 0;
  int64_t preemptions = 0;
  // Prompt tokens whose keys and values came from the prefix cache.
  int64_t cached_prompt_tokens = 0;
};

// One message of a request's stream. The last one has finish != kNone and carries usage.
struct RequestEvent {
  std::string text;                // new text, never ending inside a UTF-8 character
  std::vector<int32_t> token_ids;  // tokens since the last event
  std::vector<TokenLogprobs> logprobs;
  std::vector<TokenLogprobs> prompt_logprobs;  // on the first event with a token, when asked
  FinishReason finish = FinishReason::kNone;
  Usage usage;
  std::string error;  // for kError / kUnavailable
};

// Receives a request's events, on the engine thread. Must not block.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  virtual void on_event(RequestEvent event) = 0;
};

}  // namespace sy
