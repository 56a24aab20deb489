// The serving engine: continuous batching over the model, driven from rank 0.
//
// Rank 0 runs Engine::run() on its main thread: each step it admits queued requests, schedules
// prefill chunks and decode tokens under a token budget, broadcasts the step plan, runs the
// forward pass in lockstep with the other ranks (which run Engine::run_worker), samples, and
// hands events to each request's sink. submit(), cancel(), stats() and drain() are thread-safe
// and are called from the RPC threads.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/engine/kv_blocks.h"
#include "runtime/engine/sampler.h"
#include "runtime/formats/tokenizer.h"
#include "runtime/model/model.h"

namespace sy {

// Why a request was refused at submit(); maps to a gRPC status code.
class RequestError : public Error {
 public:
  enum class Code { kInvalidArgument, kResourceExhausted, kUnavailable };
  RequestError(Code code, const std::string& message) : Error(message), code_(code) {}
  Code code() const { return code_; }

 private:
  Code code_;
};

struct RequestParams {
  std::vector<int32_t> prompt;  // token ids (BOS already added for text prompts)
  int64_t max_tokens = 16;      // tokens to generate at most
  SamplingParams sampling;
  std::vector<std::string> stop;        // stop strings (not included in the output)
  std::vector<int32_t> stop_token_ids;  // tokens that end generation (included in the output)
  bool ignore_eos = false;
  int64_t logprobs = 0;  // top-n logprobs per token; 0 = none
  // Top-n logprobs of each prompt token after the first, given the tokens before it; 0 = none.
  // Such a request computes its whole prompt (no prefix cache) in chunks that fit the step's
  // prompt logit rows (Engine::prompt_logit_rows).
  int64_t prompt_logprobs = 0;
  std::optional<std::chrono::steady_clock::time_point> deadline;
  // Lower values are served first; first come first served within one value. A waiting request
  // takes step tokens, running slots and KV blocks from running requests of higher values.
  int32_t priority = 0;
};

enum class FinishReason { kNone, kStop, kLength, kCancelled, kDeadline, kError, kUnavailable };

struct TopLogprob {
  int32_t token_id = 0;
  float logprob = 0;
};
struct TokenLogprobs {
  int32_t token_id = 0;
  float logprob = 0;
  std::vector<TopLogprob> top;
};

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double queue_time_ms = 0;
  double time_to_first_token_ms = 0;
  double total_time_ms = 0;
  int64_t preemptions = 0;
  int64_t cached_prompt_tokens =
      0;  // prompt tokens whose keys and values came from the prefix cache
};

// One message of a request's stream. The last one has finish != kNone and carries usage.
struct RequestEvent {
  std::string text;                // new text, never ending inside a UTF-8 character
  std::vector<int32_t> token_ids;  // tokens since the last event
  std::vector<TokenLogprobs> logprobs;
  std::vector<TokenLogprobs> prompt_logprobs;  // on the first event with a token, when asked
  FinishReason finish = FinishReason::kNone;
  Usage usage;
  std::string error;  // for kError / kUnavailable
};

// Receives a request's events, on the engine thread. Must not block.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  virtual void on_event(RequestEvent event) = 0;
};

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
  struct Sequence;
  bool schedule();  // builds batch_ for this step; false when nothing to run
  // Sends `event` as the request's last (with finish reason and usage) and frees its blocks.
  void finish(Sequence& seq, FinishReason reason, RequestEvent event);
  // Inserts `seq` into waiting_ (or running_) in serving order: priority, then arrival.
  void enqueue(std::unique_ptr<Sequence> seq);
  void add_running(std::unique_ptr<Sequence> seq);
  // Preempts the last running sequence (the newest of the highest priority value): its blocks
  // go back and it waits to be recomputed. Returns the tokens it had been given this step.
  int64_t preempt_last();
  // True when a sequence scheduled this step has the same tokens [0, (block + 1) * block_size)
  // as `seq` (whose table holds the matched blocks before `block`) and will record that block
  // next.
  bool being_computed(const Sequence& seq, int64_t block) const;
  // After a step: records the blocks that became full in the prefix cache, and gives back those
  // that slid out of the attention window.
  void record_blocks();
  void release_blocks(Sequence& seq);      // all of its blocks that it still holds
  void drop_out_of_window(Sequence& seq);  // gives back the blocks no later token attends to
  // The log-probability of `token` and the `top` most likely tokens of logit row i: from the
  // host logits, or from the step's device logprobs (logprob_slot_).
  TokenLogprobs row_logprobs(size_t i, int32_t token, int64_t top, bool on_device);
  // Samples (or takes `sampled`, one token per logit row, when the device sampled) and emits.
  void process_logits(const int32_t* sampled);
  // True when this step samples on the device: a GPU model whose ranks' vocabulary slices are
  // equal. Only the sampled tokens (and any logprobs) come back.
  bool sample_on_device() const;
  void validate(const RequestParams& params) const;
  // The tokens that end `params`' generation: its stop ids, and the model's end-of-sequence ids
  // unless ignore_eos (what min_tokens holds back).
  std::vector<int32_t> end_ids(const RequestParams& params) const;

  Model& model_;
  const Tokenizer& tokenizer_;
  EngineOptions options_;
  Communicator* world_;
  BlockAllocator blocks_;
  int64_t context_limit_;

  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Sequence>> incoming_;  // submitted, not yet seen by the loop
  std::vector<std::pair<uint64_t, FinishReason>> cancelled_;
  bool draining_ = false;
  bool stopping_ = false;
  uint64_t next_id_ = 1;
  int64_t queued_tokens_ = 0;
  EngineStats stats_;

  // Engine-thread state.
  std::deque<std::unique_ptr<Sequence>> waiting_;   // in serving order
  std::vector<std::unique_ptr<Sequence>> running_;  // in serving order (preempted last)
  StepBatch batch_;
  std::vector<Sequence*> logit_seqs_;  // sequence of each sampled logit row (the first rows)
  // The prompt logprob rows of the step, after the sampled ones: logit row
  // logit_seqs_.size() + j is prompt_rows_of_step_[j], the logits before token `token` of `seq`.
  struct PromptRow {
    Sequence* seq;
    int64_t token;      // the prompt token whose logprobs the row gives
    int32_t batch_row;  // the step's token row the logits come from (position token - 1)
  };
  std::vector<PromptRow> prompt_rows_of_step_;
  int64_t prompt_rows_ = 0;               // see prompt_logit_rows()
  std::vector<float> logits_;             // [max_logit_rows, vocab]
  std::vector<float> sample_params_;      // [max_running, Ops::kSampleParams] (device sampling)
  std::vector<int32_t> sampled_;          // [max_running]
  std::vector<int32_t> penalty_offsets_;  // the step's SamplePenalties
  std::vector<int32_t> penalty_ids_;
  std::vector<int32_t> penalty_counts_;
  std::vector<float> penalty_params_;
  std::vector<int32_t> bias_offsets_;  // the step's SampleBiases
  std::vector<int32_t> bias_ids_;
  std::vector<float> bias_values_;
  SampleLogprobs logprobs_;             // the step's logprobs asked of forward_sample
  std::vector<int64_t> logprob_slot_;   // per logit row: its row in logprobs_, or -1
  std::vector<float> device_lp_;        // forward_sample's logprobs out [max_logit_rows, 1 + top]
  std::vector<int32_t> device_lp_ids_;  // [max_logit_rows, top]
  std::vector<float> host_lp_;          // one row's, sampled on the host [1 + top]
  std::vector<int32_t> host_lp_ids_;    // [top]
  std::chrono::steady_clock::time_point start_;
};

}  // namespace sy
