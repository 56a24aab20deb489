// The OpenAI API as switchyard speaks it: request bodies of /v1/completions and
// /v1/chat/completions to RequestParams, and engine events to the response objects and stream
// chunks the API defines. Pure functions and one builder, tested without a server; the routes
// and the engine calls are openai_service.h's.
//
// Defaults follow the OpenAI API, not the gRPC one: temperature 1, max_tokens 16 for
// completions and the rest of the context for chat. Range checks beyond the types are the
// engine's (validate_request), shared with gRPC.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/engine/request.h"
#include "runtime/formats/tokenizer.h"

namespace sy {

using Json = nlohmann::json;

// An error as the API returns it: the HTTP status and {"error": {message, type, param, code}}.
class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string message, std::string param = "", std::string code = "");
  int status() const { return status_; }
  const std::string& param() const { return param_; }
  const std::string& code() const { return code_; }
  // invalid_request_error (4xx), authentication_error (401), not_found_error (404),
  // service_unavailable (503), server_error (5xx).
  std::string type() const;
  std::string body() const;  // the JSON object, serialised

 private:
  int status_;
  std::string param_;
  std::string code_;
};

// The error body of `status` with `message` (for errors raised outside the API code).
std::string api_error_body(int status, const std::string& message);
// A RequestError from Engine::submit as the API's error: invalid arguments 400, a full
// admission queue or a draining server 503.
ApiError api_error(const RequestError& e);

enum class Endpoint { kCompletions, kChat };

// What the conversion needs of the server.
struct ApiContext {
  const Tokenizer* tokenizer = nullptr;
  int64_t vocab_size = 0;
  int64_t context_limit = 0;  // prompt + generated tokens of one request
  std::string model;          // the served model's name
  uint64_t default_seed = 0;  // for requests without a seed
  int64_t max_logprobs = 20;  // top logprobs per token at most
  int64_t max_choices = 16;   // prompts x n of one request at most (--max-completions)
  // Renders chat messages (a JSON array) with the model's chat template to the prompt text,
  // special tokens written out ("<s>"); null when the model has none. Throws ApiError.
  std::function<std::string(const Json& messages, bool add_generation_prompt)> render_chat;
};

// One parsed API request: its prompts and everything else the responses need.
struct ApiRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  std::string model;
  std::vector<std::vector<int32_t>> prompts;  // token ids, one per prompt (chat: one)
  std::vector<std::string> prompt_texts;      // their text, for echo
  RequestParams params;                       // all but the prompt and the seed's offset
  int64_t n = 1;                              // choices per prompt
  bool stream = false;
  bool include_usage = false;       // stream_options.include_usage
  bool echo = false;                // completions: the prompt before the text
  std::optional<int64_t> logprobs;  // completions: top-n per token (0: the token's own only)
  bool chat_logprobs = false;       // chat: logprobs
  int64_t top_logprobs = 0;         // chat: top_logprobs
  bool return_token_ids = false;    // vLLM's extra: each choice's token_ids (and prompt's)

  int64_t n_choices() const { return static_cast<int64_t>(prompts.size()) * n; }
  // The engine request of choice `index` (prompt index / n, seed + index % n).
  RequestParams choice_params(int64_t index) const;
};

// Parses and checks `body` for `endpoint`; throws ApiError (400 naming the field, 404 for
// another model's name).
ApiRequest parse_request(const Json& body, Endpoint endpoint, const ApiContext& context);
// The body of a request as JSON; throws ApiError 400 for malformed JSON or a non-object.
Json parse_body(const std::string& body);

// The text of token `id` as the logprobs fields show it: its piece with '▁' as ' ', the byte of a
// byte-fallback piece; "bytes:\xNN" escapes when that is not UTF-8.
std::string token_text(const Tokenizer& tokenizer, int32_t id);

// Builds the responses of one API request from its choices' engine events: stream chunks as
// they come, or the whole response at the end.
class ResponseBuilder {
 public:
  ResponseBuilder(const ApiRequest& request, const Tokenizer& tokenizer, std::string id,
                  int64_t created);

  // The event of choice `index`; returns the stream chunks it makes (JSON texts, without the
  // "data: " framing): none, one, or, on a chat choice's first event, the role chunk first.
  std::vector<std::string> on_event(int64_t index, const RequestEvent& event);
  // The usage chunk of a stream (include_usage).
  std::string usage_chunk() const;
  // The whole response of a non-streamed request, once every choice has finished.
  std::string response() const;
  // Whether every choice has had its last event.
  bool done() const { return n_open_ == 0; }
  // The first choice that ended without a stop or its length (cancelled, failed), if any.
  const RequestEvent* failure() const { return failure_ ? &*failure_ : nullptr; }

 private:
  struct Choice {
    std::string text;
    std::vector<int32_t> token_ids;
    Json logprobs;  // completions: {tokens, token_logprobs, top_logprobs, text_offset};
                    // chat: the content array
    FinishReason finish = FinishReason::kNone;
    bool started = false;  // a chunk was sent (chat: the role chunk)
    bool echoed = false;   // the prompt was put before the text (echo)
    int64_t offset = 0;    // text_offset of the next token (completions)
  };
  Json chunk_base() const;
  Json usage() const;
  // The logprobs of `ids` (with `lps`, and the prompt's when echoing) in the endpoint's form,
  // appended to `choice` and returned for a chunk.
  Json add_logprobs(Choice& choice, const std::vector<int32_t>& ids,
                    const std::vector<TokenLogprobs>& lps, bool prompt);
  Json finish_json(const Choice& choice) const;

  const ApiRequest& request_;
  const Tokenizer& tokenizer_;
  std::string id_;
  int64_t created_;
  std::vector<Choice> choices_;
  int64_t n_open_;
  int64_t prompt_tokens_ = 0;  // each prompt once
  int64_t completion_tokens_ = 0;
  int64_t cached_tokens_ = 0;
  std::optional<RequestEvent> failure_;
};

// "stop" / "length" as the API names a finish reason.
const char* finish_reason_name(FinishReason reason);

}  // namespace sy
