// The serving engine (see engine.h): the threads' hand-off (submissions, cancellations, stats)
// around the loop of scheduler, executor and output processor.
#include "runtime/engine/engine.h"

#include <algorithm>

namespace sy {

using Clock = std::chrono::steady_clock;

namespace {

RequestEvent error_event(FinishReason reason) {
  RequestEvent event;
  if (reason == FinishReason::kUnavailable) event.error = "the server stopped";
  return event;
}

SchedulerOptions scheduler_options(const EngineOptions& o, int64_t prompt_rows) {
  SchedulerOptions s;
  s.max_batch_tokens = o.max_batch_tokens;
  s.max_running = o.max_running;
  s.prompt_logit_rows = prompt_rows;
  s.prefix_caching = o.prefix_caching;
  return s;
}

}  // namespace

Engine::Engine(Model& model, const Tokenizer& tokenizer, const EngineOptions& options,
               Communicator* world)
    : model_(model),
      tokenizer_(tokenizer),
      options_(options),
      context_limit_(context_limit_for(model.config(), model.limits(), options.max_batch_tokens)),
      prompt_rows_(model.limits().max_logit_rows - options.max_running),
      scheduler_(model.config(), model.limits(), scheduler_options(options, prompt_rows_)),
      executor_(model, world),
      output_(tokenizer, model.config().vocab_size, context_limit_),
      start_(Clock::now()) {
  const ModelLimits& limits = model.limits();
  SY_CHECK(options_.max_batch_tokens > 0 && options_.max_batch_tokens <= limits.max_tokens,
           "max_batch_tokens ", options_.max_batch_tokens, " outside [1, ", limits.max_tokens, "]");
  SY_CHECK(options_.max_running > 0 && options_.max_running <= limits.max_seqs &&
               options_.max_running <= limits.max_logit_rows,
           "max_running ", options_.max_running, " exceeds the model's limits");
  SY_CHECK(options_.max_logprobs >= 0 && options_.max_logprobs <= StepSampler::kMaxTopLogprobs,
           "max_logprobs ", options_.max_logprobs, " outside [0, ", StepSampler::kMaxTopLogprobs,
           "]");
  SY_CHECK(options_.max_completions >= 1, "max_completions ", options_.max_completions,
           " must be at least 1");
  RequestLimits& r = request_limits_;
  r.vocab_size = model.config().vocab_size;
  r.context_limit = context_limit_;
  r.max_prompt_tokens = options_.max_queue_tokens;
  r.max_stop_strings = options_.max_stop_strings;
  r.max_stop_string_bytes = options_.max_stop_string_bytes;
  r.max_logprobs = options_.max_logprobs;
  r.prompt_logit_rows = prompt_rows_;
  r.max_logit_rows = limits.max_logit_rows;
  r.max_running = options_.max_running;
  plan_.batch.tokens.reserve(static_cast<size_t>(limits.max_tokens));
  stats_.kv_blocks_total = limits.n_blocks;
  stats_.block_size = limits.block_size;
}

Engine::~Engine() = default;

int64_t Engine::context_limit() const {
  return context_limit_;
}

std::vector<int32_t> Engine::end_ids(const RequestParams& p) const {
  std::vector<int32_t> ids = p.stop_token_ids;
  if (!p.ignore_eos)
    for (int64_t id : tokenizer_.eos_ids()) ids.push_back(static_cast<int32_t>(id));
  return ids;
}

uint64_t Engine::submit(RequestParams params, std::shared_ptr<RequestSink> sink) {
  std::vector<RequestParams> one;
  one.push_back(std::move(params));
  return submit_all(std::move(one), {std::move(sink)}).front();
}

std::unique_ptr<Sequence> Engine::make_sequence(RequestParams p,
                                                std::shared_ptr<RequestSink> sink) {
  validate_request(p, request_limits_);
  auto seq = std::make_unique<Sequence>();
  seq->arrival = Clock::now();
  seq->n_prompt = static_cast<int64_t>(p.prompt.size());
  seq->tokens = p.prompt;
  seq->tokens.reserve(static_cast<size_t>(seq->n_prompt + p.max_tokens));
  seq->sampler = std::make_unique<Sampler>(p.sampling, model_.config().vocab_size, p.prompt.size(),
                                           end_ids(p));
  seq->decoder = std::make_unique<StreamDecoder>(tokenizer_, p.prompt);
  seq->params = std::move(p);
  seq->sink = std::move(sink);
  return seq;
}

std::vector<uint64_t> Engine::submit_all(std::vector<RequestParams> params,
                                         std::vector<std::shared_ptr<RequestSink>> sinks) {
  using Code = RequestError::Code;
  const int64_t n = static_cast<int64_t>(params.size());
  SY_CHECK(n >= 1 && sinks.size() == params.size(), "submit_all: ", n, " requests and ",
           sinks.size(), " sinks");
  const std::string count = "n: " + std::to_string(n) + " completions";
  if (n > options_.max_completions)
    throw RequestError(
        Code::kInvalidArgument,
        count + " (at most " + std::to_string(options_.max_completions) + ", --max-completions)");
  if (n > options_.max_queue_requests)
    throw RequestError(Code::kInvalidArgument, count + " exceed the admission limit of " +
                                                   std::to_string(options_.max_queue_requests) +
                                                   " requests (--max-queue-requests)");
  std::vector<std::unique_ptr<Sequence>> seqs;
  int64_t n_tokens = 0;
  for (int64_t i = 0; i < n; ++i) {
    seqs.push_back(make_sequence(std::move(params[static_cast<size_t>(i)]),
                                 std::move(sinks[static_cast<size_t>(i)])));
    n_tokens += seqs.back()->n_prompt;
  }
  if (n_tokens > options_.max_queue_tokens)
    throw RequestError(Code::kInvalidArgument, count + " of " +
                                                   std::to_string(seqs.front()->n_prompt) +
                                                   " prompt tokens exceed the admission limit of " +
                                                   std::to_string(options_.max_queue_tokens) +
                                                   " prompt tokens (--max-queue-tokens)");
  // All of them are queued, or none.
  std::lock_guard<std::mutex> lock(mu_);
  if (draining_ || stopping_) throw RequestError(Code::kUnavailable, "the server is shutting down");
  if (stats_.queue_depth + n > options_.max_queue_requests)
    throw RequestError(Code::kResourceExhausted,
                       "admission queue full: " + std::to_string(stats_.queue_depth) +
                           " requests waiting (limit " +
                           std::to_string(options_.max_queue_requests) + ")");
  if (stats_.queued_tokens + n_tokens > options_.max_queue_tokens)
    throw RequestError(Code::kResourceExhausted,
                       "admission queue full: " + std::to_string(stats_.queued_tokens) +
                           " prompt tokens waiting (limit " +
                           std::to_string(options_.max_queue_tokens) + ")");
  std::vector<uint64_t> ids;
  for (std::unique_ptr<Sequence>& seq : seqs) {
    seq->id = next_id_++;
    ids.push_back(seq->id);
    incoming_.push_back(std::move(seq));
  }
  stats_.queue_depth += n;
  stats_.queued_tokens += n_tokens;
  wake_.notify_one();
  return ids;
}

void Engine::cancel(uint64_t id, FinishReason reason) {
  SY_CHECK(reason == FinishReason::kCancelled || reason == FinishReason::kDeadline,
           "cancel: a request ends CANCELLED or at its deadline");
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_.emplace_back(id, reason);
  wake_.notify_one();
}

EngineStats Engine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  EngineStats s = stats_;
  s.uptime_s = std::chrono::duration<double>(Clock::now() - start_).count();
  s.draining = draining_;
  return s;
}

void Engine::drain() {
  std::lock_guard<std::mutex> lock(mu_);
  draining_ = true;
  wake_.notify_one();
}

void Engine::stop() {
  std::lock_guard<std::mutex> lock(mu_);
  stopping_ = true;
  wake_.notify_one();
}

void Engine::finish(Sequence& seq, FinishReason reason, RequestEvent event) {
  event.finish = reason;
  event.usage = OutputProcessor::usage(seq, Clock::now());
  scheduler_.release_blocks(seq);
  {
    // Before the last event goes out, so a client that sees it also sees the blocks freed.
    std::lock_guard<std::mutex> lock(mu_);
    const BlockAllocator& blocks = scheduler_.blocks();
    stats_.kv_blocks_used = blocks.n_total() - blocks.n_free();
    stats_.kv_blocks_cached = blocks.n_cached();
    if (reason == FinishReason::kStop || reason == FinishReason::kLength)
      ++stats_.requests_completed;
    else if (reason == FinishReason::kCancelled)
      ++stats_.requests_cancelled;
    else if (reason == FinishReason::kDeadline)
      ++stats_.requests_deadline_exceeded;
  }
  if (EngineObserver* observer = observer_.load()) observer->on_finish(event.usage, reason);
  seq.sink->on_event(std::move(event));
}

int64_t Engine::context_limit_for(const ModelConfig& config, const ModelLimits& limits,
                                  int64_t max_batch_tokens) {
  const int64_t B = limits.block_size;
  const int64_t limit = std::min(limits.max_blocks_per_seq * B, config.max_position_embeddings);
  // With a sliding window a sequence holds at most the blocks of its window and of one step's
  // tokens, one partial block at each end, and its last recorded block: when the cache holds
  // that many, a request of any length runs, alone if need be.
  const int64_t window = config.sliding_window;
  if (window > 0 && limits.n_blocks >= (window + max_batch_tokens + B - 1) / B + 3) return limit;
  return std::min(limit, limits.n_blocks * B);
}

bool Engine::take_incoming(std::vector<std::pair<uint64_t, FinishReason>>& cancelled,
                           bool& stopping) {
  std::unique_lock<std::mutex> lock(mu_);
  wake_.wait_for(lock, std::chrono::milliseconds(100), [&] {
    return stopping_ || !incoming_.empty() || !cancelled_.empty() || !scheduler_.idle() ||
           draining_;
  });
  while (!incoming_.empty()) {
    scheduler_.enqueue(std::move(incoming_.front()));
    incoming_.pop_front();
  }
  cancelled.clear();
  cancelled.swap(cancelled_);
  stopping = stopping_;
  return !((draining_ || stopping_) && scheduler_.idle());
}

void Engine::end_requests(const std::vector<std::pair<uint64_t, FinishReason>>& cancelled,
                          bool stopping) {
  const Clock::time_point now = Clock::now();
  auto ends = [&](const Sequence& s) -> FinishReason {
    if (stopping) return FinishReason::kUnavailable;
    // A deadline that has passed is the reason even when the transport's cancel came first.
    if (s.params.deadline && *s.params.deadline <= now) return FinishReason::kDeadline;
    for (const auto& [id, reason] : cancelled)
      if (id == s.id) return reason;
    return FinishReason::kNone;
  };
  int64_t ended_waiting = 0, ended_tokens = 0;
  auto end_in = [&](auto& queue) {
    for (auto it = queue.begin(); it != queue.end();) {
      const FinishReason r = ends(**it);
      if (r == FinishReason::kNone) {
        ++it;
        continue;
      }
      if (!(*it)->started) {  // still counted in the admission queue
        ++ended_waiting;
        ended_tokens += (*it)->n_prompt;
      }
      finish(**it, r, error_event(r));
      it = queue.erase(it);
    }
  };
  end_in(scheduler_.waiting());
  end_in(scheduler_.running());
  if (ended_waiting > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.queue_depth -= ended_waiting;
    stats_.queued_tokens -= ended_tokens;
  }
}

void Engine::sample_requests() {
  sample_rows_.clear();
  for (Sequence* seq : plan_.sampled)
    sample_rows_.push_back(
        {seq->sampler.get(), &seq->tokens, seq->n_generated(), seq->params.logprobs, -1});
  for (const StepPlan::PromptRow& r : plan_.prompt_rows)
    sample_rows_.push_back({nullptr, nullptr, 0, r.seq->params.prompt_logprobs,
                            r.seq->tokens[static_cast<size_t>(r.token)]});
}

void Engine::run_step() {
  const Clock::time_point start = Clock::now();
  report_.prompt_tokens = 0;
  report_.inter_token_seconds.clear();
  // The plan has moved n_computed past the step's tokens [n_computed - scheduled, n_computed).
  for (const auto& seq : scheduler_.running())
    report_.prompt_tokens += std::max<int64_t>(
        0, std::min(seq->n_computed, seq->n_prompt) - (seq->n_computed - seq->scheduled));
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.prefix_cache_queried_tokens += plan_.prefix_queried_tokens;
    stats_.prefix_cache_hit_tokens += plan_.prefix_hit_tokens;
    stats_.queue_depth -= plan_.started;
    stats_.queued_tokens -= plan_.started_tokens;
  }
  sample_requests();
  EngineObserver* observer = observer_.load();
  const bool ranks_report =
      observer != nullptr && std::chrono::duration<double>(start - last_ranks_report_).count() >=
                                 options_.report_interval_s;
  const std::vector<int32_t>& tokens = executor_.execute(plan_.batch, sample_rows_, ranks_report);
  if (ranks_report) {  // (not under mu_: a scrape takes the observer's lock, then mu_)
    last_ranks_report_ = start;
    observer->on_ranks(executor_.reports(), stats_.steps + 1);
  }
  scheduler_.record_blocks();
  output_.process(plan_, tokens, executor_.sampler(), outputs_);
  const Clock::time_point now = Clock::now();
  for (Sequence* seq : plan_.sampled) {
    if (seq->n_generated() >= 2)
      report_.inter_token_seconds.push_back(
          std::chrono::duration<double>(now - seq->last_token).count());
    seq->last_token = now;
  }
  // Before the events go out: a client that has its tokens finds them in the metrics.
  if (observer != nullptr) {
    report_.generated_tokens = static_cast<int64_t>(plan_.sampled.size());
    report_.preemptions = scheduler_.n_preemptions() - reported_preemptions_;
    reported_preemptions_ = scheduler_.n_preemptions();
    observer->on_step(report_);
  }
  std::vector<Sequence*> done;
  for (StepOutput& o : outputs_) {
    if (o.finish == FinishReason::kNone) {
      o.seq->sink->on_event(std::move(o.event));
    } else {
      finish(*o.seq, o.finish, std::move(o.event));  // the last token travels with the reason
      done.push_back(o.seq);
    }
  }
  scheduler_.remove_running(done);
  note_step(static_cast<int64_t>(plan_.sampled.size()));
}

void Engine::note_step(int64_t generated) {
  const Clock::time_point t = Clock::now();
  recent_.emplace_back(t, generated);
  recent_tokens_ += generated;
  while (!recent_.empty() && t - recent_.front().first > std::chrono::seconds(5)) {
    recent_tokens_ -= recent_.front().second;
    recent_.pop_front();
  }
  const double span =
      recent_.size() > 1 ? std::chrono::duration<double>(t - recent_.front().first).count() : 0.0;
  std::lock_guard<std::mutex> lock(mu_);
  ++stats_.steps;
  stats_.recent_tokens_per_second = span > 0 ? static_cast<double>(recent_tokens_) / span : 0;
}

void Engine::note_state() {
  std::lock_guard<std::mutex> lock(mu_);
  const BlockAllocator& blocks = scheduler_.blocks();
  stats_.running = static_cast<int64_t>(scheduler_.running().size());
  stats_.kv_blocks_used = blocks.n_total() - blocks.n_free();
  stats_.kv_blocks_cached = blocks.n_cached();
  if (recent_.empty() || Clock::now() - recent_.back().first > std::chrono::seconds(5))
    stats_.recent_tokens_per_second = 0;
}

void Engine::run() {
  std::vector<std::pair<uint64_t, FinishReason>> cancelled;
  bool stopping = false;
  while (take_incoming(cancelled, stopping)) {
    // Cancellations, deadlines and stop end requests before the step.
    end_requests(cancelled, stopping);
    if (stopping) continue;  // the loop exits once everything has ended
    if (scheduler_.schedule(plan_)) {
      run_step();
    } else if (!scheduler_.waiting().empty() && scheduler_.running().empty()) {
      // Nothing fits even in an empty cache: validation keeps this from happening.
      RequestEvent event;
      event.error = "the request does not fit in the KV cache";
      finish(*scheduler_.waiting().front(), FinishReason::kError, std::move(event));
      scheduler_.waiting().pop_front();
    }
    note_state();
  }
  executor_.stop_workers();
}

void Engine::run_worker(Model& model, Communicator& world) {
  Executor::run_worker(model, world);
}

}  // namespace sy
