// The gRPC service (see service.h).
#include "runtime/server/service.h"

#include <algorithm>
#include <deque>
#include <utility>

namespace sy {
namespace {

using Clock = std::chrono::steady_clock;
using Code = RequestError::Code;

// What a client sees of an error: sy::Error's message without its source location.
std::string client_message(const std::exception& e) {
  if (const auto* error = dynamic_cast<const Error*>(&e)) return error->message();
  return e.what();
}

void check_ids(const google::protobuf::RepeatedField<uint32_t>& ids, int64_t vocab_size,
               const char* field) {
  for (int i = 0; i < ids.size(); ++i)
    if (static_cast<int64_t>(ids[i]) >= vocab_size)
      throw RequestError(Code::kInvalidArgument, token_id_error(field, i, ids[i], vocab_size));
}

v1::FinishReason finish_reason(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return v1::FINISH_REASON_UNSPECIFIED;
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kCancelled:
    case FinishReason::kDeadline:
      return v1::FINISH_REASON_CANCELLED;
    case FinishReason::kError:
    case FinishReason::kUnavailable:
      return v1::FINISH_REASON_ERROR;
  }
  return v1::FINISH_REASON_ERROR;
}

}  // namespace

// ---- conversions -------------------------------------------------------------------------------

RequestParams request_params(const v1::GenerateRequest& r, const Tokenizer& tokenizer,
                             int64_t vocab_size, uint64_t default_seed,
                             std::optional<Clock::time_point> deadline) {
  RequestParams p;
  switch (r.prompt_case()) {
    case v1::GenerateRequest::kText:
      if (r.text().empty()) throw RequestError(Code::kInvalidArgument, "prompt: text is empty");
      try {
        p.prompt = tokenizer.encode(r.text(), !r.skip_bos());
      } catch (const std::exception& e) {
        throw RequestError(Code::kInvalidArgument, "prompt: text: " + client_message(e));
      }
      if (p.prompt.empty())
        throw RequestError(Code::kInvalidArgument, "prompt: text encodes to no tokens");
      break;
    case v1::GenerateRequest::kTokenIds:
      if (r.token_ids().ids().empty())
        throw RequestError(Code::kInvalidArgument, "prompt: token_ids is empty");
      check_ids(r.token_ids().ids(), vocab_size, "prompt: token_ids.ids");
      p.prompt.assign(r.token_ids().ids().begin(), r.token_ids().ids().end());
      break;
    case v1::GenerateRequest::PROMPT_NOT_SET:
      throw RequestError(Code::kInvalidArgument, "prompt: empty (set text or token_ids)");
  }
  p.max_tokens = r.max_tokens() == 0 ? 16 : r.max_tokens();
  p.sampling.temperature = r.temperature();
  p.sampling.top_k = r.top_k();
  p.sampling.top_p = r.top_p() == 0.f ? 1.f : r.top_p();
  p.sampling.min_p = r.min_p();
  p.sampling.repetition_penalty = r.repetition_penalty() == 0.f ? 1.f : r.repetition_penalty();
  p.sampling.presence_penalty = r.presence_penalty();
  p.sampling.frequency_penalty = r.frequency_penalty();
  p.sampling.seed = r.has_seed() ? r.seed() : default_seed;
  p.stop.assign(r.stop().begin(), r.stop().end());
  check_ids(r.stop_token_ids(), vocab_size, "stop_token_ids");
  p.stop_token_ids.assign(r.stop_token_ids().begin(), r.stop_token_ids().end());
  p.ignore_eos = r.ignore_eos();
  for (const auto& [id, bias] : r.logit_bias()) {
    if (static_cast<int64_t>(id) >= vocab_size)
      throw RequestError(Code::kInvalidArgument, token_id_error("logit_bias", -1, id, vocab_size));
    p.sampling.logit_bias.emplace_back(static_cast<int32_t>(id), bias);
  }
  // The map's order is unspecified: by id, so that equal requests are equal.
  std::sort(p.sampling.logit_bias.begin(), p.sampling.logit_bias.end());
  p.sampling.min_tokens = r.min_tokens();
  p.logprobs = r.logprobs();
  p.prompt_logprobs = r.prompt_logprobs();
  p.priority = r.priority();
  p.deadline = deadline;
  return p;
}

std::vector<RequestParams> completion_params(const RequestParams& params, int64_t n) {
  SY_CHECK(n >= 1, "completion_params: n ", n, " must be at least 1");
  std::vector<RequestParams> out(static_cast<size_t>(n), params);
  for (int64_t i = 0; i < n; ++i)
    out[static_cast<size_t>(i)].sampling.seed += static_cast<uint64_t>(i);
  return out;
}

std::optional<Clock::time_point> steady_deadline(std::chrono::system_clock::time_point deadline) {
  // gRPC reports "no deadline" as a time in the far future.
  const auto left = deadline - std::chrono::system_clock::now();
  if (left > std::chrono::hours(24 * 365)) return std::nullopt;
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
}

v1::GenerateResponse to_response(const RequestEvent& e) {
  v1::GenerateResponse m;
  m.set_text(e.text);
  for (int32_t id : e.token_ids) m.add_token_ids(static_cast<uint32_t>(id));
  auto add = [](v1::TokenLogprobs* out, const TokenLogprobs& lp) {
    out->set_token_id(static_cast<uint32_t>(lp.token_id));
    out->set_logprob(lp.logprob);
    for (const TopLogprob& t : lp.top) {
      v1::TopLogprob* top = out->add_top();
      top->set_token_id(static_cast<uint32_t>(t.token_id));
      top->set_logprob(t.logprob);
    }
  };
  for (const TokenLogprobs& lp : e.logprobs) add(m.add_logprobs(), lp);
  for (const TokenLogprobs& lp : e.prompt_logprobs) add(m.add_prompt_logprobs(), lp);
  if (e.finish != FinishReason::kNone) {
    m.set_finish_reason(finish_reason(e.finish));
    v1::Usage* u = m.mutable_usage();
    u->set_prompt_tokens(static_cast<uint32_t>(e.usage.prompt_tokens));
    u->set_completion_tokens(static_cast<uint32_t>(e.usage.completion_tokens));
    u->set_queue_time_ms(e.usage.queue_time_ms);
    u->set_time_to_first_token_ms(e.usage.time_to_first_token_ms);
    u->set_total_time_ms(e.usage.total_time_ms);
    u->set_preemptions(static_cast<uint32_t>(e.usage.preemptions));
    u->set_cached_prompt_tokens(static_cast<uint32_t>(e.usage.cached_prompt_tokens));
  }
  return m;
}

grpc::Status finish_status(const RequestEvent& e) {
  switch (e.finish) {
    case FinishReason::kNone:
    case FinishReason::kStop:
    case FinishReason::kLength:
      return grpc::Status::OK;
    case FinishReason::kCancelled:
      return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    case FinishReason::kDeadline:
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline exceeded");
    case FinishReason::kUnavailable:
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          e.error.empty() ? "the server stopped" : e.error);
    case FinishReason::kError:
      break;
  }
  return grpc::Status(grpc::StatusCode::INTERNAL, e.error.empty() ? "internal error" : e.error);
}

grpc::StatusCode status_code(RequestError::Code code) {
  switch (code) {
    case Code::kInvalidArgument:
      return grpc::StatusCode::INVALID_ARGUMENT;
    case Code::kResourceExhausted:
      return grpc::StatusCode::RESOURCE_EXHAUSTED;
    case Code::kUnavailable:
      return grpc::StatusCode::UNAVAILABLE;
  }
  return grpc::StatusCode::INTERNAL;
}

v1::ModelInfo model_info(const std::string& model_path, const ModelConfig& c,
                         const ParallelConfig& p, int64_t context_limit,
                         const std::string& device) {
  v1::ModelInfo m;
  m.set_model_path(model_path);
  m.set_hidden_size(static_cast<uint32_t>(c.hidden_size));
  m.set_intermediate_size(static_cast<uint32_t>(c.intermediate_size));
  m.set_num_hidden_layers(static_cast<uint32_t>(c.num_hidden_layers));
  m.set_num_attention_heads(static_cast<uint32_t>(c.num_attention_heads));
  m.set_num_key_value_heads(static_cast<uint32_t>(c.num_key_value_heads));
  m.set_head_dim(static_cast<uint32_t>(c.head_dim));
  m.set_num_local_experts(static_cast<uint32_t>(c.num_local_experts));
  m.set_num_experts_per_tok(static_cast<uint32_t>(c.num_experts_per_tok));
  m.set_vocab_size(static_cast<uint32_t>(c.vocab_size));
  m.set_sliding_window_tokens(static_cast<uint32_t>(c.sliding_window));
  m.set_rope_theta(c.rope_theta);
  m.set_context_limit_tokens(static_cast<uint32_t>(context_limit));
  m.set_world_size(static_cast<uint32_t>(p.world));
  m.set_tp(static_cast<uint32_t>(p.tp));
  m.set_ep(static_cast<uint32_t>(p.ep_size()));
  m.set_moe_exchange(moe_exchange_name(p.exchange));
  const int64_t heads_per_rank = c.num_attention_heads / p.tp;
  for (int r = 0; r < p.world; ++r) {
    ParallelConfig q = p;
    q.rank = r;
    v1::RankInfo* info = m.add_ranks();
    info->set_rank(static_cast<uint32_t>(r));
    info->set_tp_rank(static_cast<uint32_t>(q.tp_rank()));
    info->set_ep_rank(static_cast<uint32_t>(q.ep_rank()));
    info->set_first_head(static_cast<uint32_t>(q.tp_rank() * heads_per_rank));
    info->set_n_heads(static_cast<uint32_t>(heads_per_rank));
    for (int64_t e : experts_of(c.num_local_experts, q.ep_size(), q.ep_rank()))
      info->add_experts(static_cast<uint32_t>(e));
  }
  m.set_device(device);
  return m;
}

// ---- Generate -----------------------------------------------------------------------------------

class GenerateReactor;

// The sink half of one Generate call (see the lifetime note in service.h), for its n completions.
// Every write and the finish are started by whoever holds the "pump": the first thread to find no
// write in flight. gRPC may run OnWriteDone inline in StartWrite, so gRPC is never called with
// mu_ held.
class GenerateSink final {
 public:
  GenerateSink(GenerateReactor* reactor, int64_t n_completions)
      : reactor_(reactor), n_open_(n_completions) {}

  // Engine thread: queue the event's message, as completion `index`'s. The call ends OK after
  // every completion's last event, or at once with the status of one that did not end by a stop
  // or its length (the others are then cancelled).
  void on_event(int64_t index, RequestEvent event) {
    v1::GenerateResponse message = to_response(event);
    message.set_index(static_cast<uint32_t>(index));
    std::unique_lock<std::mutex> lock(mu_);
    if (final_.has_value()) return;  // already ended (closed, or the client went away)
    pending_.push_back(std::move(message));
    bool cancel_others = false;
    if (event.finish != FinishReason::kNone) {
      const grpc::Status status = finish_status(event);
      if (!status.ok()) {
        final_ = status;
        cancel_others = n_open_ > 1;
      } else if (--n_open_ == 0) {
        final_ = grpc::Status::OK;
      }
    }
    pump(lock);
    if (lock.owns_lock()) lock.unlock();
    if (cancel_others) cancel_request();
  }

  // Ends the call with `status` after the messages already queued, unless it has ended.
  void end(const grpc::Status& status) {
    std::unique_lock<std::mutex> lock(mu_);
    if (final_.has_value()) return;
    final_ = status;
    pump(lock);
  }

  // The engine's ids of the completions and the call's deadline; cancels them at once when the
  // client already went away.
  void set_requests(Engine* engine, std::vector<uint64_t> ids,
                    std::optional<Clock::time_point> deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    engine_ = engine;
    ids_ = std::move(ids);
    deadline_ = deadline;
    const bool cancel = cancelled_;
    lock.unlock();
    if (cancel) cancel_request();
  }

  void on_write_done(bool ok) {
    std::unique_lock<std::mutex> lock(mu_);
    busy_ = false;
    if (!ok) {
      // The stream is broken (cancelled, past its deadline, or the connection closed): nothing
      // more can be sent. The client sees the status gRPC chose; ours only ends the call.
      pending_.clear();
      if (!final_.has_value()) final_ = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    }
    pump(lock);
    if (lock.owns_lock()) lock.unlock();
    if (!ok) cancel_request();
  }

  void on_cancel() {
    std::unique_lock<std::mutex> lock(mu_);
    cancelled_ = true;
    lock.unlock();
    cancel_request();
  }

  // OnDone: gRPC is finished with the call; later events are dropped.
  void detach() {
    std::lock_guard<std::mutex> lock(mu_);
    reactor_ = nullptr;
    pending_.clear();
    if (!final_.has_value()) final_ = grpc::Status::CANCELLED;
  }

  bool open() const {
    std::lock_guard<std::mutex> lock(mu_);
    return reactor_ != nullptr;
  }

 private:
  // gRPC cancels a call at its deadline too: a cancel from then on (or within a millisecond of
  // it, for the clocks' conversion) ends the request as past its deadline.
  // Cancelling a completion that has ended already is harmless: the engine ignores unknown ids.
  void cancel_request() {
    std::unique_lock<std::mutex> lock(mu_);
    Engine* engine = engine_;
    const std::vector<uint64_t> ids = ids_;
    const bool late = deadline_ && Clock::now() + std::chrono::milliseconds(1) >= *deadline_;
    lock.unlock();
    if (engine == nullptr) return;
    for (uint64_t id : ids)
      engine->cancel(id, late ? FinishReason::kDeadline : FinishReason::kCancelled);
  }

  // Starts the next write, or the finish once everything is written. Called with mu_ held;
  // returns with it released whenever it calls into gRPC.
  void pump(std::unique_lock<std::mutex>& lock);

  mutable std::mutex mu_;
  GenerateReactor* reactor_;                   // null after OnDone
  std::deque<v1::GenerateResponse> pending_;   // not yet written
  std::optional<grpc::Status> final_;          // the status the call ends with, once known
  v1::GenerateResponse in_flight_;             // the message being written (gRPC reads it)
  bool busy_ = false;                          // a write is in flight
  bool finished_ = false;                      // Finish or StartWriteAndFinish was called
  bool cancelled_ = false;                     // OnCancel ran
  int64_t n_open_;                             // completions whose last event has not come
  Engine* engine_ = nullptr;                   // set once the engine accepted the request
  std::vector<uint64_t> ids_;                  // the engine's ids of the completions
  std::optional<Clock::time_point> deadline_;  // the call's, on the steady clock
};

class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  void bind(std::shared_ptr<GenerateSink> sink) { sink_ = std::move(sink); }
  void OnWriteDone(bool ok) override { sink_->on_write_done(ok); }
  void OnCancel() override { sink_->on_cancel(); }
  void OnDone() override {
    sink_->detach();
    delete this;
  }

 private:
  std::shared_ptr<GenerateSink> sink_;
};

// The engine's sink of one completion: its events go to the call's sink under its index.
class CompletionSink final : public RequestSink {
 public:
  CompletionSink(std::shared_ptr<GenerateSink> call, int64_t index)
      : call_(std::move(call)), index_(index) {}
  void on_event(RequestEvent event) override { call_->on_event(index_, std::move(event)); }

 private:
  std::shared_ptr<GenerateSink> call_;
  int64_t index_;
};

void GenerateSink::pump(std::unique_lock<std::mutex>& lock) {
  if (busy_ || finished_ || reactor_ == nullptr) return;
  GenerateReactor* reactor = reactor_;
  if (pending_.empty()) {
    if (!final_.has_value()) return;
    finished_ = true;
    const grpc::Status status = *final_;
    lock.unlock();
    reactor->Finish(status);
    return;
  }
  in_flight_ = std::move(pending_.front());
  pending_.pop_front();
  if (pending_.empty() && final_.has_value()) {
    finished_ = true;
    const grpc::Status status = *final_;
    lock.unlock();
    reactor->StartWriteAndFinish(&in_flight_, grpc::WriteOptions(), status);
    return;
  }
  busy_ = true;
  lock.unlock();
  reactor->StartWrite(&in_flight_);
}

// ---- Service ------------------------------------------------------------------------------------

Service::Service(const Tokenizer& tokenizer, v1::ModelInfo info)
    : tokenizer_(tokenizer), info_(std::move(info)), seeds_(std::random_device{}()) {}

Service::~Service() = default;

void Service::attach(Engine* engine) {
  engine_.store(engine);
}

void Service::close(const grpc::Status& status) {
  for (const auto& s : streams_.close()) s->end(status);
}

int64_t Service::n_open_streams() const {
  int64_t n = 0;
  for (const auto& s : streams_.alive())
    if (s->open()) ++n;
  return n;
}

uint64_t Service::random_seed() {
  std::lock_guard<std::mutex> lock(mu_);
  return seeds_();
}

grpc::ServerWriteReactor<v1::GenerateResponse>* Service::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto* reactor = new GenerateReactor;
  const int64_t n = std::max<int64_t>(1, request->n());
  auto sink = std::make_shared<GenerateSink>(reactor, n);
  reactor->bind(sink);
  Engine* engine = engine_.load();
  if (engine == nullptr) {
    sink->end(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading"));
    return reactor;
  }
  if (!streams_.add(sink)) {
    sink->end(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down"));
    return reactor;
  }
  try {
    RequestParams params =
        request_params(*request, tokenizer_, static_cast<int64_t>(info_.vocab_size()),
                       random_seed(), steady_deadline(context->deadline()));
    const std::optional<Clock::time_point> deadline = params.deadline;
    std::vector<RequestParams> completions = completion_params(params, n);
    std::vector<std::shared_ptr<RequestSink>> sinks;
    for (int64_t i = 0; i < n; ++i) sinks.push_back(std::make_shared<CompletionSink>(sink, i));
    std::vector<uint64_t> ids = engine->submit_all(std::move(completions), std::move(sinks));
    sink->set_requests(engine, std::move(ids), deadline);
  } catch (const RequestError& e) {
    sink->end(grpc::Status(status_code(e.code()), client_message(e)));
  } catch (const std::exception& e) {
    sink->end(grpc::Status(grpc::StatusCode::INTERNAL, client_message(e)));
  }
  return reactor;
}

// ---- unary calls --------------------------------------------------------------------------------

grpc::ServerUnaryReactor* Service::Tokenize(grpc::CallbackServerContext* context,
                                            const v1::TokenizeRequest* request,
                                            v1::TokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::vector<int32_t> ids;
  try {
    ids = tokenizer_.encode(request->text(), request->add_bos());
  } catch (const std::exception& e) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "text: " + client_message(e)));
    return reactor;
  }
  for (int32_t id : ids) {
    response->add_ids(static_cast<uint32_t>(id));
    response->add_pieces(tokenizer_.piece(id));
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* Service::Detokenize(grpc::CallbackServerContext* context,
                                              const v1::DetokenizeRequest* request,
                                              v1::DetokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  try {
    check_ids(request->ids(), static_cast<int64_t>(info_.vocab_size()), "ids");
    response->set_text(
        tokenizer_.decode(std::vector<int32_t>(request->ids().begin(), request->ids().end())));
  } catch (const RequestError& e) {
    reactor->Finish(grpc::Status(status_code(e.code()), client_message(e)));
    return reactor;
  } catch (const std::exception& e) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, client_message(e)));
    return reactor;
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* Service::GetModelInfo(grpc::CallbackServerContext* context,
                                                const v1::GetModelInfoRequest* /*request*/,
                                                v1::ModelInfo* response) {
  *response = info_;
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* Service::GetServerInfo(grpc::CallbackServerContext* context,
                                                 const v1::GetServerInfoRequest* /*request*/,
                                                 v1::ServerInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Engine* engine = engine_.load();
  if (engine == nullptr) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading"));
    return reactor;
  }
  const EngineStats s = engine->stats();
  response->set_queue_depth(static_cast<uint32_t>(s.queue_depth));
  response->set_queued_tokens(static_cast<uint32_t>(s.queued_tokens));
  response->set_running_requests(static_cast<uint32_t>(s.running));
  response->set_kv_blocks_used(static_cast<uint32_t>(s.kv_blocks_used));
  response->set_kv_blocks_total(static_cast<uint32_t>(s.kv_blocks_total));
  response->set_kv_block_size_tokens(static_cast<uint32_t>(s.block_size));
  response->set_recent_tokens_per_second(s.recent_tokens_per_second);
  response->set_uptime_s(s.uptime_s);
  response->set_requests_completed(static_cast<uint64_t>(s.requests_completed));
  response->set_requests_cancelled(static_cast<uint64_t>(s.requests_cancelled));
  response->set_requests_deadline_exceeded(static_cast<uint64_t>(s.requests_deadline_exceeded));
  response->set_steps(static_cast<uint64_t>(s.steps));
  response->set_kv_blocks_cached(static_cast<uint32_t>(s.kv_blocks_cached));
  response->set_prefix_cache_queried_tokens(static_cast<uint64_t>(s.prefix_cache_queried_tokens));
  response->set_prefix_cache_hit_tokens(static_cast<uint64_t>(s.prefix_cache_hit_tokens));
  response->set_draining(s.draining);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace sy
