// The OpenAI-compatible HTTP front door of rank 0, beside the gRPC service and over the same
// Engine: POST /v1/completions, /v1/chat/completions (whole or streamed as server-sent
// events), GET /v1/models, /health, /metrics, POST /tokenize, /detokenize.
//
// A generation call submits its choices to the engine with sinks that queue the events; the
// connection's thread waits on that queue, turns the events into chunks (openai.h's
// ResponseBuilder) and writes them. Between events it polls the socket, so a client that goes
// away cancels its requests within a step or two (their KV blocks are freed at the next step),
// and a stream idle for heartbeat_s gets an SSE comment line.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "runtime/engine/engine.h"
#include "runtime/server/http.h"
#include "runtime/server/open_calls.h"
#include "runtime/server/openai.h"

namespace sy {

class Metrics;

struct OpenAiOptions {
  std::string model_name;     // the id of /v1/models and the accepted "model"
  int64_t context_limit = 0;  // prompt + generated tokens of one request
  int64_t max_logprobs = 20;
  int64_t max_choices = 16;  // prompts x n of one request (--max-completions)
  std::string api_key;       // when set, /v1/* needs "Authorization: Bearer <key>"
  double heartbeat_s = 5;    // an SSE comment after this long without a chunk
  // Renders a chat (openai.h's ApiContext::render_chat); null: chat requests are refused.
  std::function<std::string(const Json& messages, bool add_generation_prompt)> render_chat;
};

class CallQueue;

class OpenAiService {
 public:
  enum class State { kLoading, kServing, kDraining, kFailed };

  // `tokenizer` (and `metrics`, when given) must outlive the service.
  OpenAiService(const Tokenizer& tokenizer, int64_t vocab_size, OpenAiOptions options,
                Metrics* metrics = nullptr);
  ~OpenAiService();

  void attach(Engine* engine);
  void set_state(State state);
  State state() const { return state_.load(); }
  // Ends every open call with 503 `message` and refuses new ones: for when the engine has
  // returned or failed, so that no call waits for events that will never come.
  void close(const std::string& message);

  // The HttpServer handler.
  void handle(const HttpRequest& request, HttpResponder& responder);
  // The JSON error body the HttpServer answers its own errors with.
  static std::pair<std::string, std::string> error_body(int status, const std::string& message);

 private:
  void generate(const HttpRequest& request, HttpResponder& responder, Endpoint endpoint);
  void tokenize(const HttpRequest& request, HttpResponder& responder);
  void detokenize(const HttpRequest& request, HttpResponder& responder);
  void models(const HttpRequest& request, HttpResponder& responder);
  void health(HttpResponder& responder);
  bool authorized(const HttpRequest& request) const;
  ApiContext context(uint64_t seed) const;
  // Registers an open call; null once closed.
  std::shared_ptr<CallQueue> open_call();
  std::string random_id(const char* prefix);

  const Tokenizer& tokenizer_;
  const int64_t vocab_size_;
  const OpenAiOptions options_;
  Metrics* metrics_;
  const int64_t created_;  // the models' "created": the server's start, Unix seconds
  std::atomic<Engine*> engine_{nullptr};
  std::atomic<State> state_{State::kLoading};

  OpenCalls<CallQueue> calls_;
  std::mutex mu_;
  std::mt19937_64 random_;  // ids and seeds (under mu_)
};

}  // namespace sy
