// `switchyard client`: calls a running server over gRPC.
//
//   generate     streams the generated text to stdout as it arrives, then one summary line
//                (with --n above 1: each completion's text and summary once it has ended)
//   tokenize     prints the ids and pieces of a text
//   detokenize   prints the text of ids
//   info         prints the model, the rank layout and the server's load
//   health       prints SERVING or NOT_SERVING (exit 1 unless SERVING)
//
// A call that ends with a non-OK status prints "CODE: message" on stderr and exits 1.
#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "grpc/health/v1/health.grpc.pb.h"
#include "launch/commands.h"
#include "launch/rpc.h"
#include "switchyard/v1/switchyard.grpc.pb.h"

namespace sy::launch {
namespace {

namespace v1 = ::switchyard::v1;
namespace health = ::grpc::health::v1;

int report(const grpc::Status& status) {
  if (status.ok()) return 0;
  std::fflush(stdout);
  std::fprintf(stderr, "%s: %s\n", status_code_name(status.error_code()),
               status.error_message().c_str());
  return 1;
}

const char* finish_name(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    case v1::FINISH_REASON_ERROR:
      return "error";
    default:
      return "none";
  }
}

// "id logprob  top: id logprob ..." for one token.
std::string logprob_line(const v1::TokenLogprobs& lp) {
  char line[64];
  std::snprintf(line, sizeof(line), "%u %.4f  top:", lp.token_id(), lp.logprob());
  std::string out = line;
  for (const v1::TopLogprob& t : lp.top()) {
    std::snprintf(line, sizeof(line), " %u %.4f", t.token_id(), t.logprob());
    out += line;
  }
  return out + "\n";
}

// What one completion of a Generate call received.
struct Completion {
  std::string text, ids, logprobs, prompt_logprobs;
  v1::GenerateResponse last;  // the message with the finish reason and usage

  void add(const v1::GenerateResponse& message) {
    text += message.text();
    for (uint32_t id : message.token_ids()) ids += " " + std::to_string(id);
    for (const v1::TokenLogprobs& lp : message.logprobs()) logprobs += logprob_line(lp);
    for (const v1::TokenLogprobs& lp : message.prompt_logprobs())
      prompt_logprobs += logprob_line(lp);
    if (message.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) last = message;
  }
  bool ended() const { return last.finish_reason() != v1::FINISH_REASON_UNSPECIFIED; }
  void print_summary(bool print_ids) const {
    if (print_ids) std::printf("ids:%s\n", ids.c_str());
    if (!prompt_logprobs.empty())
      std::printf("prompt logprobs (id logprob, then the top ids):\n%s", prompt_logprobs.c_str());
    if (!logprobs.empty())
      std::printf("logprobs (id logprob, then the top ids):\n%s", logprobs.c_str());
    const v1::Usage& u = last.usage();
    std::printf(
        "finish: %s, prompt tokens: %u, completion tokens: %u, queue: %.1f ms, "
        "first token: %.1f ms, total: %.1f ms, preemptions: %u, cached prompt tokens: %u\n",
        finish_name(last.finish_reason()), u.prompt_tokens(), u.completion_tokens(),
        u.queue_time_ms(), u.time_to_first_token_ms(), u.total_time_ms(), u.preemptions(),
        u.cached_prompt_tokens());
  }
};

int generate(v1::Switchyard::Stub& stub, const ClientArgs& a) {
  SY_CHECK(a.prompt.empty() != a.prompt_ids.empty(), "give --prompt or --prompt-ids");
  v1::GenerateRequest request;
  if (!a.prompt_ids.empty()) {
    for (int32_t id : parse_ids(a.prompt_ids, "--prompt-ids"))
      request.mutable_token_ids()->add_ids(static_cast<uint32_t>(id));
  } else {
    request.set_text(a.prompt);
  }
  SY_CHECK(a.max_tokens >= 0, "--max-tokens ", a.max_tokens, " must be >= 0");
  request.set_max_tokens(static_cast<uint32_t>(a.max_tokens));
  request.set_temperature(a.sampling.temperature);
  request.set_top_k(static_cast<uint32_t>(a.sampling.top_k));
  request.set_top_p(a.sampling.top_p);
  request.set_min_p(a.sampling.min_p);
  request.set_repetition_penalty(a.sampling.repetition_penalty);
  request.set_presence_penalty(a.sampling.presence_penalty);
  request.set_frequency_penalty(a.sampling.frequency_penalty);
  if (a.has_seed) request.set_seed(a.sampling.seed);
  for (const auto& [id, bias] : parse_logit_bias(a.logit_bias, "--logit-bias"))
    (*request.mutable_logit_bias())[static_cast<uint32_t>(id)] = bias;
  SY_CHECK(a.sampling.min_tokens >= 0, "--min-tokens ", a.sampling.min_tokens, " must be >= 0");
  request.set_min_tokens(static_cast<uint32_t>(a.sampling.min_tokens));
  for (const std::string& s : a.stop) request.add_stop(s);
  for (int64_t id : a.stop_token_ids) request.add_stop_token_ids(static_cast<uint32_t>(id));
  request.set_ignore_eos(a.ignore_eos);
  request.set_logprobs(static_cast<uint32_t>(a.logprobs));
  SY_CHECK(a.prompt_logprobs >= 0, "--prompt-logprobs ", a.prompt_logprobs, " must be >= 0");
  request.set_prompt_logprobs(static_cast<uint32_t>(a.prompt_logprobs));
  request.set_priority(a.priority);
  request.set_skip_bos(a.skip_bos);

  SY_CHECK(a.n >= 0, "--n ", a.n, " must be >= 0");
  request.set_n(static_cast<uint32_t>(a.n));

  grpc::ClientContext context;
  if (a.deadline_ms > 0) set_timeout(context, static_cast<double>(a.deadline_ms) / 1000);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub.Generate(&context, request);
  // One completion streams its text as it arrives; several print each one whole when it ends.
  const bool streaming = a.n <= 1;
  std::map<uint32_t, Completion> completions;
  v1::GenerateResponse message;
  while (reader->Read(&message)) {
    Completion& c = completions[message.index()];
    if (streaming) {
      std::fwrite(message.text().data(), 1, message.text().size(), stdout);
      std::fflush(stdout);
    }
    c.add(message);
    if (!streaming && c.ended()) {
      std::printf("[completion %u]\n%s\n", message.index(), c.text.c_str());
      c.print_summary(a.print_ids);
      std::fflush(stdout);
    }
  }
  const grpc::Status status = reader->Finish();
  if (streaming) std::printf("\n");
  if (!status.ok()) return report(status);
  if (streaming) completions[0].print_summary(a.print_ids);
  return 0;
}

int tokenize(v1::Switchyard::Stub& stub, const ClientArgs& a) {
  v1::TokenizeRequest request;
  request.set_text(a.text);
  request.set_add_bos(a.add_bos);
  v1::TokenizeResponse response;
  grpc::ClientContext context;
  set_timeout(context, a.timeout_s);
  const grpc::Status status = stub.Tokenize(&context, request, &response);
  if (!status.ok()) return report(status);
  std::string ids;
  for (uint32_t id : response.ids()) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  std::printf("ids: %s\n", ids.c_str());
  std::printf("pieces:");
  for (const std::string& p : response.pieces()) std::printf(" %s", p.c_str());
  std::printf("\n");
  return 0;
}

int detokenize(v1::Switchyard::Stub& stub, const ClientArgs& a) {
  v1::DetokenizeRequest request;
  for (int32_t id : parse_ids(a.ids, "--ids")) request.add_ids(static_cast<uint32_t>(id));
  v1::DetokenizeResponse response;
  grpc::ClientContext context;
  set_timeout(context, a.timeout_s);
  const grpc::Status status = stub.Detokenize(&context, request, &response);
  if (!status.ok()) return report(status);
  std::printf("%s\n", response.text().c_str());
  return 0;
}

int info(v1::Switchyard::Stub& stub, const ClientArgs& a) {
  v1::ModelInfo m;
  {
    grpc::ClientContext context;
    set_timeout(context, a.timeout_s);
    const grpc::Status status = stub.GetModelInfo(&context, v1::GetModelInfoRequest(), &m);
    if (!status.ok()) return report(status);
  }
  std::printf("# model\n");
  std::printf("  %-22s %s\n", "model_path", m.model_path().c_str());
  std::printf("  %-22s %u\n", "hidden_size", m.hidden_size());
  std::printf("  %-22s %u\n", "intermediate_size", m.intermediate_size());
  std::printf("  %-22s %u\n", "num_hidden_layers", m.num_hidden_layers());
  std::printf("  %-22s %u\n", "num_attention_heads", m.num_attention_heads());
  std::printf("  %-22s %u\n", "num_key_value_heads", m.num_key_value_heads());
  std::printf("  %-22s %u\n", "head_dim", m.head_dim());
  std::printf("  %-22s %u\n", "num_local_experts", m.num_local_experts());
  std::printf("  %-22s %u\n", "num_experts_per_tok", m.num_experts_per_tok());
  std::printf("  %-22s %u\n", "vocab_size", m.vocab_size());
  std::printf("  %-22s %u\n", "sliding_window_tokens", m.sliding_window_tokens());
  std::printf("  %-22s %g\n", "rope_theta", m.rope_theta());
  std::printf("  %-22s %u\n", "context_limit_tokens", m.context_limit_tokens());
  std::printf("  %-22s %s\n", "device", m.device().c_str());
  std::printf("# layout: world %u, tp %u, ep %u, moe exchange %s\n", m.world_size(), m.tp(), m.ep(),
              m.moe_exchange().c_str());
  std::printf("#  rank  tp_rank  ep_rank  q_heads    experts\n");
  for (const v1::RankInfo& r : m.ranks()) {
    std::string heads = "[" + std::to_string(r.first_head()) + "," +
                        std::to_string(r.first_head() + r.n_heads()) + ")";
    std::string experts;
    for (uint32_t e : r.experts()) experts += (experts.empty() ? "" : ",") + std::to_string(e);
    std::printf("  %5u  %7u  %7u  %-9s  %s\n", r.rank(), r.tp_rank(), r.ep_rank(), heads.c_str(),
                experts.c_str());
  }
  v1::ServerInfo s;
  grpc::ClientContext context;
  set_timeout(context, a.timeout_s);
  const grpc::Status status = stub.GetServerInfo(&context, v1::GetServerInfoRequest(), &s);
  if (!status.ok()) return report(status);
  std::printf("# server\n");
  std::printf("  %-26s %u\n", "queue_depth", s.queue_depth());
  std::printf("  %-26s %u\n", "queued_tokens", s.queued_tokens());
  std::printf("  %-26s %u\n", "running_requests", s.running_requests());
  std::printf("  %-26s %u / %u\n", "kv_blocks_used / total", s.kv_blocks_used(),
              s.kv_blocks_total());
  std::printf("  %-26s %u\n", "kv_blocks_cached", s.kv_blocks_cached());
  std::printf("  %-26s %u\n", "kv_block_size_tokens", s.kv_block_size_tokens());
  std::printf("  %-26s %.1f\n", "recent_tokens_per_second", s.recent_tokens_per_second());
  std::printf("  %-26s %.1f\n", "uptime_s", s.uptime_s());
  std::printf("  %-26s %llu\n", "requests_completed",
              static_cast<unsigned long long>(s.requests_completed()));
  std::printf("  %-26s %llu\n", "requests_cancelled",
              static_cast<unsigned long long>(s.requests_cancelled()));
  std::printf("  %-26s %llu\n", "requests_deadline_exceeded",
              static_cast<unsigned long long>(s.requests_deadline_exceeded()));
  std::printf("  %-26s %llu\n", "steps", static_cast<unsigned long long>(s.steps()));
  std::printf("  %-26s %llu / %llu\n", "prefix_cache_hit / queried",
              static_cast<unsigned long long>(s.prefix_cache_hit_tokens()),
              static_cast<unsigned long long>(s.prefix_cache_queried_tokens()));
  std::printf("  %-26s %s\n", "draining", s.draining() ? "yes" : "no");
  return 0;
}

int check_health(const std::shared_ptr<grpc::Channel>& channel, const ClientArgs& a) {
  std::unique_ptr<health::Health::Stub> stub = health::Health::NewStub(channel);
  health::HealthCheckRequest request;
  request.set_service(a.service);
  health::HealthCheckResponse response;
  grpc::ClientContext context;
  set_timeout(context, a.timeout_s);
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return report(status);
  const std::string name = health::HealthCheckResponse::ServingStatus_Name(response.status());
  std::printf("%s\n", name.c_str());
  return response.status() == health::HealthCheckResponse::SERVING ? 0 : 1;
}

}  // namespace

void add_client(CLI::App& app, ClientArgs& a) {
  CLI::App* client = app.add_subcommand("client", "Call a running switchyard server");
  client->require_subcommand(1);
  client->add_option("--target", a.target, "host:port of the server")->capture_default_str();
  client->add_option("--timeout-s", a.timeout_s, "Deadline of unary calls in seconds")
      ->capture_default_str();

  CLI::App* gen = client->add_subcommand("generate", "Stream generated text");
  auto* prompt = gen->add_option("--prompt", a.prompt, "Prompt text (BOS is added)");
  auto* ids = gen->add_option("--prompt-ids", a.prompt_ids, "Prompt token ids, e.g. 1,2,3");
  prompt->excludes(ids);
  ids->excludes(prompt);
  gen->add_flag("--skip-bos", a.skip_bos, "Do not add BOS before a --prompt text");
  gen->add_option("--max-tokens", a.max_tokens, "Tokens to generate at most (0 = 16)")
      ->capture_default_str();
  gen->add_option("--temperature", a.sampling.temperature, "0 = greedy")->capture_default_str();
  gen->add_option("--top-k", a.sampling.top_k, "0 = off")->capture_default_str();
  gen->add_option("--top-p", a.sampling.top_p, "1 = off")->capture_default_str();
  gen->add_option("--min-p", a.sampling.min_p, "0 = off")->capture_default_str();
  gen->add_option("--repetition-penalty", a.sampling.repetition_penalty, "1 = off")
      ->capture_default_str();
  gen->add_option("--presence-penalty", a.sampling.presence_penalty,
                  "Subtracted from generated tokens' logits once, in [-2, 2]; 0 = off")
      ->capture_default_str();
  gen->add_option("--frequency-penalty", a.sampling.frequency_penalty,
                  "Subtracted once per time a token was generated, in [-2, 2]; 0 = off")
      ->capture_default_str();
  gen->add_option("--seed", a.sampling.seed, "Sampling seed (default: chosen by the server)")
      ->each([&a](const std::string&) { a.has_seed = true; });
  gen->add_option("--logit-bias", a.logit_bias,
                  "ID:BIAS added to a token's logit before the penalties, in [-100, 100] "
                  "(repeatable)");
  gen->add_option("--min-tokens", a.sampling.min_tokens,
                  "Tokens generated before an end-of-sequence token, a stop id or a stop string "
                  "may end generation")
      ->capture_default_str();
  gen->add_option("--stop", a.stop, "Stop string (repeatable)");
  gen->add_option("--stop-token-id", a.stop_token_ids,
                  "Token id that ends generation (repeatable)");
  gen->add_flag("--ignore-eos", a.ignore_eos, "Keep generating past end-of-sequence tokens");
  gen->add_option("--logprobs", a.logprobs, "Top-n log-probabilities per token (0 = none)")
      ->capture_default_str();
  gen->add_option("--prompt-logprobs", a.prompt_logprobs,
                  "Top-n log-probabilities of each prompt token after the first (0 = none)")
      ->capture_default_str();
  gen->add_option("--deadline-ms", a.deadline_ms, "Deadline of the call (0 = none)")
      ->capture_default_str();
  gen->add_option("--priority", a.priority, "Lower is served first")->capture_default_str();
  gen->add_option("--n", a.n,
                  "Completions of the prompt (seed + i each); more than 1 prints each whole "
                  "when it ends")
      ->capture_default_str();
  gen->add_flag("--print-ids", a.print_ids, "Print the generated ids on one line");

  CLI::App* tok = client->add_subcommand("tokenize", "Text to token ids");
  tok->add_option("--text", a.text, "Text")->required();
  tok->add_flag("--add-bos", a.add_bos, "Put BOS first");
  CLI::App* detok = client->add_subcommand("detokenize", "Token ids to text");
  detok->add_option("--ids", a.ids, "Token ids, e.g. 1,2,3")->required();
  client->add_subcommand("info", "Model, rank layout and server load");
  CLI::App* h = client->add_subcommand("health", "SERVING or NOT_SERVING (exit 1 unless SERVING)");
  h->add_option("--service", a.service, "Service name (\"\" = the whole server)");
}

int run_client(const CLI::App& app, const ClientArgs& a) {
  const CLI::App* client = app.get_subcommand("client");
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel(a.target, grpc::InsecureChannelCredentials());
  std::unique_ptr<v1::Switchyard::Stub> stub = v1::Switchyard::NewStub(channel);
  if (client->got_subcommand("generate")) return generate(*stub, a);
  if (client->got_subcommand("tokenize")) return tokenize(*stub, a);
  if (client->got_subcommand("detokenize")) return detokenize(*stub, a);
  if (client->got_subcommand("info")) return info(*stub, a);
  if (client->got_subcommand("health")) return check_health(channel, a);
  return 1;
}

}  // namespace sy::launch
