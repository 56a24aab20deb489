// The OpenAI API's request and response objects (see openai.h).
#include "runtime/server/openai.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace sy {
namespace {

using Code = RequestError::Code;

ApiError bad(const std::string& param, const std::string& message) {
  return ApiError(400, param.empty() ? message : param + ": " + message, param);
}

// The field, or null when absent or JSON null.
const Json* field(const Json& body, const char* name) {
  const auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

double number(const Json& body, const char* name, double fallback) {
  const Json* v = field(body, name);
  if (v == nullptr) return fallback;
  if (!v->is_number()) throw bad(name, "must be a number");
  const double x = v->get<double>();
  if (!std::isfinite(x)) throw bad(name, "must be finite");
  return x;
}

int64_t as_integer(const Json& v, const std::string& name) {
  if (v.is_number_integer()) {
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      throw bad(name, "is out of range");
    return v.get<int64_t>();
  }
  if (v.is_number_float()) {
    const double x = v.get<double>();
    if (std::isfinite(x) && x == std::floor(x) && std::fabs(x) < 9.0e15)
      return static_cast<int64_t>(x);
  }
  throw bad(name, "must be an integer");
}

std::optional<int64_t> integer(const Json& body, const char* name) {
  const Json* v = field(body, name);
  if (v == nullptr) return std::nullopt;
  return as_integer(*v, name);
}

bool boolean(const Json& body, const char* name, bool fallback) {
  const Json* v = field(body, name);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) throw bad(name, "must be a boolean");
  return v->get<bool>();
}

std::string string_field(const Json& body, const char* name) {
  const Json* v = field(body, name);
  if (v == nullptr) return {};
  if (!v->is_string()) throw bad(name, "must be a string");
  return v->get<std::string>();
}

int32_t token_id(const Json& v, const std::string& name, int64_t vocab) {
  const int64_t id = as_integer(v, name);
  if (id < 0 || id >= vocab)
    throw bad(name, "token id " + std::to_string(id) + " outside the vocabulary of " +
                        std::to_string(vocab) + " tokens");
  return static_cast<int32_t>(id);
}

std::vector<int32_t> token_ids(const Json& array, const std::string& name, int64_t vocab) {
  if (array.empty()) throw bad(name, "is empty");
  std::vector<int32_t> ids;
  ids.reserve(array.size());
  for (size_t i = 0; i < array.size(); ++i)
    ids.push_back(token_id(array[i], name + "[" + std::to_string(i) + "]", vocab));
  return ids;
}

std::vector<int32_t> encode(const ApiContext& c, const std::string& text, bool add_bos,
                            const std::string& name) {
  if (text.empty()) throw bad(name, "is empty");
  std::vector<int32_t> ids;
  try {
    ids = c.tokenizer->encode(text, add_bos);
  } catch (const std::exception& e) {
    const auto* error = dynamic_cast<const Error*>(&e);
    throw bad(name, error ? error->message() : e.what());
  }
  if (ids.empty()) throw bad(name, "encodes to no tokens");
  return ids;
}

// prompt: a string, a list of strings, a list of token ids, or a list of lists of ids.
void parse_prompt(const Json& body, const ApiContext& c, ApiRequest& r) {
  const Json* prompt = field(body, "prompt");
  if (prompt == nullptr) throw bad("prompt", "is required");
  const bool add_bos = boolean(body, "add_special_tokens", true);
  auto add_text = [&](const Json& v, const std::string& name) {
    if (!v.is_string()) throw bad(name, "must be a string");
    r.prompt_texts.push_back(v.get<std::string>());
    r.prompts.push_back(encode(c, r.prompt_texts.back(), add_bos, name));
  };
  auto add_ids = [&](const Json& v, const std::string& name) {
    r.prompts.push_back(token_ids(v, name, c.vocab_size));
    r.prompt_texts.push_back(c.tokenizer->decode(r.prompts.back()));
  };
  if (prompt->is_string()) return add_text(*prompt, "prompt");
  if (!prompt->is_array()) throw bad("prompt", "must be a string, or an array of them or of ids");
  if (prompt->empty()) throw bad("prompt", "is empty");
  const Json& first = prompt->front();
  if (first.is_number()) return add_ids(*prompt, "prompt");
  for (size_t i = 0; i < prompt->size(); ++i) {
    const Json& p = (*prompt)[i];
    const std::string name = "prompt[" + std::to_string(i) + "]";
    if (p.is_string() && first.is_string()) {
      add_text(p, name);
    } else if (p.is_array() && first.is_array()) {
      add_ids(p, name);
    } else {
      throw bad(name, "the prompts of one array must all be strings or all arrays of ids");
    }
  }
}

// The text of a message's content: a string, or the text parts of an array.
std::string content_text(const Json& content, const std::string& name) {
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) throw bad(name, "must be a string or an array of content parts");
  std::string text;
  for (size_t i = 0; i < content.size(); ++i) {
    const Json& part = content[i];
    const std::string pname = name + "[" + std::to_string(i) + "]";
    if (!part.is_object() || string_field(part, "type") != "text")
      throw bad(pname, "only parts of type \"text\" are supported");
    const Json* t = field(part, "text");
    if (t == nullptr || !t->is_string()) throw bad(pname + ".text", "must be a string");
    text += t->get<std::string>();
  }
  return text;
}

void parse_messages(const Json& body, const ApiContext& c, ApiRequest& r) {
  const Json* messages = field(body, "messages");
  if (messages == nullptr) throw bad("messages", "is required");
  if (!messages->is_array() || messages->empty())
    throw bad("messages", "must be a non-empty array");
  Json normal = Json::array();
  for (size_t i = 0; i < messages->size(); ++i) {
    const Json& m = (*messages)[i];
    const std::string name = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) throw bad(name, "must be an object");
    const Json* role = field(m, "role");
    if (role == nullptr || !role->is_string()) throw bad(name + ".role", "must be a string");
    const std::string rs = role->get<std::string>();
    if (rs != "system" && rs != "user" && rs != "assistant" && rs != "developer")
      throw bad(name + ".role", "'" + rs + "' is not one of system, developer, user, assistant");
    const Json* content = field(m, "content");
    if (content == nullptr) throw bad(name + ".content", "is required");
    normal.push_back({{"role", rs == "developer" ? "system" : rs},
                      {"content", content_text(*content, name + ".content")}});
  }
  if (!c.render_chat)
    throw bad("messages", "the model has no chat template (serve --chat-template FILE)");
  const bool add_generation_prompt = boolean(body, "add_generation_prompt", true);
  std::string text = c.render_chat(normal, add_generation_prompt);
  std::vector<int32_t> ids;
  try {
    ids = c.tokenizer->encode_with_special_tokens(text);
  } catch (const std::exception& e) {
    const auto* error = dynamic_cast<const Error*>(&e);
    throw bad("messages", error ? error->message() : e.what());
  }
  if (ids.empty()) throw bad("messages", "render to no tokens");
  r.prompts.push_back(std::move(ids));
  r.prompt_texts.push_back(std::move(text));
}

void parse_stops(const Json& body, const ApiContext& c, RequestParams& p) {
  if (const Json* stop = field(body, "stop")) {
    if (stop->is_string()) {
      p.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (size_t i = 0; i < stop->size(); ++i) {
        if (!(*stop)[i].is_string())
          throw bad("stop[" + std::to_string(i) + "]", "must be a string");
        p.stop.push_back((*stop)[i].get<std::string>());
      }
    } else {
      throw bad("stop", "must be a string or an array of strings");
    }
  }
  if (const Json* ids = field(body, "stop_token_ids")) {
    if (!ids->is_array()) throw bad("stop_token_ids", "must be an array of token ids");
    for (size_t i = 0; i < ids->size(); ++i)
      p.stop_token_ids.push_back(
          token_id((*ids)[i], "stop_token_ids[" + std::to_string(i) + "]", c.vocab_size));
  }
}

void parse_logit_bias(const Json& body, const ApiContext& c, RequestParams& p) {
  const Json* bias = field(body, "logit_bias");
  if (bias == nullptr) return;
  if (!bias->is_object()) throw bad("logit_bias", "must be an object of token id to bias");
  for (const auto& [key, value] : bias->items()) {
    const std::string name = "logit_bias[" + key + "]";
    int64_t id = -1;
    if (key.empty() || key.size() > 12 ||
        !std::all_of(key.begin(), key.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
      throw bad(name, "the key must be a token id");
    id = std::stoll(key);
    if (id >= c.vocab_size)
      throw bad(name, "token id " + key + " outside the vocabulary of " +
                          std::to_string(c.vocab_size) + " tokens");
    if (!value.is_number()) throw bad(name, "must be a number");
    p.sampling.logit_bias.emplace_back(static_cast<int32_t>(id), value.get<float>());
  }
  std::sort(p.sampling.logit_bias.begin(), p.sampling.logit_bias.end());
}

// Sampling, lengths and stops, shared by both endpoints.
void parse_params(const Json& body, const ApiContext& c, ApiRequest& r) {
  RequestParams& p = r.params;
  std::optional<int64_t> max_tokens = integer(body, "max_tokens");
  if (r.endpoint == Endpoint::kChat)
    if (auto m = integer(body, "max_completion_tokens")) max_tokens = m;
  if (max_tokens.has_value() && *max_tokens < 1)
    throw bad(r.endpoint == Endpoint::kChat && field(body, "max_completion_tokens")
                  ? "max_completion_tokens"
                  : "max_tokens",
              "must be at least 1");
  if (max_tokens.has_value()) {
    p.max_tokens = *max_tokens;
  } else if (r.endpoint == Endpoint::kChat) {
    // The rest of the context; at least 1, so that an over-long prompt gets the engine's error.
    p.max_tokens =
        std::max<int64_t>(1, c.context_limit - static_cast<int64_t>(r.prompts.front().size()));
  } else {
    p.max_tokens = 16;
  }
  p.sampling.temperature = static_cast<float>(number(body, "temperature", 1.0));
  p.sampling.top_p = static_cast<float>(number(body, "top_p", 1.0));
  const int64_t top_k = integer(body, "top_k").value_or(0);
  p.sampling.top_k = top_k == -1 ? 0 : top_k;  // -1 is "off" to vLLM's clients
  p.sampling.min_p = static_cast<float>(number(body, "min_p", 0.0));
  p.sampling.repetition_penalty = static_cast<float>(number(body, "repetition_penalty", 1.0));
  p.sampling.presence_penalty = static_cast<float>(number(body, "presence_penalty", 0.0));
  p.sampling.frequency_penalty = static_cast<float>(number(body, "frequency_penalty", 0.0));
  const std::optional<int64_t> seed = integer(body, "seed");
  p.sampling.seed = seed ? static_cast<uint64_t>(*seed) : c.default_seed;
  p.sampling.min_tokens = integer(body, "min_tokens").value_or(0);
  p.ignore_eos = boolean(body, "ignore_eos", false);
  parse_stops(body, c, p);
  parse_logit_bias(body, c, p);
  if (const Json* v = field(body, "priority")) {
    const int64_t priority = as_integer(*v, "priority");
    if (priority < INT32_MIN || priority > INT32_MAX) throw bad("priority", "is out of range");
    p.priority = static_cast<int32_t>(priority);
  }
}

void parse_logprobs(const Json& body, const ApiContext& c, ApiRequest& r) {
  if (r.endpoint == Endpoint::kCompletions) {
    if (const Json* v = field(body, "logprobs")) {
      if (v->is_boolean()) throw bad("logprobs", "must be an integer (the top logprobs per token)");
      const int64_t k = as_integer(*v, "logprobs");
      if (k < 0 || k > c.max_logprobs)
        throw bad("logprobs", "must be in [0, " + std::to_string(c.max_logprobs) + "]");
      r.logprobs = k;
      r.params.logprobs = std::max<int64_t>(1, k);
      if (r.echo) r.params.prompt_logprobs = std::max<int64_t>(1, k);
    }
    return;
  }
  r.chat_logprobs = boolean(body, "logprobs", false);
  const std::optional<int64_t> top = integer(body, "top_logprobs");
  if (top.has_value()) {
    if (*top < 0 || *top > c.max_logprobs)
      throw bad("top_logprobs", "must be in [0, " + std::to_string(c.max_logprobs) + "]");
    if (!r.chat_logprobs) throw bad("top_logprobs", "needs logprobs: true");
    r.top_logprobs = *top;
  }
  if (r.chat_logprobs) r.params.logprobs = std::max<int64_t>(1, r.top_logprobs);
}

void reject_unsupported(const Json& body, const ApiRequest& r) {
  if (field(body, "suffix") != nullptr) throw bad("suffix", "is not supported");
  if (auto best_of = integer(body, "best_of"); best_of && *best_of != r.n)
    throw bad("best_of", "is not supported (other than equal to n)");
  if (const Json* tools = field(body, "tools"); tools && !(tools->is_array() && tools->empty()))
    throw bad("tools", "tool calls are not supported");
  if (const Json* format = field(body, "response_format")) {
    if (!format->is_object() || string_field(*format, "type") != "text")
      throw bad("response_format", "only {\"type\": \"text\"} is supported");
  }
}

constexpr float kMinLogprob = -9999.f;  // JSON has no -inf

float clamp_logprob(float lp) {
  return std::isfinite(lp) ? lp : kMinLogprob;
}

Json bytes_json(const std::string& s) {
  Json out = Json::array();
  for (char ch : s) out.push_back(static_cast<int>(static_cast<unsigned char>(ch)));
  return out;
}

}  // namespace

// ---- errors -------------------------------------------------------------------------------------

ApiError::ApiError(int status, std::string message, std::string param, std::string code)
    : std::runtime_error(std::move(message)),
      status_(status),
      param_(std::move(param)),
      code_(std::move(code)) {}

std::string ApiError::type() const {
  if (status_ == 401) return "authentication_error";
  if (status_ == 404) return "not_found_error";
  if (status_ == 503) return "service_unavailable";
  if (status_ >= 500) return "server_error";
  return "invalid_request_error";
}

std::string ApiError::body() const {
  Json error = {{"message", what()},
                {"type", type()},
                {"param", param_.empty() ? Json() : Json(param_)},
                {"code", code_.empty() ? Json() : Json(code_)}};
  return Json{{"error", error}}.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string api_error_body(int status, const std::string& message) {
  return ApiError(status, message).body();
}

ApiError api_error(const RequestError& e) {
  switch (e.code()) {
    case Code::kInvalidArgument:
      return ApiError(400, e.message());
    case Code::kResourceExhausted:
      return ApiError(503, e.message(), "", "queue_full");
    case Code::kUnavailable:
      break;
  }
  return ApiError(503, e.message(), "", "unavailable");
}

// ---- requests -----------------------------------------------------------------------------------

RequestParams ApiRequest::choice_params(int64_t index) const {
  RequestParams p = params;
  p.prompt = prompts[static_cast<size_t>(index / n)];
  p.sampling.seed += static_cast<uint64_t>(index % n);
  return p;
}

Json parse_body(const std::string& body) {
  Json j = Json::parse(body, nullptr, false);
  if (j.is_discarded()) throw ApiError(400, "the body is not valid JSON");
  if (!j.is_object()) throw ApiError(400, "the body must be a JSON object");
  return j;
}

ApiRequest parse_request(const Json& body, Endpoint endpoint, const ApiContext& c) {
  ApiRequest r;
  r.endpoint = endpoint;
  if (const Json* model = field(body, "model")) {
    if (!model->is_string()) throw bad("model", "must be a string");
    r.model = model->get<std::string>();
    if (r.model != c.model)
      throw ApiError(
          404, "The model '" + r.model + "' does not exist (this server serves '" + c.model + "')",
          "model", "model_not_found");
  }
  r.model = c.model;
  if (endpoint == Endpoint::kCompletions) {
    parse_prompt(body, c, r);
    r.echo = boolean(body, "echo", false);
  } else {
    parse_messages(body, c, r);
  }
  const int64_t n = integer(body, "n").value_or(1);
  if (n < 1) throw bad("n", "must be at least 1");
  // Before anything is made per choice.
  const int64_t n_prompts = static_cast<int64_t>(r.prompts.size());
  if (n > c.max_choices || n_prompts > c.max_choices / n)
    throw bad(n > c.max_choices ? "n" : "prompt",
              std::to_string(n_prompts) + " prompts x n " + std::to_string(n) +
                  " choices exceed the server's " + std::to_string(c.max_choices) +
                  " (--max-completions)");
  r.n = n;
  r.stream = boolean(body, "stream", false);
  if (const Json* options = field(body, "stream_options")) {
    if (!r.stream) throw bad("stream_options", "is only allowed with stream: true");
    if (!options->is_object()) throw bad("stream_options", "must be an object");
    r.include_usage = boolean(*options, "include_usage", false);
  }
  string_field(body, "user");  // accepted, type-checked, unused
  r.return_token_ids = boolean(body, "return_token_ids", false);
  parse_params(body, c, r);
  parse_logprobs(body, c, r);
  reject_unsupported(body, r);
  return r;
}

std::string token_text(const Tokenizer& tokenizer, int32_t id) {
  const std::string bytes = tokenizer.token_bytes(id);
  if (is_utf8(bytes)) return bytes;
  std::string out = "bytes:";
  for (char ch : bytes) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "\\x%02x", static_cast<unsigned char>(ch));
    out += hex;
  }
  return out;
}

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kNone:
      return "";
    case FinishReason::kCancelled:
    case FinishReason::kDeadline:
      return "abort";
    case FinishReason::kError:
    case FinishReason::kUnavailable:
      break;
  }
  return "error";
}

// ---- responses ----------------------------------------------------------------------------------

ResponseBuilder::ResponseBuilder(const ApiRequest& request, const Tokenizer& tokenizer,
                                 std::string id, int64_t created)
    : request_(request),
      tokenizer_(tokenizer),
      id_(std::move(id)),
      created_(created),
      choices_(static_cast<size_t>(request.n_choices())),
      n_open_(request.n_choices()) {
  for (const auto& p : request.prompts) prompt_tokens_ += static_cast<int64_t>(p.size());
  for (Choice& c : choices_) {
    if (request.endpoint == Endpoint::kChat) {
      c.logprobs = Json::array();
    } else {
      c.logprobs = {{"tokens", Json::array()},
                    {"token_logprobs", Json::array()},
                    {"top_logprobs", Json::array()},
                    {"text_offset", Json::array()}};
    }
  }
}

Json ResponseBuilder::chunk_base() const {
  Json j = {{"id", id_},
            {"object",
             request_.endpoint == Endpoint::kChat ? "chat.completion.chunk" : "text_completion"},
            {"created", created_},
            {"model", request_.model},
            {"choices", Json::array()}};
  if (request_.include_usage) j["usage"] = nullptr;
  return j;
}

Json ResponseBuilder::usage() const {
  return {{"prompt_tokens", prompt_tokens_},
          {"completion_tokens", completion_tokens_},
          {"total_tokens", prompt_tokens_ + completion_tokens_},
          {"prompt_tokens_details", {{"cached_tokens", cached_tokens_}}}};
}

Json ResponseBuilder::add_logprobs(Choice& choice, const std::vector<int32_t>& ids,
                                   const std::vector<TokenLogprobs>& lps, bool prompt) {
  // lps[i] belongs to ids[i + skip]: the prompt's first token has none.
  const size_t skip = prompt ? 1 : 0;
  if (request_.endpoint == Endpoint::kChat) {
    Json content = Json::array();
    for (size_t i = 0; i < ids.size() && i < lps.size(); ++i) {
      const std::string bytes = tokenizer_.token_bytes(ids[i]);
      Json top = Json::array();
      for (size_t k = 0; k < lps[i].top.size() && static_cast<int64_t>(k) < request_.top_logprobs;
           ++k) {
        const std::string tb = tokenizer_.token_bytes(lps[i].top[k].token_id);
        top.push_back({{"token", token_text(tokenizer_, lps[i].top[k].token_id)},
                       {"logprob", clamp_logprob(lps[i].top[k].logprob)},
                       {"bytes", bytes_json(tb)}});
      }
      content.push_back({{"token", token_text(tokenizer_, ids[i])},
                         {"logprob", clamp_logprob(lps[i].logprob)},
                         {"bytes", bytes_json(bytes)},
                         {"top_logprobs", std::move(top)}});
    }
    for (const Json& c : content) choice.logprobs.push_back(c);
    return {{"content", std::move(content)}};
  }
  const int64_t k_top = request_.logprobs.value_or(0);
  Json part = {{"tokens", Json::array()},
               {"token_logprobs", Json::array()},
               {"top_logprobs", Json::array()},
               {"text_offset", Json::array()}};
  for (size_t i = 0; i < ids.size(); ++i) {
    const std::string text = token_text(tokenizer_, ids[i]);
    part["tokens"].push_back(text);
    part["text_offset"].push_back(choice.offset);
    choice.offset += static_cast<int64_t>(tokenizer_.token_bytes(ids[i]).size());
    if (i < skip || i - skip >= lps.size()) {
      part["token_logprobs"].push_back(nullptr);
      part["top_logprobs"].push_back(nullptr);
      continue;
    }
    const TokenLogprobs& lp = lps[i - skip];
    part["token_logprobs"].push_back(clamp_logprob(lp.logprob));
    Json top = Json::object();
    for (size_t k = 0; k < lp.top.size() && static_cast<int64_t>(k) < k_top; ++k)
      top[token_text(tokenizer_, lp.top[k].token_id)] = clamp_logprob(lp.top[k].logprob);
    top[text] = clamp_logprob(lp.logprob);  // the chosen token, always
    part["top_logprobs"].push_back(std::move(top));
  }
  for (const char* key : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
    for (const Json& v : part[key]) choice.logprobs[key].push_back(v);
  return part;
}

std::vector<std::string> ResponseBuilder::on_event(int64_t index, const RequestEvent& e) {
  SY_CHECK(index >= 0 && index < static_cast<int64_t>(choices_.size()), "choice ", index,
           " out of range");
  Choice& choice = choices_[static_cast<size_t>(index)];
  std::vector<std::string> chunks;
  if (choice.finish != FinishReason::kNone) return chunks;
  const bool chat = request_.endpoint == Endpoint::kChat;
  const bool want_logprobs = chat ? request_.chat_logprobs : request_.logprobs.has_value();
  std::string text = e.text;
  Json logprobs = nullptr;
  if (!chat && request_.echo && !choice.echoed) {
    choice.echoed = true;
    const size_t p = static_cast<size_t>(index / request_.n);
    text = request_.prompt_texts[p] + text;
    if (want_logprobs) {
      logprobs = add_logprobs(choice, request_.prompts[p], e.prompt_logprobs, true);
      // The text of the generated tokens starts after the prompt's.
      choice.offset = static_cast<int64_t>(request_.prompt_texts[p].size());
    }
  }
  if (want_logprobs && !e.token_ids.empty()) {
    Json part = add_logprobs(choice, e.token_ids, e.logprobs, false);
    if (logprobs.is_null()) {
      logprobs = std::move(part);
    } else {
      for (const char* key : {"tokens", "token_logprobs", "top_logprobs", "text_offset"})
        for (const Json& v : part[key]) logprobs[key].push_back(v);
    }
  }
  choice.text += text;
  choice.token_ids.insert(choice.token_ids.end(), e.token_ids.begin(), e.token_ids.end());
  if (e.finish != FinishReason::kNone) {
    choice.finish = e.finish;
    --n_open_;
    completion_tokens_ += e.usage.completion_tokens;
    if (index % request_.n == 0) cached_tokens_ += e.usage.cached_prompt_tokens;
    if (e.finish != FinishReason::kStop && e.finish != FinishReason::kLength) {
      if (!failure_) failure_ = e;
      return chunks;
    }
  }
  if (!request_.stream) return chunks;
  const Json finish = e.finish == FinishReason::kNone ? Json() : Json(finish_reason_name(e.finish));
  if (chat && !choice.started) {
    Json role = chunk_base();
    role["choices"].push_back({{"index", index},
                               {"delta", {{"role", "assistant"}, {"content", ""}}},
                               {"logprobs", nullptr},
                               {"finish_reason", nullptr}});
    chunks.push_back(role.dump(-1, ' ', false, Json::error_handler_t::replace));
  }
  choice.started = true;
  // A token that ends inside a UTF-8 character has no text yet: no chunk, unless it carries
  // logprobs, token ids asked for, or the finish.
  const bool ids = request_.return_token_ids && !e.token_ids.empty();
  if (text.empty() && logprobs.is_null() && finish.is_null() && !ids) return chunks;
  Json c = chunk_base();
  Json ch = {{"index", index}, {"logprobs", logprobs}, {"finish_reason", finish}};
  if (request_.return_token_ids) ch["token_ids"] = e.token_ids;
  if (chat) {
    ch["delta"] = text.empty() ? Json::object() : Json{{"content", text}};
  } else {
    ch["text"] = text;
  }
  c["choices"].push_back(std::move(ch));
  chunks.push_back(c.dump(-1, ' ', false, Json::error_handler_t::replace));
  return chunks;
}

std::string ResponseBuilder::usage_chunk() const {
  Json c = chunk_base();
  c["usage"] = usage();
  return c.dump(-1, ' ', false, Json::error_handler_t::replace);
}

Json ResponseBuilder::finish_json(const Choice& c) const {
  return c.finish == FinishReason::kNone ? Json() : Json(finish_reason_name(c.finish));
}

std::string ResponseBuilder::response() const {
  const bool chat = request_.endpoint == Endpoint::kChat;
  Json r = {{"id", id_},
            {"object", chat ? "chat.completion" : "text_completion"},
            {"created", created_},
            {"model", request_.model},
            {"choices", Json::array()},
            {"usage", usage()}};
  for (size_t i = 0; i < choices_.size(); ++i) {
    const Choice& c = choices_[i];
    Json ch = {{"index", i}, {"finish_reason", finish_json(c)}};
    if (request_.return_token_ids) {
      ch["token_ids"] = c.token_ids;
      ch["prompt_token_ids"] = request_.prompts[i / static_cast<size_t>(request_.n)];
    }
    if (chat) {
      ch["message"] = {{"role", "assistant"}, {"content", c.text}};
      ch["logprobs"] = request_.chat_logprobs ? Json{{"content", c.logprobs}} : Json();
    } else {
      ch["text"] = c.text;
      ch["logprobs"] = request_.logprobs.has_value() ? c.logprobs : Json();
    }
    r["choices"].push_back(std::move(ch));
  }
  return r.dump(-1, ' ', false, Json::error_handler_t::replace);
}

}  // namespace sy
