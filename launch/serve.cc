// `switchyard serve`: the serving runtime. Every rank runs this under mpirun (a world of one is
// fine). Rank 0 starts the gRPC server first (health NOT_SERVING), every rank loads its weights,
// then rank 0 turns SERVING and runs the engine loop while the other ranks follow its step plans.
//
// Shutdown: SIGTERM, SIGINT or SIGUSR1 on rank 0 drains the engine (no new requests, running
// ones finish, health NOT_SERVING); after --grace-period-s, or at a second signal, the engine
// stops and open requests end UNAVAILABLE. The engine loop then tells the other ranks to exit,
// rank 0 shuts the server down, and every rank exits 0. Other ranks ignore these signals: they
// leave when rank 0's exit plan arrives. A failing rank aborts the whole job (MpiEnv::fail).
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "launch/commands.h"
#include "parallel/context.h"
#include "parallel/mpi_env.h"
#include "runtime/engine/engine.h"
#include "runtime/engine/generator.h"
#include "runtime/formats/chat_template.h"
#include "runtime/formats/tokenizer.h"
#include "runtime/server/http.h"
#include "runtime/server/metrics.h"
#include "runtime/server/openai_service.h"
#include "runtime/server/service.h"

namespace sy::launch {
namespace {

using Clock = std::chrono::steady_clock;

sigset_t shutdown_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGUSR1);
  return set;
}

// Rank 0's shutdown signals, taken with sigtimedwait on a thread of their own (drain() and
// stop() lock mutexes, which a signal handler must not). The signals are blocked in every other
// thread. The first signal drains; the grace period running out, or a second signal, stops.
class ShutdownSignals {
 public:
  ShutdownSignals(double grace_period_s, std::function<void()> on_drain)
      : grace_(std::chrono::duration_cast<Clock::duration>(
            std::chrono::duration<double>(grace_period_s))),
        on_drain_(std::move(on_drain)),
        thread_([this] { loop(); }) {}
  ~ShutdownSignals() {
    done_.store(true);
    thread_.join();
  }
  ShutdownSignals(const ShutdownSignals&) = delete;
  ShutdownSignals& operator=(const ShutdownSignals&) = delete;

  // Signals now go to `engine`; a drain or stop asked for while loading is applied at once.
  void attach(Engine* engine) {
    std::lock_guard<std::mutex> lock(mu_);
    engine_ = engine;
    if (draining_) engine_->drain();
    if (stopping_) engine_->stop();
  }
  bool draining() const {
    std::lock_guard<std::mutex> lock(mu_);
    return draining_;
  }
  // Before the engine goes away.
  void detach() {
    std::lock_guard<std::mutex> lock(mu_);
    engine_ = nullptr;
  }

 private:
  void loop() {
    const sigset_t set = shutdown_signals();
    while (!done_.load()) {
      // Wake at least every 100 ms (to see done_), and when the grace period ends.
      auto wait = std::chrono::nanoseconds(std::chrono::milliseconds(100));
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (draining_ && !stopping_)
          wait = std::clamp<std::chrono::nanoseconds>(stop_at_ - Clock::now(),
                                                      std::chrono::nanoseconds(0), wait);
      }
      const timespec poll = {0, static_cast<long>(wait.count())};
      const int sig = sigtimedwait(&set, nullptr, &poll);
      std::lock_guard<std::mutex> lock(mu_);
      if (sig > 0 && !draining_) {
        draining_ = true;
        stop_at_ = Clock::now() + grace_;
        std::fprintf(stderr, "switchyard: %s: draining; stopping in %.0f s at the latest\n",
                     strsignal(sig), std::chrono::duration<double>(grace_).count());
        if (engine_ != nullptr) engine_->drain();
        on_drain_();
      } else if (sig > 0 && !stopping_) {
        std::fprintf(stderr, "switchyard: %s again: stopping now\n", strsignal(sig));
        stop();
      } else if (draining_ && !stopping_ && Clock::now() >= stop_at_) {
        std::fprintf(stderr, "switchyard: grace period over: stopping\n");
        stop();
      }
    }
  }
  void stop() {  // mu_ held
    stopping_ = true;
    if (engine_ != nullptr) engine_->stop();
  }

  const Clock::duration grace_;
  const std::function<void()> on_drain_;
  mutable std::mutex mu_;
  Engine* engine_ = nullptr;
  bool draining_ = false;
  bool stopping_ = false;
  Clock::time_point stop_at_;
  std::atomic<bool> done_{false};
  std::thread thread_;  // last: starts once the rest is built
};

void set_serving(grpc::Server& server, bool serving) {
  grpc::HealthCheckServiceInterface* health = server.GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus("", serving);
  health->SetServingStatus(kServiceName, serving);
}

void print_config(const ServeConfig& config, const ModelConfig& model, int tp,
                  size_t kv_bytes_per_value) {
  std::fprintf(stderr, "# serve\n");
  for (const auto& [name, value] : config.table(model, tp, kv_bytes_per_value))
    std::fprintf(stderr, "  %-22s %s\n", name.c_str(), value.c_str());
}

// --chat-template FILE, or the checkpoint's own; null when neither. A template the renderer
// cannot run ends start-up here.
std::unique_ptr<ChatTemplate> load_chat_template(const ServeConfig& sc) {
  std::string source;
  std::string from = sc.chat_template;
  if (!sc.chat_template.empty()) {
    std::ifstream in(sc.chat_template);
    SY_CHECK(in.good(), "--chat-template ", sc.chat_template, ": cannot read the file");
    std::stringstream text;
    text << in.rdbuf();
    source = text.str();
  } else {
    source = ChatTemplate::find(sc.model);
    from = sc.model + "'s chat_template";
  }
  if (source.empty()) return nullptr;
  try {
    return std::make_unique<ChatTemplate>(source);
  } catch (const TemplateError& e) {
    SY_FAIL(from, ": ", e.message());
  }
}

// Renders with Hugging Face's context: the messages, add_generation_prompt and the special
// tokens' text.
std::function<std::string(const Json&, bool)> chat_renderer(const ChatTemplate& chat,
                                                            const Tokenizer& tokenizer) {
  Json special = {
      {"bos_token", tokenizer.bos_id() >= 0 ? tokenizer.piece(tokenizer.bos_id()) : ""},
      {"eos_token", tokenizer.eos_ids().empty()
                        ? ""
                        : tokenizer.piece(static_cast<int32_t>(tokenizer.eos_ids()[0]))},
      {"unk_token", tokenizer.piece(0)}};
  return [&chat, special](const Json& messages, bool add_generation_prompt) {
    Json context = special;
    context["messages"] = messages;
    context["add_generation_prompt"] = add_generation_prompt;
    try {
      return chat.render(context);
    } catch (const TemplateError& e) {
      throw ApiError(400, "messages: " + e.message(), "messages");
    }
  };
}

// The OpenAI-compatible HTTP front door: its metrics, its service and its server, listening
// from construction when --http-listen is set.
struct HttpFront {
  Metrics metrics;
  const std::unique_ptr<ChatTemplate> chat;
  OpenAiService service;
  HttpServer server;
  std::string address;  // host:port it listens on; empty when it does not

  HttpFront(const ServeConfig& sc, const ModelConfig& config, const Tokenizer& tokenizer)
      : metrics(sc.model_name(), sc.context_limit(config), config.num_local_experts,
                sc.metrics_prefix),
        chat(load_chat_template(sc)),
        service(tokenizer, config.vocab_size, options(sc, config, tokenizer, chat.get()), &metrics),
        server([this](const HttpRequest& request,
                      HttpResponder& responder) { service.handle(request, responder); },
               OpenAiService::error_body, limits(sc)) {
    if (sc.http_listen.empty()) return;
    const int port = server.start(sc.http_listen);
    address = sc.http_listen.substr(0, sc.http_listen.rfind(':')) + ":" + std::to_string(port);
  }
  // Ends the open calls with 503 `message`, then stops the server after up to `grace_s`.
  void close(OpenAiService::State state, const std::string& message, double grace_s) {
    service.set_state(state);
    service.close(message);
    server.stop(grace_s);
  }
  void attach(Engine& engine) {
    metrics.attach(&engine);
    engine.set_observer(&metrics);
    service.attach(&engine);
  }
  static OpenAiOptions options(const ServeConfig& sc, const ModelConfig& config,
                               const Tokenizer& tokenizer, const ChatTemplate* chat) {
    OpenAiOptions o;
    o.model_name = sc.model_name();
    o.context_limit = sc.context_limit(config);
    o.api_key = sc.api_key;
    o.max_choices = sc.max_completions;
    if (chat != nullptr) o.render_chat = chat_renderer(*chat, tokenizer);
    return o;
  }
  static HttpLimits limits(const ServeConfig& sc) {
    HttpLimits l;
    l.max_connections = sc.http_max_connections;
    l.max_body_bytes = static_cast<size_t>(sc.http_max_body_bytes);
    return l;
  }
};

int serve_root(const ServeArgs& a, const ModelConfig& config, ParallelContext& par,
               const Backend& backend) {
  const ServeConfig& sc = a.config;
  std::unique_ptr<Tokenizer> tokenizer =
      Tokenizer::load(sc.model, config.bos_token_id, config.eos_token_ids);
  Service service(*tokenizer, model_info(sc.model, config, par.config, sc.context_limit(config),
                                         a.backend.device));
  LoadedModel loaded;
  std::unique_ptr<Engine> engine;

  // The server first, so that clients can see the health status while the weights load.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // Without this, Linux lets a second server bind the same port and both half-work.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  int port = 0;
  builder.AddListeningPort(sc.listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  SY_CHECK(server != nullptr && port != 0, "cannot listen on ", sc.listen,
           ": the address is in use or invalid");
  set_serving(*server, false);
  const std::string address =
      sc.listen.substr(0, sc.listen.rfind(':')) + ":" + std::to_string(port);
  // The HTTP server too, answering /health with 503 while loading.
  HttpFront front(sc, config, *tokenizer);
  ShutdownSignals signals(sc.grace_period_s, [&] {
    set_serving(*server, false);
    front.service.set_state(OpenAiService::State::kDraining);
  });

  print_config(sc, config, par.config.tp, dtype_size(backend.ops->storage_dtype()));
  std::fprintf(stderr, "  %-22s %s\n", "device", backend.description.c_str());
  loaded = load_model(sc.model, config, sc.model_limits(config), true, &par, backend.ops.get(),
                      a.backend.weight_format());
  print_layout(par, config, loaded.model->weights());
  engine = std::make_unique<Engine>(*loaded.model, *tokenizer, sc.engine_options(), par.world);
  SY_CHECK(engine->context_limit() == sc.context_limit(config), "the engine's context limit ",
           engine->context_limit(), " differs from the ", sc.context_limit(config),
           " tokens GetModelInfo reports");
  service.attach(engine.get());
  front.attach(*engine);
  signals.attach(engine.get());
  if (!signals.draining()) {
    set_serving(*server, true);
    front.service.set_state(OpenAiService::State::kServing);
  }
  if (!front.address.empty()) std::printf("http (OpenAI API) on %s\n", front.address.c_str());
  std::printf("serving %s on %s\n", sc.model.c_str(), address.c_str());
  std::fflush(stdout);

  try {
    engine->run();
  } catch (const std::exception& e) {
    // A rank failed (or this one did): end the open streams with UNAVAILABLE, give them a
    // moment to reach their clients, then abort the job.
    set_serving(*server, false);
    const std::string why = std::string("a rank failed: ") + e.what();
    service.close(grpc::Status(grpc::StatusCode::UNAVAILABLE, why));
    front.close(OpenAiService::State::kFailed, why, 0.5);
    const auto until = Clock::now() + std::chrono::seconds(1);
    while (service.n_open_streams() > 0 && Clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    // Peers may wait in a collective: end the job now rather than after unwinding.
    if (par.config.world > 1) MpiEnv::abort_job(e.what());
    signals.detach();
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    throw;
  }
  signals.detach();
  set_serving(*server, false);
  // Every request has ended; anything that slipped in since is refused.
  service.close(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server stopped"));
  front.close(OpenAiService::State::kDraining, "the server stopped", 2);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  std::fprintf(stderr, "switchyard: stopped\n");
  return 0;
}

}  // namespace

void add_serve(CLI::App& app, ServeArgs& a) {
  CLI::App* cmd = app.add_subcommand("serve", "Serve a model over gRPC (run under mpirun)");
  ServeConfig& c = a.config;
  cmd->add_option("--model", c.model, "Model directory (Hugging Face layout) or GGUF file")
      ->required();
  cmd->add_option("--listen", c.listen, "host:port of the gRPC server (port 0 = any free port)")
      ->capture_default_str();
  add_layout_flags(cmd, a.tp, a.ep, a.moe_exchange);
  add_device_flags(cmd, a.backend);
  cmd->add_option("--max-batch-tokens", c.max_batch_tokens,
                  "Tokens per step (prefill chunks + decode tokens)")
      ->capture_default_str();
  cmd->add_option("--max-running", c.max_running, "Sequences running at once")
      ->capture_default_str();
  cmd->add_option("--max-queue-requests", c.max_queue_requests,
                  "Requests waiting for admission; more are refused (RESOURCE_EXHAUSTED)")
      ->capture_default_str();
  cmd->add_option("--max-queue-tokens", c.max_queue_tokens,
                  "Prompt tokens of waiting requests; more are refused (RESOURCE_EXHAUSTED)")
      ->capture_default_str();
  cmd->add_option("--max-completions", c.max_completions,
                  "Completions one Generate call may ask for (its n); more are INVALID_ARGUMENT")
      ->capture_default_str();
  cmd->add_option("--kv-blocks", c.kv_blocks,
                  "KV-cache blocks per rank (0 = --max-running full contexts)")
      ->capture_default_str();
  cmd->add_option("--block-size", c.block_size, "Tokens per KV-cache block")->capture_default_str();
  cmd->add_option("--max-context", c.max_context,
                  "Prompt + generated tokens of one request (0 = max_position_embeddings)")
      ->capture_default_str();
  cmd->add_flag("!--no-prefix-cache", c.prefix_caching,
                "Do not keep or reuse the KV blocks of prompts' shared prefixes");
  cmd->add_option("--http-listen", c.http_listen,
                  "host:port of the OpenAI-compatible HTTP server (empty = none; port 0 = any)");
  cmd->add_option("--served-model-name", c.served_model_name,
                  "The model's id in the HTTP API (default: the --model path)");
  cmd->add_option("--api-key", c.api_key,
                  "HTTP API key clients must send as 'Authorization: Bearer KEY' (or set "
                  "SWITCHYARD_API_KEY; the flag shows in ps)")
      ->envname("SWITCHYARD_API_KEY");
  cmd->add_option("--chat-template", c.chat_template,
                  "Jinja chat template file for /v1/chat/completions (default: the checkpoint's "
                  "tokenizer_config.json chat_template)");
  cmd->add_option("--metrics-prefix", c.metrics_prefix,
                  "Prefix of the /metrics names: switchyard: (vLLM-like) or switchyard_")
      ->capture_default_str();
  cmd->add_option("--metrics-interval-s", c.metrics_interval_s,
                  "Seconds between the steps that gather every rank's figures for /metrics "
                  "(one broadcast per rank then; 0 = every step)")
      ->capture_default_str();
  cmd->add_option("--http-max-connections", c.http_max_connections,
                  "Open HTTP connections at most; more get 503")
      ->capture_default_str();
  cmd->add_option("--http-max-body-bytes", c.http_max_body_bytes,
                  "Bytes of one HTTP request body at most; more get 413")
      ->capture_default_str();
  cmd->add_option("--grace-period-s", c.grace_period_s,
                  "After SIGTERM/SIGINT/SIGUSR1: seconds for running requests to finish")
      ->capture_default_str();
}

int run_serve(const ServeArgs& a) {
  a.config.validate();
  a.backend.validate();
  // Block the shutdown signals before MPI and gRPC start their threads, which inherit the mask:
  // rank 0 takes them on its signal thread, the other ranks ignore them.
  const sigset_t signals = shutdown_signals();
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  MpiEnv env(nullptr, nullptr);
  std::unique_ptr<Communicator> world = make_mpi_world_communicator();
  if (!env.is_root())
    for (int sig : {SIGTERM, SIGINT, SIGUSR1}) std::signal(sig, SIG_IGN);
  const ModelConfig config = ModelConfig::load(a.config.model);
  ParallelConfig pc;
  pc.world = env.size();
  pc.rank = env.rank();
  pc.tp = a.tp;
  pc.ep = a.ep;
  pc.exchange = parse_moe_exchange(a.moe_exchange);
  pc.validate(config.layout_shape());                        // before any weight is read
  const ModelLimits limits = a.config.model_limits(config);  // validates the budgets
  const Backend backend = make_backend(a.backend, world.get(), env.local_rank());
  std::unique_ptr<ParallelContext> par =
      ParallelContext::create(pc, backend.world ? *backend.world : *world);
  if (env.is_root()) return serve_root(a, config, *par, backend);

  LoadedModel loaded = load_model(a.config.model, config, limits, false, par.get(),
                                  backend.ops.get(), a.backend.weight_format());
  print_layout(*par, config, loaded.model->weights());
  Engine::run_worker(*loaded.model, *world);
  return 0;
}

}  // namespace sy::launch
