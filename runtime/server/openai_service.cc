// The OpenAI-compatible HTTP service (see openai_service.h).
#include "runtime/server/openai_service.h"

#include <algorithm>
#include <cstdio>

#include "runtime/server/metrics.h"

namespace sy {
namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kJson = "application/json";

void send_error(HttpResponder& r, const ApiError& e) {
  HttpResponder::Headers headers;
  if (e.status() == 503) headers.emplace_back("Retry-After", "1");
  r.send(e.status(), kJson, e.body(), headers);
}

void send_json(HttpResponder& r, const Json& j) {
  r.send(200, kJson, j.dump(-1, ' ', false, Json::error_handler_t::replace));
}

// Constant-time comparison: the time taken does not tell how much of a key was right.
bool same_key(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i)
    diff |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
}

ApiError finish_error(const RequestEvent& e) {
  switch (e.finish) {
    case FinishReason::kUnavailable:
      return ApiError(503, e.error.empty() ? "the server stopped" : e.error, "", "unavailable");
    case FinishReason::kCancelled:
      return ApiError(503, "the request was cancelled", "", "cancelled");
    case FinishReason::kDeadline:
      return ApiError(503, "the request ran past its deadline", "", "deadline_exceeded");
    default:
      break;
  }
  return ApiError(500, e.error.empty() ? "internal error" : e.error);
}

}  // namespace

// The events of one call's choices, from the engine thread to the connection's thread.
class CallQueue {
 public:
  void push(int64_t index, RequestEvent event) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      events_.emplace_back(index, std::move(event));
    }
    ready_.notify_one();
  }
  void close(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
      message_ = message;
    }
    ready_.notify_one();
  }
  // Waits up to `timeout` for events; takes them all. False once closed (message set).
  bool wait(std::chrono::milliseconds timeout, std::deque<std::pair<int64_t, RequestEvent>>& out,
            std::string& message) {
    std::unique_lock<std::mutex> lock(mu_);
    ready_.wait_for(lock, timeout, [&] { return !events_.empty() || closed_; });
    out.swap(events_);
    events_.clear();
    message = message_;
    return !closed_ || !out.empty();
  }

 private:
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<std::pair<int64_t, RequestEvent>> events_;
  bool closed_ = false;
  std::string message_;
};

namespace {

class ChoiceSink final : public RequestSink {
 public:
  ChoiceSink(std::shared_ptr<CallQueue> queue, int64_t index)
      : queue_(std::move(queue)), index_(index) {}
  void on_event(RequestEvent event) override { queue_->push(index_, std::move(event)); }

 private:
  std::shared_ptr<CallQueue> queue_;
  int64_t index_;
};

}  // namespace

OpenAiService::OpenAiService(const Tokenizer& tokenizer, int64_t vocab_size, OpenAiOptions options,
                             Metrics* metrics)
    : tokenizer_(tokenizer),
      vocab_size_(vocab_size),
      options_(std::move(options)),
      metrics_(metrics),
      created_(std::chrono::duration_cast<std::chrono::seconds>(
                   std::chrono::system_clock::now().time_since_epoch())
                   .count()),
      random_(std::random_device{}()) {}

OpenAiService::~OpenAiService() = default;

void OpenAiService::attach(Engine* engine) {
  engine_.store(engine);
}

void OpenAiService::set_state(State state) {
  state_.store(state);
}

void OpenAiService::close(const std::string& message) {
  for (const auto& q : calls_.close()) q->close(message);
}

std::shared_ptr<CallQueue> OpenAiService::open_call() {
  auto q = std::make_shared<CallQueue>();
  return calls_.add(q) ? q : nullptr;
}

std::string OpenAiService::random_id(const char* prefix) {
  std::lock_guard<std::mutex> lock(mu_);
  char hex[40];
  std::snprintf(hex, sizeof hex, "%016llx%016llx", static_cast<unsigned long long>(random_()),
                static_cast<unsigned long long>(random_()));
  return std::string(prefix) + hex;
}

ApiContext OpenAiService::context(uint64_t seed) const {
  ApiContext c;
  c.tokenizer = &tokenizer_;
  c.vocab_size = vocab_size_;
  c.context_limit = options_.context_limit;
  c.model = options_.model_name;
  c.default_seed = seed;
  c.max_logprobs = options_.max_logprobs;
  c.max_choices = options_.max_choices;
  c.render_chat = options_.render_chat;
  return c;
}

std::pair<std::string, std::string> OpenAiService::error_body(int status,
                                                              const std::string& message) {
  return {kJson, api_error_body(status, message)};
}

bool OpenAiService::authorized(const HttpRequest& request) const {
  if (options_.api_key.empty()) return true;
  std::string_view auth = request.header("authorization");
  constexpr std::string_view kBearer = "Bearer ";
  if (!auth.starts_with(kBearer)) return false;
  return same_key(auth.substr(kBearer.size()), options_.api_key);
}

void OpenAiService::handle(const HttpRequest& request, HttpResponder& responder) {
  const std::string& path = request.path;
  const bool get = request.method == "GET";
  const bool post = request.method == "POST";
  try {
    if (path == "/health") {
      if (!get) throw ApiError(405, "use GET for " + path);
      return health(responder);
    }
    if (path == "/metrics" && metrics_ != nullptr) {
      if (!get) throw ApiError(405, "use GET for " + path);
      return responder.send(200, "text/plain; version=0.0.4; charset=utf-8", metrics_->render());
    }
    const bool api = path.starts_with("/v1/") || path == "/tokenize" || path == "/detokenize";
    if (api && !authorized(request))
      throw ApiError(401, "a valid API key is needed: Authorization: Bearer <key>", "",
                     "invalid_api_key");
    if (path == "/v1/completions" || path == "/v1/chat/completions") {
      if (!post) throw ApiError(405, "use POST for " + path);
      return generate(request, responder,
                      path == "/v1/completions" ? Endpoint::kCompletions : Endpoint::kChat);
    }
    if (path == "/v1/models" || path.starts_with("/v1/models/")) {
      if (!get) throw ApiError(405, "use GET for " + path);
      return models(request, responder);
    }
    if (path == "/tokenize" || path == "/detokenize") {
      if (!post) throw ApiError(405, "use POST for " + path);
      return path == "/tokenize" ? tokenize(request, responder) : detokenize(request, responder);
    }
    throw ApiError(404, "no such path: " + path);
  } catch (const ApiError& e) {
    if (!responder.answered()) send_error(responder, e);
  }
}

void OpenAiService::health(HttpResponder& responder) {
  switch (state_.load()) {
    case State::kServing:
      return responder.send(200, kJson, R"({"status":"serving"})");
    case State::kLoading:
      return responder.send(503, kJson, R"({"status":"loading"})", {{"Retry-After", "1"}});
    case State::kDraining:
      return responder.send(503, kJson, R"({"status":"draining"})");
    case State::kFailed:
      break;
  }
  responder.send(503, kJson, R"({"status":"failed"})");
}

void OpenAiService::models(const HttpRequest& request, HttpResponder& responder) {
  const Json model = {{"id", options_.model_name},
                      {"object", "model"},
                      {"created", created_},
                      {"owned_by", "switchyard"},
                      {"max_model_len", options_.context_limit},
                      {"vocab_size", vocab_size_}};  // an extension, for load generators
  if (request.path == "/v1/models")
    return send_json(responder, {{"object", "list"}, {"data", {model}}});
  const std::string name = request.path.substr(std::string_view("/v1/models/").size());
  if (name != options_.model_name)
    throw ApiError(404, "The model '" + name + "' does not exist", "model", "model_not_found");
  send_json(responder, model);
}

void OpenAiService::tokenize(const HttpRequest& request, HttpResponder& responder) {
  const Json body = parse_body(request.body);
  ApiContext c = context(0);
  std::vector<int32_t> ids;
  if (body.contains("messages")) {
    ids = parse_request(body, Endpoint::kChat, c).prompts.front();
  } else {
    Json b = body;
    b.erase("max_tokens");
    ids = parse_request(b, Endpoint::kCompletions, c).prompts.front();
  }
  send_json(responder,
            {{"tokens", ids}, {"count", ids.size()}, {"max_model_len", options_.context_limit}});
}

void OpenAiService::detokenize(const HttpRequest& request, HttpResponder& responder) {
  const Json body = parse_body(request.body);
  const auto it = body.find("tokens");
  if (it == body.end() || !it->is_array())
    throw ApiError(400, "tokens: must be an array of token ids", "tokens");
  std::vector<int32_t> ids;
  for (size_t i = 0; i < it->size(); ++i) {
    const Json& v = (*it)[i];
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= vocab_size_)
      throw ApiError(400,
                     "tokens[" + std::to_string(i) + "]: must be a token id in [0, " +
                         std::to_string(vocab_size_) + ")",
                     "tokens");
    ids.push_back(v.get<int32_t>());
  }
  send_json(responder, {{"prompt", tokenizer_.decode(ids)}});
}

void OpenAiService::generate(const HttpRequest& request, HttpResponder& responder,
                             Endpoint endpoint) {
  Engine* engine = engine_.load();
  if (engine == nullptr || state_.load() == State::kLoading)
    throw ApiError(503, "the model is still loading", "", "loading");
  const Json body = parse_body(request.body);
  uint64_t seed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    seed = random_();
  }
  const ApiRequest api = parse_request(body, endpoint, context(seed));
  const int64_t n_choices = api.n_choices();
  std::shared_ptr<CallQueue> queue = open_call();
  if (queue == nullptr) throw ApiError(503, "the server is shutting down", "", "unavailable");
  std::vector<RequestParams> params;
  std::vector<std::shared_ptr<RequestSink>> sinks;
  for (int64_t i = 0; i < n_choices; ++i) {
    params.push_back(api.choice_params(i));
    sinks.push_back(std::make_shared<ChoiceSink>(queue, i));
  }
  std::vector<uint64_t> ids;
  try {
    ids = engine->submit_all(std::move(params), std::move(sinks));
  } catch (const RequestError& e) {
    throw api_error(e);
  }
  auto cancel = [&] {  // the client went away: its requests end, and it gets no response
    for (uint64_t id : ids) engine->cancel(id);
    responder.abandon();
  };

  ResponseBuilder builder(api, tokenizer_,
                          random_id(endpoint == Endpoint::kChat ? "chatcmpl-" : "cmpl-"),
                          std::chrono::duration_cast<std::chrono::seconds>(
                              std::chrono::system_clock::now().time_since_epoch())
                              .count());
  if (api.stream &&
      !responder.begin_stream(200, "text/event-stream", {{"Cache-Control", "no-cache"}})) {
    return cancel();
  }
  const auto heartbeat =
      std::chrono::milliseconds(static_cast<int64_t>(options_.heartbeat_s * 1e3));
  auto last_write = Clock::now();
  std::deque<std::pair<int64_t, RequestEvent>> events;
  std::string closed_message;
  while (!builder.done() && builder.failure() == nullptr) {
    if (!queue->wait(std::chrono::milliseconds(50), events, closed_message)) {
      const ApiError e(503, closed_message, "", "unavailable");
      if (!api.stream) throw e;
      responder.write("data: " + e.body() + "\n\ndata: [DONE]\n\n");
      return;
    }
    std::string out;
    for (auto& [index, event] : events)
      for (const std::string& chunk : builder.on_event(index, event))
        out += "data: " + chunk + "\n\n";
    if (api.stream && !out.empty()) {
      if (!responder.write(out)) return cancel();
      last_write = Clock::now();
    }
    if (responder.client_gone()) return cancel();
    if (api.stream && Clock::now() - last_write >= heartbeat) {
      if (!responder.write(": keep-alive\n\n")) return cancel();
      last_write = Clock::now();
    }
  }
  if (const RequestEvent* failure = builder.failure()) {
    for (uint64_t id : ids) engine->cancel(id);  // the other choices of the call
    const ApiError e = finish_error(*failure);
    if (!api.stream) throw e;
    responder.write("data: " + e.body() + "\n\ndata: [DONE]\n\n");
    return;
  }
  if (!api.stream) return responder.send(200, kJson, builder.response());
  std::string tail;
  if (api.include_usage) tail += "data: " + builder.usage_chunk() + "\n\n";
  tail += "data: [DONE]\n\n";
  responder.write(tail);
}

}  // namespace sy
