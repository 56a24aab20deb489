// The serving engine (see engine.h).
//
// Step plan on the wire (int32 words, broadcast from rank 0):
//   header [kind, n_tokens, n_seqs, n_logits]      kind: 1 = step, 0 = exit
//   body   tokens[n_tokens] positions[n_tokens] token_seq[n_tokens]
//          block_tables[n_seqs * max_blocks_per_seq] logit_rows[n_logits]
#include "runtime/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "kernels/cpu/ops.h"

namespace sy {

using Clock = std::chrono::steady_clock;

namespace {

constexpr int32_t kPlanExit = 0;
constexpr int32_t kPlanStep = 1;
constexpr int kIdleSleepMs = 20;  // longest sleep between polls of an idle worker

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

RequestEvent error_event(FinishReason reason) {
  RequestEvent event;
  if (reason == FinishReason::kUnavailable) event.error = "the server stopped";
  return event;
}

}  // namespace

struct Engine::Sequence {
  uint64_t id = 0;
  RequestParams params;
  std::shared_ptr<RequestSink> sink;
  std::vector<int32_t> tokens;  // prompt, then generated tokens
  int64_t n_prompt = 0;
  int64_t n_computed = 0;       // leading tokens whose keys and values are cached
  std::vector<int32_t> blocks;  // KV block table
  int64_t n_dropped = 0;        // leading blocks given back: out of the attention window (0s)
  int64_t n_recorded = 0;       // leading blocks recorded in the prefix cache
  bool recording = true;        // false once a block's content was found recorded elsewhere
  int64_t cached_prompt = 0;    // prompt tokens found in the prefix cache at admission
  std::vector<TokenLogprobs> prompt_lp;  // prompt logprobs gathered, not yet sent
  int64_t prompt_lp_next = 1;            // the next prompt token whose logprobs are wanted
  std::unique_ptr<Sampler> sampler;
  std::unique_ptr<StreamDecoder> decoder;
  std::string held;  // text held back: it may begin a stop string
  size_t longest_stop = 0;
  bool started = false;  // scheduled at least once (left the admission queue)
  Clock::time_point arrival, first_step, first_token;
  int64_t preemptions = 0;
  int64_t scheduled = 0;  // tokens of this step

  int64_t n_generated() const { return static_cast<int64_t>(tokens.size()) - n_prompt; }
  // Still owes prompt logprobs: its prompt is computed in full, and asks logit rows.
  bool wants_prompt_rows() const { return params.prompt_logprobs > 0 && prompt_lp_next < n_prompt; }
  // Logit rows for prompt logprobs that its next `take` tokens ask: positions p from n_computed
  // with prompt_lp_next - 1 <= p < n_prompt - 1 (the logits before token p + 1).
  int64_t prompt_rows(int64_t take) const {
    if (!wants_prompt_rows()) return 0;
    const int64_t lo = std::max(n_computed, prompt_lp_next - 1);
    const int64_t hi = std::min(n_computed + take, n_prompt - 1);
    return std::max<int64_t>(0, hi - lo);
  }
  // `take` cut so that it asks at most `rows` prompt logit rows.
  int64_t fit_prompt_rows(int64_t take, int64_t rows) const {
    if (prompt_rows(take) <= rows) return take;
    return std::max(n_computed, prompt_lp_next - 1) - n_computed + rows;
  }
  // Serving order: priority, then arrival (ids grow with submission).
  bool before(const Sequence& o) const {
    return params.priority < o.params.priority ||
           (params.priority == o.params.priority && id < o.id);
  }
};

void Engine::enqueue(std::unique_ptr<Sequence> seq) {
  auto at = std::upper_bound(waiting_.begin(), waiting_.end(), seq,
                             [](const auto& a, const auto& b) { return a->before(*b); });
  waiting_.insert(at, std::move(seq));
}

void Engine::add_running(std::unique_ptr<Sequence> seq) {
  auto at = std::upper_bound(running_.begin(), running_.end(), seq,
                             [](const auto& a, const auto& b) { return a->before(*b); });
  running_.insert(at, std::move(seq));
}

Engine::Engine(Model& model, const Tokenizer& tokenizer, const EngineOptions& options,
               Communicator* world)
    : model_(model),
      tokenizer_(tokenizer),
      options_(options),
      world_(world),
      blocks_(model.limits().n_blocks, options.prefix_caching ? model.limits().block_size : 0),
      start_(Clock::now()) {
  const ModelLimits& limits = model.limits();
  SY_CHECK(options_.max_batch_tokens > 0 && options_.max_batch_tokens <= limits.max_tokens,
           "max_batch_tokens ", options_.max_batch_tokens, " outside [1, ", limits.max_tokens, "]");
  SY_CHECK(options_.max_running > 0 && options_.max_running <= limits.max_seqs &&
               options_.max_running <= limits.max_logit_rows,
           "max_running ", options_.max_running, " exceeds the model's limits");
  context_limit_ = context_limit_for(model.config(), limits, options_.max_batch_tokens);
  SY_CHECK(options_.max_logprobs >= 0 && options_.max_logprobs <= Model::kMaxTopLogprobs,
           "max_logprobs ", options_.max_logprobs, " outside [0, ", Model::kMaxTopLogprobs, "]");
  SY_CHECK(options_.max_completions >= 1, "max_completions ", options_.max_completions,
           " must be at least 1");
  prompt_rows_ = limits.max_logit_rows - options_.max_running;
  logits_.resize(static_cast<size_t>(limits.max_logit_rows * model.config().vocab_size));
  host_lp_.resize(static_cast<size_t>(1 + Model::kMaxTopLogprobs));
  host_lp_ids_.resize(static_cast<size_t>(Model::kMaxTopLogprobs));
  device_lp_.resize(static_cast<size_t>(limits.max_logit_rows * (1 + Model::kMaxTopLogprobs)));
  device_lp_ids_.resize(static_cast<size_t>(limits.max_logit_rows * Model::kMaxTopLogprobs));
  batch_.tokens.reserve(static_cast<size_t>(limits.max_tokens));
  stats_.kv_blocks_total = limits.n_blocks;
  stats_.block_size = limits.block_size;
}

Engine::~Engine() = default;

int64_t Engine::context_limit() const {
  return context_limit_;
}

void Engine::validate(const RequestParams& p) const {
  using Code = RequestError::Code;
  auto bad = [](const std::string& m) { throw RequestError(Code::kInvalidArgument, m); };
  const int64_t vocab = model_.config().vocab_size;
  const int64_t n_prompt = static_cast<int64_t>(p.prompt.size());
  if (n_prompt == 0) bad("prompt: empty (at least 1 token)");
  for (int32_t id : p.prompt)
    if (id < 0 || id >= vocab)
      bad("prompt: token id " + std::to_string(id) + " outside the vocabulary of " +
          std::to_string(vocab));
  if (p.max_tokens < 1) bad("max_tokens: must be at least 1");
  if (n_prompt + p.max_tokens > context_limit_)
    bad("max_tokens: prompt of " + std::to_string(n_prompt) + " tokens plus max_tokens " +
        std::to_string(p.max_tokens) + " exceeds the context limit of " +
        std::to_string(context_limit_) + " tokens");
  try {
    p.sampling.validate();
  } catch (const Error& e) {
    bad("sampling: " + e.message());
  }
  if (static_cast<int64_t>(p.stop.size()) > options_.max_stop_strings)
    bad("stop: " + std::to_string(p.stop.size()) + " stop strings (at most " +
        std::to_string(options_.max_stop_strings) + ")");
  for (const std::string& s : p.stop)
    if (s.empty() || static_cast<int64_t>(s.size()) > options_.max_stop_string_bytes)
      bad("stop: a stop string of " + std::to_string(s.size()) + " bytes (1 to " +
          std::to_string(options_.max_stop_string_bytes) + ")");
  if (static_cast<int64_t>(p.stop_token_ids.size()) > options_.max_stop_strings)
    bad("stop_token_ids: more than " + std::to_string(options_.max_stop_strings));
  for (int32_t id : p.stop_token_ids)
    if (id < 0 || id >= vocab)
      bad("stop_token_ids: token id " + std::to_string(id) + " outside the vocabulary");
  if (n_prompt > options_.max_queue_tokens)
    bad("prompt: " + std::to_string(n_prompt) + " tokens exceed the admission limit of " +
        std::to_string(options_.max_queue_tokens) + " prompt tokens (--max-queue-tokens)");
  for (const auto& [id, value] : p.sampling.logit_bias)
    if (id >= vocab)
      bad("logit_bias: token id " + std::to_string(id) + " outside the vocabulary of " +
          std::to_string(vocab));
  if (p.sampling.min_tokens > p.max_tokens)
    bad("min_tokens: " + std::to_string(p.sampling.min_tokens) + " exceeds max_tokens " +
        std::to_string(p.max_tokens));
  if (p.prompt_logprobs < 0 || p.prompt_logprobs > options_.max_logprobs)
    bad("prompt_logprobs: " + std::to_string(p.prompt_logprobs) + " outside [0, " +
        std::to_string(options_.max_logprobs) + "]");
  if (p.prompt_logprobs > 0 && prompt_rows_ == 0)
    bad("prompt_logprobs: this server keeps no logit rows for prompts (its step has " +
        std::to_string(model_.limits().max_logit_rows) + " logit rows for " +
        std::to_string(options_.max_running) + " running sequences)");
  if (p.logprobs < 0 || p.logprobs > options_.max_logprobs)
    bad("logprobs: " + std::to_string(p.logprobs) + " outside [0, " +
        std::to_string(options_.max_logprobs) + "]");
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

std::vector<uint64_t> Engine::submit_all(std::vector<RequestParams> params,
                                         std::vector<std::shared_ptr<RequestSink>> sinks) {
  using Code = RequestError::Code;
  const int64_t n = static_cast<int64_t>(params.size());
  SY_CHECK(n >= 1 && sinks.size() == params.size(), "submit_all: ", n, " requests and ",
           sinks.size(), " sinks");
  if (n > options_.max_completions)
    throw RequestError(Code::kInvalidArgument,
                       "n: " + std::to_string(n) + " completions (at most " +
                           std::to_string(options_.max_completions) + ", --max-completions)");
  if (n > options_.max_queue_requests)
    throw RequestError(Code::kInvalidArgument, "n: " + std::to_string(n) +
                                                   " completions exceed the admission limit of " +
                                                   std::to_string(options_.max_queue_requests) +
                                                   " requests (--max-queue-requests)");
  std::vector<std::unique_ptr<Sequence>> seqs;
  int64_t n_tokens = 0;
  for (int64_t i = 0; i < n; ++i) {
    RequestParams& p = params[static_cast<size_t>(i)];
    validate(p);
    auto seq = std::make_unique<Sequence>();
    seq->arrival = Clock::now();
    seq->n_prompt = static_cast<int64_t>(p.prompt.size());
    seq->tokens = p.prompt;
    seq->tokens.reserve(static_cast<size_t>(seq->n_prompt + p.max_tokens));
    seq->sampler = std::make_unique<Sampler>(p.sampling, model_.config().vocab_size,
                                             p.prompt.size(), end_ids(p));
    seq->decoder = std::make_unique<StreamDecoder>(tokenizer_, p.prompt);
    for (const std::string& s : p.stop) seq->longest_stop = std::max(seq->longest_stop, s.size());
    seq->params = std::move(p);
    seq->sink = std::move(sinks[static_cast<size_t>(i)]);
    n_tokens += seq->n_prompt;
    seqs.push_back(std::move(seq));
  }
  if (n_tokens > options_.max_queue_tokens)
    throw RequestError(Code::kInvalidArgument,
                       "n: " + std::to_string(n) + " completions of " +
                           std::to_string(seqs.front()->n_prompt) + " prompt tokens exceed the " +
                           "admission limit of " + std::to_string(options_.max_queue_tokens) +
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
  const Clock::time_point now = Clock::now();
  Usage& u = event.usage;
  u.prompt_tokens = seq.n_prompt;
  u.completion_tokens = std::max<int64_t>(0, seq.n_generated());
  u.queue_time_ms = ms_between(seq.arrival, seq.started ? seq.first_step : now);
  u.time_to_first_token_ms = seq.n_generated() > 0 ? ms_between(seq.arrival, seq.first_token) : 0;
  u.total_time_ms = ms_between(seq.arrival, now);
  u.preemptions = seq.preemptions;
  u.cached_prompt_tokens = seq.cached_prompt;
  release_blocks(seq);
  {
    // Before the last event goes out, so a client that sees it also sees the blocks freed.
    std::lock_guard<std::mutex> lock(mu_);
    stats_.kv_blocks_used = blocks_.n_total() - blocks_.n_free();
    stats_.kv_blocks_cached = blocks_.n_cached();
    if (reason == FinishReason::kStop || reason == FinishReason::kLength)
      ++stats_.requests_completed;
    else if (reason == FinishReason::kCancelled)
      ++stats_.requests_cancelled;
    else if (reason == FinishReason::kDeadline)
      ++stats_.requests_deadline_exceeded;
  }
  seq.sink->on_event(std::move(event));
}

int64_t Engine::preempt_last() {
  std::unique_ptr<Sequence> victim = std::move(running_.back());
  running_.pop_back();
  release_blocks(*victim);
  const int64_t given = victim->scheduled;
  victim->n_computed = 0;
  victim->n_recorded = 0;
  victim->scheduled = 0;
  ++victim->preemptions;
  enqueue(std::move(victim));
  return given;
}

bool Engine::schedule() {
  const ModelLimits& limits = model_.limits();
  const int64_t B = limits.block_size;
  batch_.clear();
  logit_seqs_.clear();
  prompt_rows_of_step_.clear();
  int64_t budget = options_.max_batch_tokens;
  int64_t prompt_rows_left = prompt_rows_;  // logit rows left for prompt logprobs this step
  // Blocks for tokens [0, n_computed + take) of `seq`; false when the cache is full.
  auto reserve = [&](Sequence& seq, int64_t take) {
    const int64_t need =
        (seq.n_computed + take + B - 1) / B - static_cast<int64_t>(seq.blocks.size());
    return need <= 0 || blocks_.allocate(need, seq.blocks);
  };
  for (auto& s : running_) s->scheduled = 0;
  // Running sequences first (decodes, then prefill chunks), in serving order; when blocks run
  // out the last running sequence (the newest of the highest priority value) is preempted and
  // recomputed later.
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
      Sequence& seq = *running_[i];
      const int64_t pending = static_cast<int64_t>(seq.tokens.size()) - seq.n_computed;
      if ((pass == 0) != (pending == 1) || seq.scheduled > 0) continue;
      const int64_t take = seq.fit_prompt_rows(std::min(pending, budget), prompt_rows_left);
      if (take == 0) continue;  // its prompt logprobs wait for rows
      bool ok = reserve(seq, take);
      while (!ok && running_.back().get() != &seq) {
        budget += preempt_last();
        ok = reserve(seq, take);
      }
      if (!ok) {  // `seq` itself is the last: it waits
        preempt_last();
        break;
      }
      seq.scheduled = take;
      budget -= take;
      prompt_rows_left -= seq.prompt_rows(take);
    }
  }
  // The last running sequence when its priority value is higher than `seq`'s: the one a waiting
  // `seq` takes from.
  auto lower = [&](const Sequence& seq) -> Sequence* {
    if (running_.empty()) return nullptr;
    Sequence& last = *running_.back();
    return last.params.priority > seq.params.priority ? &last : nullptr;
  };
  // Gives `seq` up to `want` more step tokens from running sequences of higher priority values
  // (the lowest priority first): they run fewer tokens this step, or none.
  auto reclaim = [&](const Sequence& seq, int64_t want) {
    for (size_t i = running_.size(); i-- > 0 && want > 0;) {
      Sequence& other = *running_[i];
      if (other.params.priority <= seq.params.priority) break;
      const int64_t r = std::min(want, other.scheduled);
      other.scheduled -= r;
      budget += r;
      want -= r;
    }
  };
  // Then new (or preempted) requests in serving order (priority, then arrival), each starting
  // past the longest run of whole blocks of its tokens in the prefix cache, short of its last
  // token (whose logits are wanted). A request whose next block a sequence of this step is
  // about to record waits and takes it from the cache then, instead of computing it too (a
  // burst of requests with the same new system prompt computes it once); it keeps its running
  // slot meanwhile, so later requests do not take it, and the scan ends with the slots. A
  // request short of step tokens, of a running slot or of blocks takes them from running
  // sequences of higher priority values: their tokens of this step first, then the sequences
  // themselves (preempted).
  int64_t n_waiting_for_blocks = 0;
  for (size_t w = 0; w < waiting_.size();) {
    Sequence& seq = *waiting_[w];
    if (budget == 0 && lower(seq) == nullptr) break;
    while (static_cast<int64_t>(running_.size()) + n_waiting_for_blocks >= options_.max_running &&
           lower(seq) != nullptr)
      budget += preempt_last();
    if (static_cast<int64_t>(running_.size()) + n_waiting_for_blocks >= options_.max_running) break;
    const int64_t n_tokens = static_cast<int64_t>(seq.tokens.size());
    // A request that owes prompt logprobs computes its whole prompt: it matches nothing.
    const int64_t max_blocks = seq.wants_prompt_rows() ? 0 : (n_tokens - 1) / B;
    const int64_t matched = blocks_.match(seq.tokens.data(), max_blocks, seq.blocks);
    const int64_t hit = matched * B;
    if (matched < max_blocks && being_computed(seq, matched)) {
      blocks_.release(seq.blocks);
      ++n_waiting_for_blocks;
      ++w;
      continue;
    }
    seq.n_computed = hit;
    seq.n_recorded = matched;
    seq.recording = true;
    drop_out_of_window(seq);  // matched blocks the next tokens do not see
    if (n_tokens - hit > budget) reclaim(seq, n_tokens - hit - budget);
    const int64_t take = seq.fit_prompt_rows(std::min(n_tokens - hit, budget), prompt_rows_left);
    if (take == 0 && seq.wants_prompt_rows() && budget > 0) {
      release_blocks(seq);  // no rows left for its prompt logprobs: it waits for the next step
      seq.n_computed = seq.n_recorded = 0;
      ++w;
      continue;
    }
    bool ok = take > 0 && reserve(seq, take);
    while (!ok && take > 0 && lower(seq) != nullptr) {
      budget += preempt_last();
      ok = reserve(seq, take);
    }
    if (!ok) {
      release_blocks(seq);
      seq.n_computed = seq.n_recorded = 0;
      break;
    }
    seq.scheduled = take;
    budget -= take;
    prompt_rows_left -= seq.prompt_rows(take);
    {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.prefix_cache_queried_tokens += n_tokens;
      stats_.prefix_cache_hit_tokens += hit;
      if (!seq.started) {
        --stats_.queue_depth;
        stats_.queued_tokens -= seq.n_prompt;
      }
    }
    if (!seq.started) {
      seq.started = true;
      seq.first_step = Clock::now();
      seq.cached_prompt = hit;
    }
    // A sequence preempted for `seq` sorts after it, so `seq` is still at w.
    SY_CHECK(waiting_[w].get() == &seq, "schedule: the waiting queue moved under request ", seq.id);
    std::unique_ptr<Sequence> admitted = std::move(waiting_[w]);
    waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(w));
    add_running(std::move(admitted));
  }
  // The batch: each scheduled sequence's next tokens, and a logit row where a sequence reaches
  // its last known token.
  for (auto& sp : running_) {
    Sequence& seq = *sp;
    if (seq.scheduled == 0) continue;
    const int32_t row = static_cast<int32_t>(batch_.n_seqs++);
    // Its prompt logprob rows: positions [lo, lo + n_rows), after the step's tokens so far.
    const int64_t n_rows = seq.prompt_rows(seq.scheduled);
    const int64_t lo = std::max(seq.n_computed, seq.prompt_lp_next - 1);
    for (int64_t p = lo; p < lo + n_rows; ++p)
      prompt_rows_of_step_.push_back(
          {&seq, p + 1, static_cast<int32_t>(batch_.n_tokens() + (p - seq.n_computed))});
    for (int64_t i = 0; i < seq.scheduled; ++i) {
      const int64_t pos = seq.n_computed + i;
      batch_.tokens.push_back(seq.tokens[static_cast<size_t>(pos)]);
      batch_.positions.push_back(static_cast<int32_t>(pos));
      batch_.token_seq.push_back(row);
    }
    // The sequence's blocks, then zeros up to the table width (no copy per step).
    batch_.block_tables.insert(batch_.block_tables.end(), seq.blocks.begin(), seq.blocks.end());
    batch_.block_tables.resize(
        batch_.block_tables.size() + limits.max_blocks_per_seq - seq.blocks.size(), 0);
    seq.n_computed += seq.scheduled;
    if (seq.n_computed == static_cast<int64_t>(seq.tokens.size())) {
      batch_.logit_rows.push_back(static_cast<int32_t>(batch_.tokens.size() - 1));
      logit_seqs_.push_back(&seq);
    }
  }
  // Then the prompt logprob rows.
  for (const PromptRow& r : prompt_rows_of_step_) batch_.logit_rows.push_back(r.batch_row);
  return batch_.n_tokens() > 0;
}

bool Engine::being_computed(const Sequence& seq, int64_t block) const {
  if (!blocks_.prefix_caching()) return false;
  const int64_t B = model_.limits().block_size;
  const int64_t end = (block + 1) * B;  // the block is tokens [end - B, end)
  for (const auto& sp : running_) {
    const Sequence& r = *sp;
    // Scheduled this step, recording, and with the block next to record (n_computed moves past
    // this step's tokens once the batch is built): each step of waiting brings it closer to
    // recording the block. Its block before that one is `seq`'s matched one (so the same
    // tokens up to there); it still holds it, as the parent of its next record.
    if (r.scheduled == 0 || !r.recording || r.n_recorded != block || r.n_computed >= end ||
        static_cast<int64_t>(r.tokens.size()) < end)
      continue;
    if (block > 0 &&
        r.blocks[static_cast<size_t>(block - 1)] != seq.blocks[static_cast<size_t>(block - 1)])
      continue;
    if (std::equal(seq.tokens.begin() + (end - B), seq.tokens.begin() + end,
                   r.tokens.begin() + (end - B)))
      return true;
  }
  return false;
}

void Engine::release_blocks(Sequence& seq) {
  blocks_.release(seq.blocks, seq.n_dropped, static_cast<int64_t>(seq.blocks.size()));
  seq.blocks.clear();
  seq.n_dropped = 0;
}

void Engine::record_blocks() {
  const int64_t B = model_.limits().block_size;
  for (auto& sp : running_) {
    Sequence& seq = *sp;
    if (seq.scheduled == 0) continue;
    const int64_t full = seq.n_computed / B;
    if (blocks_.prefix_caching() && seq.recording && full > seq.n_recorded) {
      seq.n_recorded = blocks_.commit(seq.blocks, seq.tokens.data(), seq.n_recorded, full);
      // Another block holds the same content (two sequences computed it at once): this one
      // records no more, so nothing keeps it from giving back blocks.
      seq.recording = seq.n_recorded == full;
    }
    drop_out_of_window(seq);
  }
}

void Engine::drop_out_of_window(Sequence& seq) {
  const int64_t window = model_.config().sliding_window;
  if (window <= 0) return;
  const int64_t B = model_.limits().block_size;
  // Every later token attends to positions from n_computed - window + 1 on: the blocks wholly
  // before that are read no more, and go back (to the cache, where recorded). While the
  // sequence records, its last recorded block stays: the next block to record names it.
  int64_t drop = std::max<int64_t>(0, seq.n_computed - window + 1) / B;
  if (blocks_.prefix_caching() && seq.recording)
    drop = std::min(drop, std::max<int64_t>(0, seq.n_recorded - 1));
  if (drop <= seq.n_dropped) return;
  blocks_.release(seq.blocks, seq.n_dropped, drop);
  std::fill(seq.blocks.begin() + seq.n_dropped, seq.blocks.begin() + drop, 0);
  seq.n_dropped = drop;
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

bool Engine::sample_on_device() const {
  if (model_.ops().device() == Device::kCpu) return false;
  return model_.forward_sample_supported();
}

TokenLogprobs Engine::row_logprobs(size_t i, int32_t token, int64_t top, bool on_device) {
  thread_local std::vector<int32_t> order;
  const int64_t vocab = model_.config().vocab_size;
  const int64_t n = std::min(top, vocab);
  const float* lp = host_lp_.data();
  const int32_t* top_ids = host_lp_ids_.data();
  if (!on_device) {
    cpu::logprobs_row(logits_.data() + static_cast<int64_t>(i) * vocab, vocab, token, n,
                      host_lp_.data(), host_lp_ids_.data(), order);
  } else {  // from the device, in this row's slot
    const int64_t slot = logprob_slot_[i];
    lp = logprobs_.logprobs + slot * (1 + logprobs_.top);
    top_ids = logprobs_.ids + slot * logprobs_.top;
  }
  TokenLogprobs t;
  t.token_id = token;
  t.logprob = lp[0];
  for (int64_t k = 0; k < n; ++k) t.top.push_back({top_ids[k], lp[1 + k]});
  return t;
}

void Engine::process_logits(const int32_t* sampled) {
  // Log-probabilities: from the device (logprobs_, in logprob_slot_'s rows) when it sampled,
  // otherwise computed here into host_lp_ (row_logprobs).
  const int64_t vocab = model_.config().vocab_size;
  const Clock::time_point now = Clock::now();
  std::vector<Sequence*> done;
  // Prompt logprobs first, so that a sequence's first token carries all of them.
  for (size_t j = 0; j < prompt_rows_of_step_.size(); ++j) {
    const PromptRow& r = prompt_rows_of_step_[j];
    Sequence& seq = *r.seq;
    const size_t i = logit_seqs_.size() + j;  // its logit row
    SY_CHECK(r.token == seq.prompt_lp_next, "prompt logprobs of token ", r.token, " after ",
             seq.prompt_lp_next - 1);
    seq.prompt_lp.push_back(row_logprobs(i, seq.tokens[static_cast<size_t>(r.token)],
                                         seq.params.prompt_logprobs, sampled != nullptr));
    ++seq.prompt_lp_next;
  }
  for (size_t i = 0; i < logit_seqs_.size(); ++i) {
    Sequence& seq = *logit_seqs_[i];
    const float* row = logits_.data() + static_cast<int64_t>(i) * vocab;
    const int32_t next = sampled == nullptr ? seq.sampler->sample(row, seq.tokens) : sampled[i];
    seq.tokens.push_back(next);
    if (seq.n_generated() == 1) seq.first_token = now;
    RequestEvent event;
    event.token_ids.push_back(next);
    if (seq.n_generated() == 1 && seq.params.prompt_logprobs > 0)
      event.prompt_logprobs = std::move(seq.prompt_lp);
    if (seq.params.logprobs > 0)
      event.logprobs.push_back(row_logprobs(i, next, seq.params.logprobs, sampled != nullptr));
    FinishReason reason = FinishReason::kNone;
    const bool eos = !seq.params.ignore_eos && tokenizer_.is_eos(next);
    const bool stop_id =
        std::find(seq.params.stop_token_ids.begin(), seq.params.stop_token_ids.end(), next) !=
        seq.params.stop_token_ids.end();
    if (eos || stop_id)
      reason = FinishReason::kStop;
    else if (seq.n_generated() >= seq.params.max_tokens ||
             static_cast<int64_t>(seq.tokens.size()) >= context_limit_)
      reason = FinishReason::kLength;
    // Text: cut at a stop string; otherwise hold back a tail that could begin one. Before
    // min_tokens tokens, stop strings are not looked for (as vLLM).
    std::string text = seq.held + seq.decoder->push(next);
    seq.held.clear();
    size_t cut = std::string::npos;
    const bool stops = seq.n_generated() >= seq.params.sampling.min_tokens;
    if (stops)
      for (const std::string& stop : seq.params.stop) cut = std::min(cut, text.find(stop));
    if (cut != std::string::npos) {
      text.resize(cut);
      reason = FinishReason::kStop;
    } else if (reason != FinishReason::kNone) {
      text += seq.decoder->flush();
    } else if (stops || seq.n_generated() + 1 == seq.params.sampling.min_tokens) {
      // The longest suffix that is a prefix of a stop string waits for the next token (which,
      // one token before min_tokens, is the first one looked at). Stop strings are valid UTF-8,
      // so the held suffix starts at a character boundary.
      size_t keep = 0;
      for (const std::string& stop : seq.params.stop)
        for (size_t n = std::min(stop.size() - 1, text.size()); n > keep; --n)
          if (text.compare(text.size() - n, n, stop, 0, n) == 0) {
            keep = n;
            break;
          }
      seq.held = text.substr(text.size() - keep);
      text.resize(text.size() - keep);
    }
    event.text = std::move(text);
    if (reason == FinishReason::kNone) {
      seq.sink->on_event(std::move(event));
    } else {
      finish(seq, reason, std::move(event));  // the last token travels with the finish reason
      done.push_back(&seq);
    }
  }
  running_.erase(std::remove_if(running_.begin(), running_.end(),
                                [&](const std::unique_ptr<Sequence>& s) {
                                  return std::find(done.begin(), done.end(), s.get()) != done.end();
                                }),
                 running_.end());
}

void Engine::run() {
  std::deque<std::pair<Clock::time_point, int64_t>> recent;  // (step time, tokens generated)
  int64_t recent_tokens = 0;
  std::vector<int32_t> wire;
  for (;;) {
    std::vector<std::pair<uint64_t, FinishReason>> cancelled;
    bool stopping = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait_for(lock, std::chrono::milliseconds(100), [&] {
        return stopping_ || !incoming_.empty() || !cancelled_.empty() || !waiting_.empty() ||
               !running_.empty() || draining_;
      });
      while (!incoming_.empty()) {
        enqueue(std::move(incoming_.front()));
        incoming_.pop_front();
      }
      cancelled.swap(cancelled_);
      stopping = stopping_;
      if ((draining_ || stopping_) && waiting_.empty() && running_.empty()) break;
    }
    // Cancellations, deadlines and stop end requests before the step.
    const Clock::time_point now = Clock::now();
    auto ends = [&](Sequence& s) -> FinishReason {
      if (stopping) return FinishReason::kUnavailable;
      // A deadline that has passed is the reason even when the transport's cancel came first.
      if (s.params.deadline && *s.params.deadline <= now) return FinishReason::kDeadline;
      for (const auto& [id, reason] : cancelled)
        if (id == s.id) return reason;
      return FinishReason::kNone;
    };
    int64_t ended_waiting = 0, ended_tokens = 0;
    for (auto it = waiting_.begin(); it != waiting_.end();) {
      const FinishReason r = ends(**it);
      if (r == FinishReason::kNone) {
        ++it;
        continue;
      }
      if (!(*it)->started) {
        ++ended_waiting;
        ended_tokens += (*it)->n_prompt;
      }
      finish(**it, r, error_event(r));
      it = waiting_.erase(it);
    }
    for (auto it = running_.begin(); it != running_.end();) {
      const FinishReason r = ends(**it);
      if (r == FinishReason::kNone) {
        ++it;
        continue;
      }
      finish(**it, r, error_event(r));
      it = running_.erase(it);
    }
    if (ended_waiting > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      stats_.queue_depth -= ended_waiting;
      stats_.queued_tokens -= ended_tokens;
    }
    if (stopping) continue;  // the loop exits once everything has ended

    if (schedule()) {
      // Broadcast the plan, run the step on every rank, sample here.
      if (world_ != nullptr && world_->size() > 1) {
        int32_t header[4] = {kPlanStep, static_cast<int32_t>(batch_.n_tokens()),
                             static_cast<int32_t>(batch_.n_seqs),
                             static_cast<int32_t>(batch_.logit_rows.size())};
        world_->broadcast_idle(header, sizeof(header), 0, kIdleSleepMs);
        wire.clear();
        for (const auto* v : {&batch_.tokens, &batch_.positions, &batch_.token_seq,
                              &batch_.block_tables, &batch_.logit_rows})
          wire.insert(wire.end(), v->begin(), v->end());
        world_->broadcast(wire.data(), wire.size() * sizeof(int32_t), 0);
      }
      const int64_t generated = static_cast<int64_t>(logit_seqs_.size());
      if (sample_on_device()) {
        // Only the tokens come back from the GPU: each sequence's sampler gives its parameters
        // and draw, in the same stream as on the host, and a penalised one its context's
        // distinct tokens. Rows with logprobs bring back their log-probabilities.
        // Prompt logprob rows (after the sampled ones) sample greedily, with no draw, and their
        // logprobs are of the prompt's next token (forced).
        const size_t n_logits = batch_.logit_rows.size();
        sample_params_.assign(n_logits * Ops::kSampleParams, 0.f);
        sampled_.resize(n_logits);
        const int64_t vocab = model_.config().vocab_size;
        logprobs_.rows.clear();
        logprobs_.forced.clear();
        logprobs_.top = 1;
        logprob_slot_.assign(n_logits, -1);
        penalty_offsets_.assign(1, 0);
        penalty_ids_.clear();
        penalty_counts_.clear();
        penalty_params_.assign(n_logits * Ops::kPenaltyParams, 0.f);
        bias_offsets_.assign(1, 0);
        bias_ids_.clear();
        bias_values_.clear();
        bool penalised = false;
        for (size_t i = 0; i < logit_seqs_.size(); ++i) {
          Sequence& seq = *logit_seqs_[i];
          Sampler& sampler = *seq.sampler;
          sampler.device_params(sample_params_.data() + i * Ops::kSampleParams);
          if (sampler.penalised()) {
            const PenaltyContext& pc = sampler.penalty_context(seq.tokens);
            penalty_ids_.insert(penalty_ids_.end(), pc.ids.begin(), pc.ids.end());
            penalty_counts_.insert(penalty_counts_.end(), pc.counts.begin(), pc.counts.end());
            penalised = true;
          }
          penalty_offsets_.push_back(static_cast<int32_t>(penalty_ids_.size()));
          sampler.penalty_params(penalty_params_.data() + i * Ops::kPenaltyParams);
          const BiasList& bias = sampler.bias_list(seq.n_generated());
          bias_ids_.insert(bias_ids_.end(), bias.ids.begin(), bias.ids.end());
          bias_values_.insert(bias_values_.end(), bias.values.begin(), bias.values.end());
          bias_offsets_.push_back(static_cast<int32_t>(bias_ids_.size()));
          if (seq.params.logprobs > 0) {
            logprob_slot_[i] = static_cast<int64_t>(logprobs_.rows.size());
            logprobs_.rows.push_back(static_cast<int32_t>(i));
            logprobs_.forced.push_back(-1);
            logprobs_.top = std::max(logprobs_.top, std::min(seq.params.logprobs, vocab));
          }
        }
        for (size_t j = 0; j < prompt_rows_of_step_.size(); ++j) {
          const PromptRow& r = prompt_rows_of_step_[j];
          const size_t i = logit_seqs_.size() + j;
          penalty_offsets_.push_back(static_cast<int32_t>(penalty_ids_.size()));
          penalty_params_[i * Ops::kPenaltyParams] = 1.f;  // {1, 0, 0}: none
          bias_offsets_.push_back(static_cast<int32_t>(bias_ids_.size()));
          logprob_slot_[i] = static_cast<int64_t>(logprobs_.rows.size());
          logprobs_.rows.push_back(static_cast<int32_t>(i));
          logprobs_.forced.push_back(r.seq->tokens[static_cast<size_t>(r.token)]);
          logprobs_.top = std::max(logprobs_.top, std::min(r.seq->params.prompt_logprobs, vocab));
        }
        const SamplePenalties penalties{penalty_offsets_.data(), penalty_ids_.data(),
                                        penalty_counts_.data(), penalty_params_.data()};
        logprobs_.logprobs = device_lp_.data();
        logprobs_.ids = device_lp_ids_.data();
        const SampleBiases biases{bias_offsets_.data(), bias_ids_.data(), bias_values_.data()};
        model_.forward_sample(
            batch_, sample_params_.data(), sampled_.data(), penalised ? &penalties : nullptr,
            logprobs_.rows.empty() ? nullptr : &logprobs_, bias_ids_.empty() ? nullptr : &biases);
        record_blocks();
        process_logits(sampled_.data());
      } else {
        model_.forward(batch_, logits_.data());
        record_blocks();
        process_logits(nullptr);
      }
      const Clock::time_point t = Clock::now();
      recent.emplace_back(t, generated);
      recent_tokens += generated;
      while (!recent.empty() && t - recent.front().first > std::chrono::seconds(5)) {
        recent_tokens -= recent.front().second;
        recent.pop_front();
      }
      const double span =
          recent.size() > 1 ? std::chrono::duration<double>(t - recent.front().first).count() : 0.0;
      std::lock_guard<std::mutex> lock(mu_);
      ++stats_.steps;
      stats_.recent_tokens_per_second = span > 0 ? static_cast<double>(recent_tokens) / span : 0;
    } else if (!waiting_.empty() && running_.empty()) {
      // Nothing fits even in an empty cache: validation keeps this from happening.
      RequestEvent event;
      event.error = "the request does not fit in the KV cache";
      finish(*waiting_.front(), FinishReason::kError, std::move(event));
      waiting_.pop_front();
    }
    std::lock_guard<std::mutex> lock(mu_);
    stats_.running = static_cast<int64_t>(running_.size());
    stats_.kv_blocks_used = blocks_.n_total() - blocks_.n_free();
    stats_.kv_blocks_cached = blocks_.n_cached();
    if (recent.empty() || Clock::now() - recent.back().first > std::chrono::seconds(5))
      stats_.recent_tokens_per_second = 0;
  }
  if (world_ != nullptr && world_->size() > 1) {
    int32_t header[4] = {kPlanExit, 0, 0, 0};
    world_->broadcast_idle(header, sizeof(header), 0, kIdleSleepMs);
  }
}

void Engine::run_worker(Model& model, Communicator& world) {
  const ModelLimits& limits = model.limits();
  StepBatch batch;
  std::vector<int32_t> wire;
  for (;;) {
    int32_t header[4] = {0, 0, 0, 0};
    world.broadcast_idle(header, sizeof(header), 0, kIdleSleepMs);
    if (header[0] == kPlanExit) return;
    SY_CHECK(header[0] == kPlanStep, "unknown step plan kind ", header[0]);
    const int64_t n_tokens = header[1], n_seqs = header[2], n_logits = header[3];
    const int64_t n_table = n_seqs * limits.max_blocks_per_seq;
    wire.resize(static_cast<size_t>(3 * n_tokens + n_table + n_logits));
    world.broadcast(wire.data(), wire.size() * sizeof(int32_t), 0);
    batch.clear();
    batch.n_seqs = n_seqs;
    const int32_t* p = wire.data();
    auto take = [&](std::vector<int32_t>& v, int64_t n) {
      v.assign(p, p + n);
      p += n;
    };
    take(batch.tokens, n_tokens);
    take(batch.positions, n_tokens);
    take(batch.token_seq, n_tokens);
    take(batch.block_tables, n_table);
    take(batch.logit_rows, n_logits);
    // Rank 0 samples (on the host from its gathered logits, or on the device); this rank only
    // takes part in the step's collectives, the logits' all-gather included.
    model.forward(batch, nullptr);
  }
}

}  // namespace sy
