// The gRPC service: request conversion and its errors, events as messages and statuses, model
// info; then a real server in this process (one rank, the window_gqa4 fixture) driven by many
// streams that read to the end, cancel, drop their call or run out of time at random moments, so
// that sinks outlive their calls; every KV block and every call must end.
#include <gtest/gtest.h>

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <map>
#include <random>
#include <thread>

#include "runtime/engine/generator.h"
#include "runtime/server/service.h"

namespace sy {
namespace {

const std::string kModel = std::string(SY_FIXTURES_DIR) + "/window_gqa4";
constexpr int64_t kVocab = 384;

const Tokenizer& tokenizer() {
  static std::unique_ptr<Tokenizer> t = Tokenizer::load(kModel, 1, {2});
  return *t;
}

// The INVALID_ARGUMENT message of converting `r`; empty when it converts.
std::string conversion_error(const v1::GenerateRequest& r) {
  try {
    request_params(r, tokenizer(), kVocab, 0, std::nullopt);
  } catch (const RequestError& e) {
    EXPECT_EQ(e.code(), RequestError::Code::kInvalidArgument);
    return e.what();
  }
  return "";
}

TEST(Service, RequestDefaults) {
  v1::GenerateRequest r;
  r.set_text("the yard");
  RequestParams p = request_params(r, tokenizer(), kVocab, 77, std::nullopt);
  EXPECT_EQ(p.prompt, tokenizer().encode("the yard", true));
  EXPECT_EQ(p.prompt.front(), 1);
  EXPECT_EQ(p.max_tokens, 16);
  EXPECT_EQ(p.sampling.temperature, 0.f);
  EXPECT_EQ(p.sampling.top_p, 1.f);
  EXPECT_EQ(p.sampling.repetition_penalty, 1.f);
  EXPECT_EQ(p.sampling.presence_penalty, 0.f);
  EXPECT_EQ(p.sampling.frequency_penalty, 0.f);
  EXPECT_EQ(p.sampling.seed, 77u);
  EXPECT_EQ(p.priority, 0);
  EXPECT_TRUE(p.sampling.logit_bias.empty());
  EXPECT_EQ(p.sampling.min_tokens, 0);
  EXPECT_FALSE(p.deadline.has_value());
  r.set_skip_bos(true);
  r.set_max_tokens(5);
  r.set_top_p(0.5f);
  r.set_repetition_penalty(1.3f);
  r.set_presence_penalty(-0.5f);
  r.set_frequency_penalty(1.5f);
  r.set_priority(-3);
  r.set_seed(9);
  r.add_stop("yard");
  r.add_stop_token_ids(7);
  r.set_logprobs(3);
  r.set_ignore_eos(true);
  (*r.mutable_logit_bias())[300] = -2.5f;
  (*r.mutable_logit_bias())[12] = 4.f;
  r.set_min_tokens(3);
  r.set_prompt_logprobs(4);
  const auto deadline = std::chrono::steady_clock::now();
  p = request_params(r, tokenizer(), kVocab, 77, deadline);
  EXPECT_EQ(p.prompt, tokenizer().encode("the yard", false));
  EXPECT_EQ(p.max_tokens, 5);
  EXPECT_EQ(p.sampling.top_p, 0.5f);
  EXPECT_EQ(p.sampling.repetition_penalty, 1.3f);
  EXPECT_EQ(p.sampling.presence_penalty, -0.5f);
  EXPECT_EQ(p.sampling.frequency_penalty, 1.5f);
  EXPECT_EQ(p.sampling.seed, 9u);
  EXPECT_EQ(p.priority, -3);
  EXPECT_EQ(p.stop, std::vector<std::string>{"yard"});
  EXPECT_EQ(p.stop_token_ids, std::vector<int32_t>{7});
  EXPECT_EQ(p.logprobs, 3);
  EXPECT_TRUE(p.ignore_eos);
  EXPECT_EQ(p.sampling.logit_bias,
            (std::vector<std::pair<int32_t, float>>{{12, 4.f}, {300, -2.5f}}))
      << "by id";
  EXPECT_EQ(p.sampling.min_tokens, 3);
  EXPECT_EQ(p.prompt_logprobs, 4);
  EXPECT_EQ(p.deadline, deadline);
  v1::GenerateRequest ids;
  ids.mutable_token_ids()->add_ids(5);
  ids.mutable_token_ids()->add_ids(383);
  EXPECT_EQ(request_params(ids, tokenizer(), kVocab, 0, std::nullopt).prompt,
            (std::vector<int32_t>{5, 383}));
}

TEST(Service, RequestErrorsNameTheField) {
  v1::GenerateRequest none;
  EXPECT_NE(conversion_error(none).find("prompt"), std::string::npos);
  v1::GenerateRequest empty_text;
  empty_text.set_text("");
  EXPECT_NE(conversion_error(empty_text).find("prompt: text is empty"), std::string::npos);
  v1::GenerateRequest empty_ids;
  empty_ids.mutable_token_ids();
  EXPECT_NE(conversion_error(empty_ids).find("token_ids is empty"), std::string::npos);
  v1::GenerateRequest bad_id;
  bad_id.mutable_token_ids()->add_ids(1);
  bad_id.mutable_token_ids()->add_ids(4000000000u);  // not representable as int32
  EXPECT_NE(conversion_error(bad_id).find("token_ids.ids[1]: token id 4000000000 outside"),
            std::string::npos);
  v1::GenerateRequest bad_stop;
  bad_stop.set_text("a");
  bad_stop.add_stop_token_ids(384);
  EXPECT_NE(conversion_error(bad_stop).find("stop_token_ids[0]"), std::string::npos);
  v1::GenerateRequest bad_bias;
  bad_bias.set_text("a");
  (*bad_bias.mutable_logit_bias())[4000000000u] = 1.f;
  EXPECT_NE(conversion_error(bad_bias).find("logit_bias: token id 4000000000 outside"),
            std::string::npos);
  v1::GenerateRequest bad_utf8;
  bad_utf8.set_text("\xff\xfe");
  EXPECT_NE(conversion_error(bad_utf8).find("prompt: text: "), std::string::npos);
  EXPECT_EQ(conversion_error(bad_utf8).find("tokenizer.cc"), std::string::npos)
      << "the client gets no source locations";
}

TEST(Service, EventsAsMessagesAndStatuses) {
  RequestEvent e;
  e.text = "ab";
  e.token_ids = {4, 5};
  e.logprobs.push_back({4, -0.5f, {{4, -0.5f}, {9, -1.5f}}});
  e.prompt_logprobs.push_back({7, -2.f, {{3, -0.25f}}});
  v1::GenerateResponse m = to_response(e);
  ASSERT_EQ(m.prompt_logprobs_size(), 1);
  EXPECT_EQ(m.prompt_logprobs(0).token_id(), 7u);
  EXPECT_EQ(m.prompt_logprobs(0).logprob(), -2.f);
  EXPECT_EQ(m.prompt_logprobs(0).top(0).token_id(), 3u);
  EXPECT_EQ(m.text(), "ab");
  EXPECT_EQ(m.token_ids_size(), 2);
  ASSERT_EQ(m.logprobs_size(), 1);
  EXPECT_EQ(m.logprobs(0).top_size(), 2);
  EXPECT_EQ(m.logprobs(0).top(1).token_id(), 9u);
  EXPECT_EQ(m.finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
  EXPECT_FALSE(m.has_usage());
  EXPECT_TRUE(finish_status(e).ok());

  e.usage.prompt_tokens = 3;
  e.usage.completion_tokens = 2;
  e.usage.total_time_ms = 1.5;
  const std::pair<FinishReason, std::pair<v1::FinishReason, grpc::StatusCode>> cases[] = {
      {FinishReason::kStop, {v1::FINISH_REASON_STOP, grpc::StatusCode::OK}},
      {FinishReason::kLength, {v1::FINISH_REASON_LENGTH, grpc::StatusCode::OK}},
      {FinishReason::kCancelled, {v1::FINISH_REASON_CANCELLED, grpc::StatusCode::CANCELLED}},
      {FinishReason::kDeadline, {v1::FINISH_REASON_CANCELLED, grpc::StatusCode::DEADLINE_EXCEEDED}},
      {FinishReason::kUnavailable, {v1::FINISH_REASON_ERROR, grpc::StatusCode::UNAVAILABLE}},
      {FinishReason::kError, {v1::FINISH_REASON_ERROR, grpc::StatusCode::INTERNAL}},
  };
  for (const auto& [reason, want] : cases) {
    e.finish = reason;
    e.error = "boom";
    m = to_response(e);
    EXPECT_EQ(m.finish_reason(), want.first);
    EXPECT_EQ(m.usage().prompt_tokens(), 3u);
    EXPECT_EQ(m.usage().completion_tokens(), 2u);
    EXPECT_EQ(m.usage().total_time_ms(), 1.5);
    EXPECT_EQ(finish_status(e).error_code(), want.second);
  }
  EXPECT_EQ(finish_status(e).error_message(), "boom");
  EXPECT_EQ(status_code(RequestError::Code::kResourceExhausted),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
}

TEST(Service, CompletionsStepTheSeed) {
  RequestParams p;
  p.prompt = {1, 2};
  p.sampling.seed = 41;
  const std::vector<RequestParams> c = completion_params(p, 3);
  ASSERT_EQ(c.size(), 3u);
  for (size_t i = 0; i < c.size(); ++i) {
    EXPECT_EQ(c[i].sampling.seed, 41 + i);
    EXPECT_EQ(c[i].prompt, p.prompt);
  }
  p.sampling.seed = ~uint64_t{0};
  EXPECT_EQ(completion_params(p, 2)[1].sampling.seed, 0u) << "wraps";
  EXPECT_THROW(completion_params(p, 0), Error);
}

TEST(Service, Deadlines) {
  EXPECT_FALSE(steady_deadline(std::chrono::system_clock::time_point::max()).has_value());
  const auto d = steady_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  ASSERT_TRUE(d.has_value());
  const double left = std::chrono::duration<double>(*d - std::chrono::steady_clock::now()).count();
  EXPECT_GT(left, 1.5);
  EXPECT_LT(left, 2.5);
}

TEST(Service, ModelInfoLayout) {
  const ModelConfig config = ModelConfig::load(kModel);
  ParallelConfig p;
  p.world = 4;
  p.tp = 2;
  p.ep = 4;
  const v1::ModelInfo m = model_info("/m", config, p, 128);
  EXPECT_EQ(m.world_size(), 4u);
  EXPECT_EQ(m.tp(), 2u);
  EXPECT_EQ(m.ep(), 4u);
  EXPECT_EQ(m.context_limit_tokens(), 128u);
  EXPECT_EQ(m.moe_exchange(), "auto");  // the default
  ASSERT_EQ(m.ranks_size(), 4);
  std::vector<uint32_t> experts;
  for (const v1::RankInfo& r : m.ranks()) {
    EXPECT_EQ(r.n_heads(), 4u);
    EXPECT_EQ(r.first_head(), r.tp_rank() * 4);
    EXPECT_EQ(r.experts_size(), 2);
    experts.insert(experts.end(), r.experts().begin(), r.experts().end());
  }
  EXPECT_EQ(experts, (std::vector<uint32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(m.ranks(3).tp_rank(), 1u);
  EXPECT_EQ(m.ranks(3).ep_rank(), 3u);
}

// ---- a real server
// -------------------------------------------------------------------------------

struct Server {
  ModelConfig config = ModelConfig::load(kModel);
  LoadedModel loaded;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<Service> service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<v1::Switchyard::Stub> stub;
  std::thread loop;

  explicit Server(bool attach = true) {
    ModelLimits limits;
    limits.block_size = 4;
    limits.max_blocks_per_seq = 32;  // 128 tokens
    limits.n_blocks = 96;            // fewer than 16 full contexts: some preemption
    limits.max_tokens = 64;
    limits.max_seqs = 16;
    limits.max_logit_rows = 16;
    loaded = load_model(kModel, config, limits, false);
    EngineOptions options;
    options.max_batch_tokens = 64;
    options.max_running = 16;
    engine = std::make_unique<Engine>(*loaded.model, tokenizer(), options, nullptr);
    ParallelConfig p;
    service = std::make_unique<Service>(tokenizer(),
                                        model_info(kModel, config, p, engine->context_limit()));
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service.get());
    server = builder.BuildAndStart();
    EXPECT_NE(port, 0);
    stub = v1::Switchyard::NewStub(grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                                       grpc::InsecureChannelCredentials()));
    if (attach) start();
  }
  void start() {
    service->attach(engine.get());
    loop = std::thread([this] { engine->run(); });
  }
  ~Server() {
    engine->drain();
    if (loop.joinable()) loop.join();
    service->close(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server stopped"));
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  }
};

struct Streamed {
  grpc::Status status;
  std::vector<uint32_t> ids;  // completion 0's
  v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
  // Per completion index: its tokens, and its messages that carry a finish reason.
  std::map<uint32_t, std::vector<uint32_t>> completion_ids;
  std::map<uint32_t, std::vector<v1::GenerateResponse>> finals;
};

Streamed stream(v1::Switchyard::Stub& stub, const v1::GenerateRequest& request) {
  grpc::ClientContext context;
  Streamed s;
  auto reader = stub.Generate(&context, request);
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
    std::vector<uint32_t>& ids = s.completion_ids[m.index()];
    ids.insert(ids.end(), m.token_ids().begin(), m.token_ids().end());
    if (m.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) s.finals[m.index()].push_back(m);
  }
  s.status = reader->Finish();
  s.ids = s.completion_ids[0];
  if (!s.finals[0].empty()) s.finish = s.finals[0].back().finish_reason();
  return s;
}

v1::GenerateRequest ids_request(std::vector<uint32_t> ids, uint32_t max_tokens) {
  v1::GenerateRequest r;
  for (uint32_t id : ids) r.mutable_token_ids()->add_ids(id);
  r.set_max_tokens(max_tokens);
  r.set_ignore_eos(true);
  return r;
}

TEST(ServiceServer, GenerateMatchesTheEngineAlone) {
  Server s;
  const v1::GenerateRequest r = ids_request({1, 50, 60, 70}, 12);
  const Streamed got = stream(*s.stub, r);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.finish, v1::FINISH_REASON_LENGTH);
  GenerateOptions o;
  o.max_tokens = 12;
  o.ignore_eos = true;
  static LoadedModel alone = load_model(kModel, 128, 64, false);
  const std::vector<int32_t> want = generate(*alone.model, {1, 50, 60, 70}, o).tokens;
  EXPECT_EQ(got.ids, std::vector<uint32_t>(want.begin(), want.end()));

  const Streamed bad = stream(*s.stub, ids_request({1, 384}, 4));
  EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bad.status.error_message().find("token_ids"), std::string::npos);
  v1::GenerateRequest hot = ids_request({1}, 4);
  hot.set_temperature(-1);
  const Streamed refused = stream(*s.stub, hot);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(refused.status.error_message(), "sampling: temperature -1 outside [0, 100]")
      << "the message names the field, without a source location";
}

// n completions in one call: completion i has the tokens of a call with n = 1 and seed + i, each
// ends once with its own usage, and the prompt's full blocks are computed once.
TEST(ServiceServer, CompletionsEachGiveTheTokensOfTheirSeed) {
  Server s;
  v1::GenerateRequest r = ids_request({1, 50, 60, 70, 80, 90, 100, 110, 120}, 10);
  r.set_temperature(0.9f);
  r.set_seed(11);
  r.set_n(3);
  const Streamed got = stream(*s.stub, r);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  ASSERT_EQ(got.completion_ids.size(), 3u);
  int64_t cached = 0;
  for (uint32_t i = 0; i < 3; ++i) {
    v1::GenerateRequest one = r;
    one.set_n(1);
    one.set_seed(11 + i);
    const Streamed want = stream(*s.stub, one);
    ASSERT_TRUE(want.status.ok());
    EXPECT_EQ(got.completion_ids.at(i), want.ids) << "completion " << i;
    ASSERT_EQ(got.finals.at(i).size(), 1u) << "one last message per completion";
    const v1::GenerateResponse& last = got.finals.at(i).front();
    EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(last.usage().prompt_tokens(), 9u);
    EXPECT_EQ(last.usage().completion_tokens(), 10u);
    cached += last.usage().cached_prompt_tokens();
  }
  EXPECT_NE(got.completion_ids.at(0), got.completion_ids.at(1)) << "sampled independently";
  // Two of the three take the prompt's two full blocks (8 tokens) from the one that computes
  // them.
  EXPECT_EQ(cached, 16);
  // Greedy completions are all the same; n = 0 is one completion.
  r.set_temperature(0);
  const Streamed greedy = stream(*s.stub, r);
  ASSERT_TRUE(greedy.status.ok());
  EXPECT_EQ(greedy.completion_ids.at(1), greedy.completion_ids.at(0));
  EXPECT_EQ(greedy.completion_ids.at(2), greedy.completion_ids.at(0));
  r.set_n(0);
  const Streamed single = stream(*s.stub, r);
  EXPECT_EQ(single.completion_ids.size(), 1u);
  EXPECT_EQ(single.ids, greedy.ids);
  r.set_n(17);
  const Streamed refused = stream(*s.stub, r);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(refused.status.error_message(), "n: 17 completions (at most 16, --max-completions)");
}

// A cancel or a deadline ends every completion of the call, and frees their blocks. 16
// completions of 120 tokens take about 150 ms on one core of a 2-core VM (more under load): the
// cancel and the deadline come first.
TEST(ServiceServer, ACancelEndsEveryCompletion) {
  Server s;
  v1::GenerateRequest r = ids_request({1, 50, 60, 70, 80}, 120);
  r.set_n(16);
  r.set_temperature(1);
  {
    grpc::ClientContext context;
    auto reader = s.stub->Generate(&context, r);
    v1::GenerateResponse m;
    ASSERT_TRUE(reader->Read(&m));
    context.TryCancel();
    while (reader->Read(&m)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(20));
    auto reader = s.stub->Generate(&context, r);
    v1::GenerateResponse m;
    while (reader->Read(&m)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  EngineStats st = s.engine->stats();
  while ((st.kv_blocks_used > 0 || st.running > 0 ||
          st.requests_cancelled + st.requests_deadline_exceeded < 32) &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    st = s.engine->stats();
  }
  EXPECT_EQ(st.kv_blocks_used, 0);
  EXPECT_EQ(st.running, 0);
  EXPECT_EQ(st.requests_cancelled + st.requests_deadline_exceeded, 32);
  EXPECT_EQ(st.requests_completed, 0);
}

TEST(ServiceServer, UnavailableWhileLoadingAndAfterClose) {
  Server s(false);
  Streamed r = stream(*s.stub, ids_request({1, 2}, 2));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(r.status.error_message().find("loading"), std::string::npos);
  grpc::ClientContext context;
  v1::ServerInfo info;
  EXPECT_EQ(s.stub->GetServerInfo(&context, {}, &info).error_code(), grpc::StatusCode::UNAVAILABLE);
  grpc::ClientContext context2;
  v1::TokenizeRequest t;
  t.set_text("the yard");
  v1::TokenizeResponse tr;
  EXPECT_TRUE(s.stub->Tokenize(&context2, t, &tr).ok()) << "tokenize works while loading";
  s.start();
  EXPECT_TRUE(stream(*s.stub, ids_request({1, 2}, 2)).status.ok());
  s.service->close(grpc::Status(grpc::StatusCode::UNAVAILABLE, "closed"));
  r = stream(*s.stub, ids_request({1, 2}, 2));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST(ServiceServer, CloseEndsOpenStreams) {
  Server s(false);  // attached but not running: requests wait in the queue
  s.service->attach(s.engine.get());
  grpc::ClientContext context;
  auto reader = s.stub->Generate(&context, ids_request({1, 2}, 8));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  s.service->close(grpc::Status(grpc::StatusCode::UNAVAILABLE, "a rank failed"));
  v1::GenerateResponse m;
  while (reader->Read(&m)) {
  }
  const grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(status.error_message(), "a rank failed");
  // The server forgets the stream in its OnDone, which may run just after the client's Finish.
  for (int i = 0; i < 200 && s.service->n_open_streams() != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(s.service->n_open_streams(), 0);
  s.start();  // the engine still holds the request's sink: its events must go nowhere
}

TEST(ServiceServer, StreamsEndingAtRandomMomentsLeaveNothingBehind) {
  Server s;
  constexpr int kStreams = 96;
  std::atomic<int> n_ok{0}, n_cancelled{0}, n_deadline{0}, n_other{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < 8; ++t) {
    clients.emplace_back([&, t] {
      std::mt19937 rng(static_cast<uint32_t>(t));
      for (int i = t; i < kStreams; i += 8) {
        grpc::ClientContext context;
        const int mode = static_cast<int>(rng() % 4);  // read all, cancel, drop, deadline
        if (mode == 3)
          context.set_deadline(std::chrono::system_clock::now() +
                               std::chrono::milliseconds(1 + rng() % 30));
        const uint32_t n = static_cast<uint32_t>(8 + rng() % 40);
        v1::GenerateRequest r = ids_request({1, static_cast<uint32_t>(3 + rng() % 300), 7}, n);
        r.set_n(1 + rng() % 3);
        r.set_temperature(0.5f);
        auto reader = s.stub->Generate(&context, r);
        const int stop_after = static_cast<int>(rng() % 6);
        v1::GenerateResponse m;
        int k = 0;
        while (reader->Read(&m)) {
          if (mode == 1 && ++k == stop_after) context.TryCancel();
          if (mode == 2 && ++k == stop_after) break;
        }
        if (mode == 2) context.TryCancel();  // walk away without reading the rest
        const grpc::Status status = reader->Finish();
        if (status.ok())
          ++n_ok;
        else if (status.error_code() == grpc::StatusCode::CANCELLED)
          ++n_cancelled;
        else if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED)
          ++n_deadline;
        else
          ++n_other;
      }
    });
  }
  for (auto& c : clients) c.join();
  std::printf("%d OK, %d cancelled, %d past their deadline, %d other\n", n_ok.load(),
              n_cancelled.load(), n_deadline.load(), n_other.load());
  EXPECT_EQ(n_ok + n_cancelled + n_deadline, kStreams);
  EXPECT_GT(n_ok, 0);
  EXPECT_GT(n_cancelled, 0);
  EXPECT_EQ(n_other, 0);
  // Every request ends in the engine and every call in gRPC.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  EngineStats st = s.engine->stats();
  while ((st.kv_blocks_used > 0 || st.running > 0 || st.queue_depth > 0 ||
          s.service->n_open_streams() > 0) &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    st = s.engine->stats();
  }
  EXPECT_EQ(st.kv_blocks_used, 0);
  EXPECT_EQ(st.running, 0);
  EXPECT_EQ(st.queue_depth, 0);
  EXPECT_EQ(s.service->n_open_streams(), 0);
  EXPECT_TRUE(stream(*s.stub, ids_request({1, 2}, 3)).status.ok());
}

}  // namespace
}  // namespace sy
