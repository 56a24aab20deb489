// The OpenAI API: request bodies to engine requests (defaults, every field, the errors naming
// their field), events to responses and stream chunks; then the HTTP server in this process
// over one rank's engine (the window_gqa4 fixture), spoken to over raw sockets: the same tokens
// as the engine alone, SSE framing, a client that leaves mid-stream frees its KV, and malformed,
// oversize, unauthorised and unknown requests get JSON errors while the server keeps serving.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <random>
#include <thread>

#include "runtime/engine/generator.h"
#include "runtime/server/metrics.h"
#include "runtime/server/openai_service.h"

namespace sy {
namespace {

const std::string kModel = std::string(SY_FIXTURES_DIR) + "/window_gqa4";
constexpr int64_t kVocab = 384;

const Tokenizer& tokenizer() {
  static std::unique_ptr<Tokenizer> t = Tokenizer::load(kModel, 1, {2});
  return *t;
}

ApiContext api_context() {
  ApiContext c;
  c.tokenizer = &tokenizer();
  c.vocab_size = kVocab;
  c.context_limit = 128;
  c.model = "tiny";
  c.default_seed = 77;
  return c;
}

ApiRequest parse(const std::string& body, Endpoint e = Endpoint::kCompletions,
                 const ApiContext& c = api_context()) {
  return parse_request(parse_body(body), e, c);
}

// The status and message of parsing `body`; status 0 when it parses.
std::pair<int, std::string> parse_error(const std::string& body,
                                        Endpoint e = Endpoint::kCompletions,
                                        bool chat_template = true) {
  ApiContext c = api_context();
  if (chat_template)
    c.render_chat = [](const Json&, bool) { return std::string("[INST] x [/INST]"); };
  try {
    parse(body, e, c);
  } catch (const ApiError& error) {
    return {error.status(), error.what()};
  }
  return {0, ""};
}

TEST(OpenAi, CompletionDefaultsAreTheApis) {
  const ApiRequest r = parse(R"({"model": "tiny", "prompt": "the yard"})");
  ASSERT_EQ(r.prompts.size(), 1u);
  EXPECT_EQ(r.prompts[0], tokenizer().encode("the yard", true));
  EXPECT_EQ(r.params.max_tokens, 16);
  EXPECT_EQ(r.params.sampling.temperature, 1.f) << "the API's default, not gRPC's greedy";
  EXPECT_EQ(r.params.sampling.top_p, 1.f);
  EXPECT_EQ(r.params.sampling.seed, 77u);
  EXPECT_EQ(r.n, 1);
  EXPECT_FALSE(r.stream);
  EXPECT_FALSE(r.logprobs.has_value());
  EXPECT_EQ(r.params.logprobs, 0);
  // No model named: the served one.
  EXPECT_EQ(parse(R"({"prompt": "x"})").model, "tiny");
}

TEST(OpenAi, EveryFieldReachesTheEngineRequest) {
  const ApiRequest r = parse(R"({"prompt": [[1, 5, 6], [1, 7]], "max_tokens": 9,
      "temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.05, "repetition_penalty": 1.2,
      "presence_penalty": -0.5, "frequency_penalty": 1.5, "seed": 11, "n": 3,
      "stop": ["yard", "x"], "stop_token_ids": [9], "ignore_eos": true, "min_tokens": 2,
      "logit_bias": {"300": -2.5, "12": 4}, "logprobs": 2, "echo": true, "user": "u",
      "stream": true, "stream_options": {"include_usage": true}, "best_of": 3})");
  ASSERT_EQ(r.prompts.size(), 2u);
  EXPECT_EQ(r.prompts[1], (std::vector<int32_t>{1, 7}));
  EXPECT_EQ(r.n_choices(), 6);
  const RequestParams& p = r.params;
  EXPECT_EQ(p.max_tokens, 9);
  EXPECT_EQ(p.sampling.temperature, 0.5f);
  EXPECT_EQ(p.sampling.top_p, 0.9f);
  EXPECT_EQ(p.sampling.top_k, 7);
  EXPECT_EQ(p.sampling.min_p, 0.05f);
  EXPECT_EQ(p.sampling.repetition_penalty, 1.2f);
  EXPECT_EQ(p.sampling.presence_penalty, -0.5f);
  EXPECT_EQ(p.sampling.frequency_penalty, 1.5f);
  EXPECT_EQ(p.stop, (std::vector<std::string>{"yard", "x"}));
  EXPECT_EQ(p.stop_token_ids, std::vector<int32_t>{9});
  EXPECT_TRUE(p.ignore_eos);
  EXPECT_EQ(p.sampling.min_tokens, 2);
  EXPECT_EQ(p.sampling.logit_bias,
            (std::vector<std::pair<int32_t, float>>{{12, 4.f}, {300, -2.5f}}));
  EXPECT_EQ(p.logprobs, 2);
  EXPECT_EQ(p.prompt_logprobs, 2) << "echo with logprobs wants the prompt's";
  EXPECT_TRUE(r.stream && r.include_usage && r.echo);
  // Choice i: prompt i / n, seed + i % n.
  EXPECT_EQ(r.choice_params(4).prompt, (std::vector<int32_t>{1, 7}));
  EXPECT_EQ(r.choice_params(4).sampling.seed, 12u);
  EXPECT_EQ(r.choice_params(2).sampling.seed, 13u);
  // logprobs 0: the chosen token's own logprob, so the engine is asked for one.
  EXPECT_EQ(parse(R"({"prompt": "a", "logprobs": 0})").params.logprobs, 1);
  EXPECT_EQ(parse(R"({"prompt": "a", "top_k": -1})").params.sampling.top_k, 0);
  EXPECT_EQ(parse(R"({"prompt": "a", "add_special_tokens": false})").prompts[0],
            tokenizer().encode("a", false));
}

TEST(OpenAi, ChatNeedsATemplateAndFillsTheContext) {
  EXPECT_EQ(
      parse_error(R"({"messages": [{"role": "user", "content": "hi"}]})", Endpoint::kChat, false)
          .second,
      "messages: the model has no chat template (serve --chat-template FILE)");
  ApiContext c = api_context();
  Json seen;
  c.render_chat = [&](const Json& messages, bool add_generation_prompt) {
    seen = messages;
    EXPECT_TRUE(add_generation_prompt);
    return std::string("<s>[INST] hi [/INST]");
  };
  const ApiRequest r = parse(R"({"messages": [{"role": "developer", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}],
      "logprobs": true, "top_logprobs": 3, "max_completion_tokens": 5})",
                             Endpoint::kChat, c);
  EXPECT_EQ(seen, Json::parse(R"([{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "hi"}])"));
  EXPECT_EQ(r.prompts[0].front(), 1) << "<s> in the rendered text is the BOS id";
  EXPECT_EQ(r.prompts[0], tokenizer().encode_with_special_tokens("<s>[INST] hi [/INST]"));
  EXPECT_EQ(r.params.max_tokens, 5);
  EXPECT_TRUE(r.chat_logprobs);
  EXPECT_EQ(r.top_logprobs, 3);
  EXPECT_EQ(r.params.logprobs, 3);
  const ApiRequest d =
      parse(R"({"messages": [{"role": "user", "content": "x"}]})", Endpoint::kChat, c);
  EXPECT_EQ(d.params.max_tokens, 128 - static_cast<int64_t>(d.prompts[0].size()))
      << "chat's default is the rest of the context";
}

TEST(OpenAi, ErrorsNameTheField) {
  const std::pair<int, std::string> cases[] = {
      {400, "the body is not valid JSON"},
      {400, "the body must be a JSON object"},
      {404, "The model 'gpt-4' does not exist (this server serves 'tiny')"},
      {400, "prompt: is required"},
      {400, "prompt: is empty"},
      {400, "prompt[1]: the prompts of one array must all be strings or all arrays of ids"},
      {400, "prompt[1][1]: token id 384 outside the vocabulary of 384 tokens"},
      {400, "prompt[0]: token id -1 outside the vocabulary of 384 tokens"},
      {400, "temperature: must be a number"},
      {400, "max_tokens: must be an integer"},
      {400, "max_tokens: must be at least 1"},
      {400, "n: must be at least 1"},
      {400, "stream: must be a boolean"},
      {400, "stream_options: is only allowed with stream: true"},
      {400, "stop[0]: must be a string"},
      {400, "logit_bias[x]: the key must be a token id"},
      {400, "logprobs: must be in [0, 20]"},
      {400, "logprobs: must be an integer (the top logprobs per token)"},
      {400, "suffix: is not supported"},
      {400, "top_logprobs: needs logprobs: true"},
      {400, "messages[0].role: 'robot' is not one of system, developer, user, assistant"},
      {400, "n: 1 prompts x n 1000000000 choices exceed the server's 16 (--max-completions)"},
      {400, "prompt: 9 prompts x n 2 choices exceed the server's 16 (--max-completions)"},
      {400, "priority: is out of range"},
  };
  const std::string bodies[] = {
      R"({"prompt": )",
      R"([1, 2])",
      R"({"model": "gpt-4", "prompt": "a"})",
      R"({"model": "tiny"})",
      R"({"prompt": []})",
      R"({"prompt": ["a", [1]]})",
      R"({"prompt": [[1], [1, 384]]})",
      R"({"prompt": [-1]})",
      R"({"prompt": "a", "temperature": "hot"})",
      R"({"prompt": "a", "max_tokens": 1.5})",
      R"({"prompt": "a", "max_tokens": 0})",
      R"({"prompt": "a", "n": 0})",
      R"({"prompt": "a", "stream": 1})",
      R"({"prompt": "a", "stream_options": {"include_usage": true}})",
      R"({"prompt": "a", "stop": [1]})",
      R"({"prompt": "a", "logit_bias": {"x": 1}})",
      R"({"prompt": "a", "logprobs": 21})",
      R"({"prompt": "a", "logprobs": true})",
      R"({"prompt": "a", "suffix": "b"})",
      R"({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2})",
      R"({"messages": [{"role": "robot", "content": "a"}]})",
      R"({"prompt": "a", "n": 1000000000})",
      R"({"prompt": ["a", "b", "c", "d", "e", "f", "g", "h", "i"], "n": 2})",
      R"({"prompt": "a", "priority": 3000000000})",
  };
  static_assert(std::size(cases) == std::size(bodies));
  for (size_t i = 0; i < std::size(cases); ++i) {
    const Endpoint e =
        bodies[i].find("messages") != std::string::npos ? Endpoint::kChat : Endpoint::kCompletions;
    EXPECT_EQ(parse_error(bodies[i], e), cases[i]) << bodies[i];
  }
  // The error object of the API, with the field as param.
  try {
    parse(R"({"prompt": "a", "temperature": "hot"})");
    FAIL();
  } catch (const ApiError& e) {
    EXPECT_EQ(Json::parse(e.body()), Json::parse(R"({"error": {"message":
        "temperature: must be a number", "type": "invalid_request_error",
        "param": "temperature", "code": null}})"));
  }
}

RequestEvent event(std::vector<int32_t> ids, std::string text, FinishReason finish = {}) {
  RequestEvent e;
  e.token_ids = std::move(ids);
  e.text = std::move(text);
  e.finish = finish;
  if (finish != FinishReason::kNone) {
    e.usage.prompt_tokens = 3;
    e.usage.completion_tokens = 2;
  }
  return e;
}

TEST(OpenAi, ResponsesAndChunks) {
  ApiRequest r = parse(R"({"prompt": [[1, 5, 6]], "n": 2, "logprobs": 1})");
  ResponseBuilder b(r, tokenizer(), "cmpl-1", 100);
  RequestEvent e = event({40}, "ab");
  e.logprobs.push_back({40, -0.5f, {{40, -0.5f}, {41, -1.5f}}});
  EXPECT_TRUE(b.on_event(0, e).empty()) << "no chunks unless streaming";
  RequestEvent last = event({41}, "c", FinishReason::kLength);
  last.logprobs.push_back({41, -2.f, {{40, -0.25f}}});
  b.on_event(0, last);
  EXPECT_FALSE(b.done());
  b.on_event(1, event({42}, "z", FinishReason::kStop));
  ASSERT_TRUE(b.done());
  const Json j = Json::parse(b.response());
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["id"], "cmpl-1");
  EXPECT_EQ(j["created"], 100);
  EXPECT_EQ(j["choices"][0]["text"], "abc");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["choices"][1]["finish_reason"], "stop");
  EXPECT_EQ(j["usage"]["prompt_tokens"], 3) << "each prompt once";
  EXPECT_EQ(j["usage"]["completion_tokens"], 4);
  EXPECT_EQ(j["usage"]["total_tokens"], 7);
  const Json& lp = j["choices"][0]["logprobs"];
  EXPECT_EQ(lp["tokens"], Json::array({token_text(tokenizer(), 40), token_text(tokenizer(), 41)}));
  EXPECT_EQ(lp["token_logprobs"], Json::array({-0.5, -2.0}));
  EXPECT_EQ(lp["top_logprobs"][1].size(), 2u) << "the top 1 and the chosen token";
  EXPECT_EQ(lp["text_offset"][0], 0);

  ApiRequest chat = parse(R"({"prompt": "x", "stream": true,
                              "stream_options": {"include_usage": true}})");
  chat.endpoint = Endpoint::kChat;
  ResponseBuilder c(chat, tokenizer(), "chatcmpl-1", 100);
  const std::vector<std::string> first = c.on_event(0, event({40}, "hi"));
  ASSERT_EQ(first.size(), 2u) << "the role chunk, then the content";
  EXPECT_EQ(Json::parse(first[0])["choices"][0]["delta"],
            Json::parse(R"({"role": "assistant", "content": ""})"));
  EXPECT_EQ(Json::parse(first[1])["choices"][0]["delta"]["content"], "hi");
  EXPECT_TRUE(Json::parse(first[1])["usage"].is_null());
  EXPECT_TRUE(c.on_event(0, event({200}, "")).empty()) << "no text yet: no chunk";
  const std::vector<std::string> end = c.on_event(0, event({}, "", FinishReason::kStop));
  ASSERT_EQ(end.size(), 1u);
  EXPECT_EQ(Json::parse(end[0])["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(Json::parse(end[0])["object"], "chat.completion.chunk");
  EXPECT_EQ(Json::parse(c.usage_chunk())["usage"]["completion_tokens"], 2);
  EXPECT_EQ(Json::parse(c.usage_chunk())["choices"], Json::array());

  ResponseBuilder f(parse(R"({"prompt": "x"})"), tokenizer(), "cmpl-2", 1);
  f.on_event(0, event({}, "", FinishReason::kUnavailable));
  ASSERT_NE(f.failure(), nullptr);
  EXPECT_EQ(f.failure()->finish, FinishReason::kUnavailable);
}

TEST(OpenAi, TokenText) {
  // Byte pieces that are not UTF-8 alone are escaped; others read as text with '▁' as ' '.
  for (int32_t id = 0; id < kVocab; ++id) {
    const std::string piece = tokenizer().piece(id);
    const std::string text = token_text(tokenizer(), id);
    if (piece.starts_with("<0x") && piece.size() == 6 &&
        std::stoi(piece.substr(3, 2), 0, 16) >= 0x80) {
      EXPECT_EQ(text, "bytes:\\x" + std::string(1, static_cast<char>(std::tolower(piece[3]))) +
                          std::string(1, static_cast<char>(std::tolower(piece[4]))));
    } else if (piece.starts_with("\xE2\x96\x81")) {
      EXPECT_EQ(text[0], ' ') << piece;
    }
  }
}

TEST(Metrics, HistogramsAndBuckets) {
  EXPECT_EQ(buckets_1_2_5(100), (std::vector<double>{1, 2, 5, 10, 20, 50, 100}));
  Histogram h({1, 2});
  h.observe(0.5);
  h.observe(1);
  h.observe(3);
  std::string out;
  h.render("x", "a=\"b\"", out);
  EXPECT_EQ(out,
            "x_bucket{a=\"b\",le=\"1\"} 2\nx_bucket{a=\"b\",le=\"2\"} 2\n"
            "x_bucket{a=\"b\",le=\"+Inf\"} 3\nx_sum{a=\"b\"} 4.5\nx_count{a=\"b\"} 3\n");
  EXPECT_EQ(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
}

TEST(Metrics, RankReportsSumOverRanks) {
  Metrics m("tiny", 128, 2);
  EXPECT_EQ(m.render().find("expert_tokens_total"), std::string::npos) << "before a report";
  auto rank = [](int r, std::vector<int64_t> experts, int64_t bytes) {
    RankCounters c;
    c.rank = r;
    c.moe.expert_tokens = std::move(experts);  // 2 layers x 2 experts
    c.moe.dispatch_bytes = bytes;
    c.moe.combine_bytes = 2 * bytes;
    c.moe.dispatch_seconds = 0.5;
    c.step_buckets.assign(step_seconds_edges().size() + 1, 0);
    c.step_buckets[3] = 4;  // four passes of up to 10 ms
    c.step_seconds = 0.02;
    c.steps = 4;
    return c;
  };
  m.on_ranks({rank(0, {3, 1, 2, 2}, 100), rank(1, {1, 3, 0, 4}, 50)}, 17);
  const std::string out = m.render();
  const std::string l = "{model_name=\"tiny\",";
  for (const auto& [line, why] : std::vector<std::pair<std::string, std::string>>{
           {"switchyard:expert_tokens_total" + l + "layer=\"0\",expert=\"0\"} 4", "summed"},
           {"switchyard:expert_tokens_total" + l + "layer=\"1\",expert=\"1\"} 6", "summed"},
           {"switchyard:expert_load_imbalance" + l + "layer=\"0\"} 1", "4 and 4: balanced"},
           {"switchyard:expert_load_imbalance" + l + "layer=\"1\"} 1.5", "2 and 6"},
           {"switchyard:moe_exchange_bytes_total" + l + "kind=\"dispatch\"} 150", "bytes"},
           {"switchyard:moe_exchange_bytes_total" + l + "kind=\"combine\"} 300", "bytes"},
           {"switchyard:moe_exchange_seconds_total" + l + "kind=\"dispatch\"} 1", "seconds"},
           {"switchyard:step_seconds_count" + l + "rank=\"1\"} 4", "rank 1's passes"},
           {"switchyard:step_seconds_bucket" + l + "rank=\"0\",le=\"0.01\"} 4", "buckets"},
           {"switchyard:ranks_report_step{model_name=\"tiny\"} 17", "the step"}})
    EXPECT_NE(out.find(line + "\n"), std::string::npos) << why << ": " << line << "\n" << out;
  // A second window: counters add, the imbalance is the new window's.
  m.on_ranks({rank(0, {0, 0, 8, 0}, 0), rank(1, {0, 0, 0, 0}, 0)}, 30);
  const std::string again = m.render();
  EXPECT_NE(again.find("layer=\"1\",expert=\"0\"} 10\n"), std::string::npos) << again;
  EXPECT_NE(again.find("switchyard:expert_load_imbalance" + l + "layer=\"1\"} 2\n"),
            std::string::npos);
  EXPECT_NE(again.find("switchyard:expert_load_imbalance" + l + "layer=\"0\"} 1\n"),
            std::string::npos)
      << "a layer without tokens keeps its last value";
}

// ---- the server in this process -----------------------------------------------------------------

struct HttpReply {
  int status = 0;
  std::string head;  // status line and headers
  std::string body;  // de-chunked, of the first response
  std::string all;   // every byte received
};

// Sends `raw` on a new connection and reads the reply to the end (the request asks to close).
// `half_close`: shut the sending side after the request (a cut-short request then ends at once).
HttpReply roundtrip(int port, const std::string& raw, bool half_close = false) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ::send(fd, raw.data(), raw.size(), MSG_NOSIGNAL);
  if (half_close) ::shutdown(fd, SHUT_WR);
  std::string in;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) in.append(buf, static_cast<size_t>(n));
  ::close(fd);
  HttpReply r;
  r.all = in;
  const size_t end = in.find("\r\n\r\n");
  if (end == std::string::npos) return r;
  r.head = in.substr(0, end);
  r.status = std::stoi(in.substr(9, 3));
  std::string body = in.substr(end + 4);
  if (r.head.find("Transfer-Encoding: chunked") == std::string::npos) {
    // The first response only (a keep-alive connection may carry more).
    const size_t cl = r.head.find("Content-Length: ");
    r.body = cl == std::string::npos ? body : body.substr(0, std::stoul(r.head.substr(cl + 16)));
    return r;
  }
  size_t at = 0;
  while (at < body.size()) {
    const size_t crlf = body.find("\r\n", at);
    const size_t size = std::stoul(body.substr(at, crlf - at), nullptr, 16);
    if (size == 0) break;
    r.body += body.substr(crlf + 2, size);
    at = crlf + 2 + size + 2;
  }
  return r;
}

HttpReply post(int port, const std::string& path, const std::string& body,
               const std::string& extra = "") {
  return roundtrip(port, "POST " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra +
                             "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body);
}

HttpReply get(int port, const std::string& path, const std::string& extra = "") {
  return roundtrip(
      port, "GET " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + extra + "\r\n");
}

struct Server {
  ModelConfig config = ModelConfig::load(kModel);
  LoadedModel loaded;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<OpenAiService> service;
  std::unique_ptr<HttpServer> http;
  std::thread loop;
  int port = 0;

  explicit Server(const std::string& api_key = "", int64_t max_queue = 256) {
    ModelLimits limits;
    limits.block_size = 4;
    limits.max_blocks_per_seq = 32;  // 128 tokens
    limits.n_blocks = 96;
    limits.max_tokens = 64;
    limits.max_seqs = 16;
    limits.max_logit_rows = 16;
    loaded = load_model(kModel, config, limits, false);
    EngineOptions options;
    options.max_batch_tokens = 64;
    options.max_running = 16;
    options.max_queue_requests = max_queue;
    options.report_interval_s = 0;  // every step: the counts below are exact
    engine = std::make_unique<Engine>(*loaded.model, tokenizer(), options, nullptr);
    metrics = std::make_unique<Metrics>("tiny", engine->context_limit(), config.num_local_experts);
    OpenAiOptions o;
    o.model_name = "tiny";
    o.context_limit = engine->context_limit();
    o.api_key = api_key;
    service = std::make_unique<OpenAiService>(tokenizer(), kVocab, o, metrics.get());
    HttpLimits hl;
    hl.max_body_bytes = 4096;
    http = std::make_unique<HttpServer>(
        [this](const HttpRequest& rq, HttpResponder& rs) { service->handle(rq, rs); },
        OpenAiService::error_body, hl);
    port = http->start("127.0.0.1:0");
  }
  void start() {
    metrics->attach(engine.get());
    engine->set_observer(metrics.get());
    service->attach(engine.get());
    service->set_state(OpenAiService::State::kServing);
    loop = std::thread([this] { engine->run(); });
  }
  ~Server() {
    engine->drain();
    if (loop.joinable()) loop.join();
    service->close("the server stopped");
    http->stop(5);
  }
};

// The token ids of a non-streamed completion's choice 0, through /tokenize of its text is not
// exact; so the test asks for logprobs, whose tokens are the ids' texts, and compares texts.
TEST(OpenAiServer, CompletionMatchesTheEngineAlone) {
  Server s;
  EXPECT_EQ(get(s.port, "/health").status, 503) << "loading";
  EXPECT_EQ(post(s.port, "/v1/completions", R"({"prompt": "a"})").status, 503);
  s.start();
  EXPECT_EQ(get(s.port, "/health").status, 200);
  const HttpReply r = post(s.port, "/v1/completions",
                           R"({"model": "tiny", "prompt": [1, 50, 60, 70], "max_tokens": 12,
                               "temperature": 0, "ignore_eos": true})");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_NE(r.head.find("Content-Type: application/json"), std::string::npos);
  GenerateOptions o;
  o.max_tokens = 12;
  o.ignore_eos = true;
  static LoadedModel alone = load_model(kModel, 128, 64, false);
  const std::vector<int32_t> want = generate(*alone.model, {1, 50, 60, 70}, o).tokens;
  // The text as the engine streams it (which differs from decode() where random byte pieces
  // make invalid UTF-8 runs).
  StreamDecoder decoder(tokenizer(), {1, 50, 60, 70});
  std::string want_text;
  for (int32_t id : want) want_text += decoder.push(id);
  want_text += decoder.flush();
  const Json j = Json::parse(r.body);
  EXPECT_EQ(j["choices"][0]["text"], want_text);
  EXPECT_EQ(j["usage"]["completion_tokens"], 12);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");

  // Streamed: the same text in SSE chunks, the usage chunk, then [DONE].
  const HttpReply sr = post(s.port, "/v1/completions",
                            R"({"prompt": [1, 50, 60, 70], "max_tokens": 12, "temperature": 0,
                                "ignore_eos": true, "stream": true,
                                "stream_options": {"include_usage": true}})");
  ASSERT_EQ(sr.status, 200);
  EXPECT_NE(sr.head.find("Content-Type: text/event-stream"), std::string::npos);
  std::string text;
  std::vector<Json> chunks;
  size_t at = 0;
  while (at < sr.body.size()) {
    const size_t end = sr.body.find("\n\n", at);
    ASSERT_NE(end, std::string::npos);
    const std::string line = sr.body.substr(at, end - at);
    at = end + 2;
    ASSERT_TRUE(line.starts_with("data: ")) << line;
    if (line == "data: [DONE]") {
      EXPECT_EQ(at, sr.body.size()) << "[DONE] is last";
      break;
    }
    chunks.push_back(Json::parse(line.substr(6)));
  }
  ASSERT_GE(chunks.size(), 2u);
  for (size_t i = 0; i + 1 < chunks.size(); ++i) text += chunks[i]["choices"][0]["text"];
  EXPECT_EQ(text, want_text);
  EXPECT_EQ(chunks[chunks.size() - 2]["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(chunks.back()["usage"]["completion_tokens"], 12);
  EXPECT_EQ(chunks.back()["choices"], Json::array());

  // The metrics saw both requests.
  const std::string m = get(s.port, "/metrics").body;
  EXPECT_NE(
      m.find("switchyard:request_success_total{model_name=\"tiny\",finished_reason=\"length\"} 2"),
      std::string::npos)
      << m;
  EXPECT_NE(m.find("switchyard:generation_tokens_total{model_name=\"tiny\"} 24"),
            std::string::npos);
  EXPECT_NE(m.find("switchyard:e2e_request_latency_seconds_count{model_name=\"tiny\"} 2"),
            std::string::npos);
  EXPECT_NE(m.find("switchyard:inter_token_latency_seconds_count{model_name=\"tiny\"} 22"),
            std::string::npos)
      << "11 gaps a request";
  // Every forwarded token (the prompts' computed ones, and each sampled token but a request's
  // last) was routed to top-k experts in every layer.
  auto value = [&](const std::string& name) {
    const size_t at = m.find(name);
    EXPECT_NE(at, std::string::npos) << name;
    return std::stod(m.substr(m.find(' ', at) + 1));
  };
  const double forwarded = value("switchyard:prompt_tokens_total{") + 24 - 2;
  for (int64_t layer = 0; layer < s.config.num_hidden_layers; ++layer) {
    double routed = 0;
    for (int64_t e = 0; e < s.config.num_local_experts; ++e)
      routed += value("switchyard:expert_tokens_total{model_name=\"tiny\",layer=\"" +
                      std::to_string(layer) + "\",expert=\"" + std::to_string(e) + "\"}");
    EXPECT_EQ(routed, forwarded * static_cast<double>(s.config.num_experts_per_tok))
        << "layer " << layer;
  }
  EXPECT_NE(m.find("switchyard:step_seconds_count{model_name=\"tiny\",rank=\"0\"}"),
            std::string::npos);
}

TEST(OpenAiServer, ADepartedClientFreesItsBlocks) {
  Server s;
  s.start();
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(s.port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  const std::string body =
      R"({"prompt": [1, 50, 60, 70], "max_tokens": 100, "ignore_eos": true, "stream": true})";
  const std::string raw =
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(body.size()) +
      "\r\n\r\n" + body;
  ::send(fd, raw.data(), raw.size(), MSG_NOSIGNAL);
  std::string in;
  char buf[512];
  while (in.find("data: ") == std::string::npos) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    ASSERT_GT(n, 0) << "the stream started";
    in.append(buf, static_cast<size_t>(n));
  }
  const int64_t steps_at_start = s.engine->stats().steps;
  while (s.engine->stats().kv_blocks_used == 0) {
    ASSERT_LT(s.engine->stats().steps - steps_at_start, 10);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ::close(fd);
  // Bounded by steps, not seconds: the request ends well before its 100 tokens.
  const int64_t steps_at_close = s.engine->stats().steps;
  while (s.engine->stats().kv_blocks_used > 0 || s.engine->stats().running > 0) {
    ASSERT_LT(s.engine->stats().steps - steps_at_close, 90) << "the request ran on";
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_EQ(s.engine->stats().requests_cancelled, 1);
  EXPECT_EQ(get(s.port, "/health").status, 200);
}

TEST(OpenAiServer, BadRequestsGetJsonErrorsAndTheServerServesOn) {
  Server s("sekret");
  s.start();
  const std::string auth = "Authorization: Bearer sekret\r\n";
  auto error_of = [](const HttpReply& r) { return Json::parse(r.body)["error"]; };
  HttpReply r = post(s.port, "/v1/completions", R"({"prompt": "a"})");
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(error_of(r)["type"], "authentication_error");
  EXPECT_EQ(
      post(s.port, "/v1/completions", R"({"prompt": "a"})", "Authorization: Bearer sekreT\r\n")
          .status,
      401);
  EXPECT_EQ(get(s.port, "/health").status, 200) << "health needs no key";
  r = post(s.port, "/v1/completions", "{\"prompt\": ", auth);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(error_of(r)["message"], "the body is not valid JSON");
  r = post(s.port, "/v1/completions", R"({"prompt": "a", "model": "other"})", auth);
  EXPECT_EQ(r.status, 404);
  EXPECT_EQ(error_of(r)["code"], "model_not_found");
  r = post(s.port, "/v1/completions", R"({"prompt": "a", "temperature": -1})", auth);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(error_of(r)["message"], "sampling: temperature -1 outside [0, 100]")
      << "the engine's validation, shared with gRPC";
  r = post(s.port, "/v1/completions", std::string(5000, ' '), auth);
  EXPECT_EQ(r.status, 413);
  EXPECT_EQ(error_of(r)["type"], "invalid_request_error");
  r = get(s.port, "/v1/nothing", auth);
  EXPECT_EQ(r.status, 404);
  r = get(s.port, "/v1/completions", auth);
  EXPECT_EQ(r.status, 405);
  r = roundtrip(s.port, "BOGUS\r\n\r\n");
  EXPECT_EQ(r.status, 400);
  EXPECT_TRUE(error_of(r).contains("message"));
  r = roundtrip(s.port, "GET /health HTTP/1.1\r\nX: " + std::string(20000, 'a') + "\r\n\r\n");
  EXPECT_EQ(r.status, 431);
  r = post(s.port, "/v1/completions", R"({"prompt": [1, 5], "max_tokens": 300})", auth);
  EXPECT_EQ(r.status, 400);
  EXPECT_NE(error_of(r)["message"].get<std::string>().find("context"), std::string::npos)
      << error_of(r)["message"];
  // /v1/models, /tokenize and /detokenize.
  r = get(s.port, "/v1/models", auth);
  EXPECT_EQ(Json::parse(r.body)["data"][0]["id"], "tiny");
  r = post(s.port, "/tokenize", R"({"prompt": "the yard"})", auth);
  EXPECT_EQ(Json::parse(r.body)["tokens"], Json(tokenizer().encode("the yard", true)));
  r = post(s.port, "/detokenize", R"({"tokens": [1, 50, 60]})", auth);
  EXPECT_EQ(Json::parse(r.body)["prompt"], tokenizer().decode({1, 50, 60}));
  r = post(s.port, "/detokenize", R"({"tokens": [1, 999]})", auth);
  EXPECT_EQ(r.status, 400);
  // Chunked request bodies and keep-alive.
  const std::string chunked =
      "POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + auth +
      "\r\n5\r\n{\"pro\r\n11\r\nmpt\": \"the yard\"}\r\n0\r\n\r\n"
      "GET /health HTTP/1.1\r\nConnection: close\r\n\r\n";
  r = roundtrip(s.port, chunked);
  EXPECT_EQ(r.status, 200);
  EXPECT_NE(r.body.find("\"tokens\""), std::string::npos);
  EXPECT_NE(r.all.find("serving"), std::string::npos) << "the pipelined second request";
  // After all that, a generation works.
  r = post(s.port, "/v1/completions", R"({"prompt": [1, 5], "max_tokens": 3})", auth);
  EXPECT_EQ(r.status, 200) << r.body;
}

TEST(OpenAiServer, AFullQueueIs503WithRetryAfter) {
  Server s("", /*max_queue=*/1);
  // Not started: the engine takes nothing from its queue, so one request fills it. The
  // service must be attached to accept requests at all.
  s.service->attach(s.engine.get());
  s.service->set_state(OpenAiService::State::kServing);
  std::thread first(
      [&] { post(s.port, "/v1/completions", R"({"prompt": [1, 5], "max_tokens": 2})"); });
  while (s.engine->stats().queue_depth < 1)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const HttpReply r = post(s.port, "/v1/completions", R"({"prompt": [1, 5], "max_tokens": 2})");
  EXPECT_EQ(r.status, 503);
  EXPECT_NE(r.head.find("Retry-After: 1"), std::string::npos);
  EXPECT_EQ(Json::parse(r.body)["error"]["code"], "queue_full");
  s.start();
  first.join();
}

// Random damage to valid requests (bytes flipped, cut short, inserted CRLFs, huge sizes): every
// reply is a status line with a JSON error or a success, or the connection closes; the server
// never crashes or hangs, and a valid request works afterwards.
TEST(OpenAiServer, DamagedRequestsNeverBreakTheServer) {
  Server s;
  s.start();
  const std::string body = R"({"prompt": [1, 5, 9], "max_tokens": 2, "stream": true})";
  const std::string good =
      "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
      "Content-Length: " +
      std::to_string(body.size()) + "\r\n\r\n" + body;
  const std::string chunked =
      "POST /tokenize HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
      "Connection: close\r\n\r\n8\r\n{\"prompt\r\n8\r\n\": \"ab\"}\r\n0\r\n\r\n";
  std::mt19937 rng(7);
  int n_answered = 0;
  for (int i = 0; i < 300; ++i) {
    std::string raw = i % 2 ? good : chunked;
    const int op = static_cast<int>(rng() % 4);
    const size_t at = rng() % raw.size();
    if (op == 0) raw[at] = static_cast<char>(rng() % 256);
    if (op == 1) raw.resize(at);
    if (op == 2) raw.insert(at, "\r\n");
    if (op == 3) raw.insert(at, std::to_string(rng()) + "ffffffffffff");
    // A cut-short request waits for the rest: the client closes its side to end it.
    const HttpReply r = roundtrip(s.port, raw, true);
    if (r.status == 0) continue;
    ++n_answered;
    EXPECT_TRUE(r.status == 200 || (r.status >= 400 && r.status < 600)) << r.status;
    if (r.status >= 400) {
      EXPECT_TRUE(Json::parse(r.body, nullptr, false).contains("error")) << r.status << r.body;
    }
    EXPECT_NE(r.status, 500) << "a malformed request is not a server fault: " << r.body;
  }
  EXPECT_GT(n_answered, 100);
  EXPECT_EQ(post(s.port, "/v1/completions", R"({"prompt": [1, 5], "max_tokens": 3})").status, 200);
  // Nothing left running or holding blocks (the stats catch up within a loop turn or two).
  const int64_t steps = s.engine->stats().steps;
  while (s.engine->stats().running > 0 || s.engine->stats().kv_blocks_used > 0) {
    ASSERT_LT(s.engine->stats().steps - steps, 10) << "a damaged request still runs";
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace
}  // namespace sy
