// The serving engine: continuous batching over the model, driven from rank 0.
//
// Rank 0 runs Engine::run() on its main thread: each step the scheduler (scheduler.h) admits
// queued requests and plans prefill chunks and decode tokens under a token budget (a StepPlan),
// the executor (executor.h) runs the plan's batch in lockstep on every rank (the others run
// Engine::run_worker) and samples it (sampling.h), and the output processor (output.h) turns
// the tokens into events for each request's sink. submit(), cancel(), stats() and drain() are
// thread-safe and are called from the RPC threads.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "kernels/error.h"
#include "runtime/engine/executor.h"
#include "runtime/engine/output.h"
#include "runtime/engine/request.h"
#include "runtime/engine/scheduler.h"
#include "runtime/engine/sequence.h"
#include "runtime/formats/tokenizer.h"
#include "runtime/model/model.h"

namespace sy {

struct EngineOptions {
  int64_t max_batch_tokens = 256;      // tokens per step (prefill chunks + decodes)
  int64_t max_running = 64;            // sequences per step
  int64_t max_queue_requests = 256;    // admitted but waiting; past it RESOURCE_EXHAUSTED
  int64_t max_queue_tokens = 1 << 20;  // prompt tokens of waiting requests; likewise
  int64_t max_stop_strings = 16;
  int64_t max_stop_string_bytes = 256;
  int64_t max_logprobs = 20;
  int64_t max_completions = 16;  // requests one submit_all takes (a call's n)
  // Keep the keys and values of finished requests' full KV blocks and reuse them for requests
  // that begin with the same tokens (kv_blocks.h).
  bool prefix_caching = true;
  // Seconds between the steps that gather every rank's figures for an observer (none without
  // one): one broadcast per rank then, none on the steps between.
  double report_interval_s = 1.0;
};

struct EngineStats {
  int64_t queue_depth = 0;
  int64_t queued_tokens = 0;
  int64_t running = 0;
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_cached = 0;  // of the free ones: holding a prefix for reuse
  int64_t block_size = 0;
  double recent_tokens_per_second = 0;
  double uptime_s = 0;
  int64_t requests_completed = 0;          // ended by a stop or their length
  int64_t requests_cancelled = 0;          // cancelled, or their client went away
  int64_t requests_deadline_exceeded = 0;  // past their deadline
  int64_t steps = 0;
  // Tokens of sequences admitted (new, or again after a preemption), and of those the ones
  // found in the prefix cache.
  int64_t prefix_cache_queried_tokens = 0;
  int64_t prefix_cache_hit_tokens = 0;
  bool draining = false;
};

// What one step did, for metrics.
struct StepReport {
  int64_t prompt_tokens = 0;     // prompt tokens computed
  int64_t generated_tokens = 0;  // tokens sampled
  int64_t preemptions = 0;       // sequences preempted to make room
  // For each sequence that got its second or a later token: seconds since its previous one.
  std::vector<double> inter_token_seconds;
};

// Observes the engine for metrics, on the engine thread: must be quick and must not block.
class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  virtual void on_step(const StepReport& report) = 0;
  // A request's end (every request that was accepted ends exactly once).
  virtual void on_finish(const Usage& usage, FinishReason reason) = 0;
  // Every rank's figures since the previous report, by rank, gathered at step `step` (about
  // every EngineOptions::report_interval_s while steps run).
  virtual void on_ranks(const std::vector<RankCounters>& ranks, int64_t step) {}
};

class Engine {
 public:
  // `world` (may be null for one rank) broadcasts step plans to the workers.
  Engine(Model& model, const Tokenizer& tokenizer, const EngineOptions& options,
         Communicator* world);
  ~Engine();

  // Validates and queues a request; throws RequestError. Returns the request's id.
  uint64_t submit(RequestParams params, std::shared_ptr<RequestSink> sink);
  // Validates and queues requests[i] with sinks[i], all of them or none (the completions of one
  // call: at most max_completions); throws RequestError. Returns their ids in order.
  std::vector<uint64_t> submit_all(std::vector<RequestParams> requests,
                                   std::vector<std::shared_ptr<RequestSink>> sinks);
  // The request ends at the next step, CANCELLED (or with `reason`, kDeadline for a call that
  // the transport ended at its deadline), and its KV blocks are freed.
  void cancel(uint64_t id, FinishReason reason = FinishReason::kCancelled);
  EngineStats stats() const;
  // Prompt plus generated tokens of one request at most.
  int64_t context_limit() const;
  // Logit rows a step keeps for prompt logprobs: the model's beyond one per running sequence
  // (ModelLimits::max_logit_rows - max_running); 0 refuses requests for prompt logprobs.
  int64_t prompt_logit_rows() const { return prompt_rows_; }
  // The context limit of an engine over a model of these limits: the block table's and the
  // model's, and the whole cache's, except with a sliding window in a cache that holds a
  // window and a step of blocks (a sequence gives back what leaves its window).
  static int64_t context_limit_for(const ModelConfig& config, const ModelLimits& limits,
                                   int64_t max_batch_tokens);
  // Observations go to `observer` (null: none) from now on; it must outlive the engine loop.
  void set_observer(EngineObserver* observer) { observer_.store(observer); }
  // Stops admitting (submit throws kUnavailable); run() returns once every request has finished.
  void drain();
  // Ends run() at the next step: every open request ends kUnavailable.
  void stop();

  // Rank 0's loop; returns after drain() (or stop()) once no request is left, having told the
  // workers to exit. Sleeps while there is nothing to do.
  void run();
  // The loop of every other rank: executes broadcast step plans until told to exit. Polls with
  // growing sleeps while idle, so an idle rank does not keep a core busy.
  static void run_worker(Model& model, Communicator& world);

 private:
  // Sends `event` as the request's last (with finish reason and usage) and frees its blocks.
  void finish(Sequence& seq, FinishReason reason, RequestEvent event);
  std::unique_ptr<Sequence> make_sequence(RequestParams params, std::shared_ptr<RequestSink> sink);
  // Moves submitted requests into the scheduler and takes the cancellations; false when run()
  // is to return.
  bool take_incoming(std::vector<std::pair<uint64_t, FinishReason>>& cancelled, bool& stopping);
  // Ends the requests cancelled, past their deadline, or all of them when stopping.
  void end_requests(const std::vector<std::pair<uint64_t, FinishReason>>& cancelled, bool stopping);
  // Runs one planned step: executes it, records its blocks, sends its events.
  void run_step();
  void note_step(int64_t generated);  // the step's stats
  void note_state();                  // running, KV blocks and rates after a loop turn
  // The sampling of plan_'s logit rows: each sampled sequence's sampler, then the prompt
  // logprob rows (greedy, their prompt's next token forced).
  void sample_requests();
  // The tokens that end `params`' generation: its stop ids, and the model's end-of-sequence ids
  // unless ignore_eos (what min_tokens holds back).
  std::vector<int32_t> end_ids(const RequestParams& params) const;

  Model& model_;
  const Tokenizer& tokenizer_;
  EngineOptions options_;
  int64_t context_limit_;
  int64_t prompt_rows_ = 0;  // see prompt_logit_rows()
  RequestLimits request_limits_;

  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Sequence>> incoming_;  // submitted, not yet seen by the loop
  std::vector<std::pair<uint64_t, FinishReason>> cancelled_;
  bool draining_ = false;
  bool stopping_ = false;
  uint64_t next_id_ = 1;
  EngineStats stats_;

  // Engine-thread state.
  Scheduler scheduler_;
  Executor executor_;
  OutputProcessor output_;
  StepPlan plan_;
  std::vector<SampleRequest> sample_rows_;
  std::vector<StepOutput> outputs_;
  std::deque<std::pair<std::chrono::steady_clock::time_point, int64_t>> recent_;  // (step, tokens)
  int64_t recent_tokens_ = 0;
  std::chrono::steady_clock::time_point start_;
  std::atomic<EngineObserver*> observer_{nullptr};
  StepReport report_;
  int64_t reported_preemptions_ = 0;
  std::chrono::steady_clock::time_point last_ranks_report_;
};

}  // namespace sy
