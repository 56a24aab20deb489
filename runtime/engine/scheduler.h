// The scheduler: what runs each step. It keeps the waiting and running sequences in serving
// order (priority, then arrival) and the KV blocks they hold, and each step gives running
// sequences their decode tokens and prefill chunks, admits waiting requests (past their prefix
// cache hits) under the token budget, preempting lower-priority sequences when slots or blocks
// run out. Its output is a StepPlan: plain data for the executor and the output processor.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "runtime/engine/kv_blocks.h"
#include "runtime/engine/sequence.h"
#include "runtime/model/config.h"
#include "runtime/model/model.h"

namespace sy {

// One step: the batch every rank runs, and what its logit rows are for.
struct StepPlan {
  StepBatch batch;
  std::vector<Sequence*> sampled;  // the sequence of each sampled logit row (the first rows)
  // The prompt logprob rows, after the sampled ones: logit row sampled.size() + j is
  // prompt_rows[j], the logits before token `token` of `seq`.
  struct PromptRow {
    Sequence* seq;
    int64_t token;      // the prompt token whose logprobs the row gives
    int32_t batch_row;  // the step's token row the logits come from (position token - 1)
  };
  std::vector<PromptRow> prompt_rows;
  // Admissions of the step, for the engine's stats: requests that left the queue and their
  // prompt tokens; tokens of the sequences admitted and those found in the prefix cache.
  int64_t started = 0;
  int64_t started_tokens = 0;
  int64_t prefix_queried_tokens = 0;
  int64_t prefix_hit_tokens = 0;

  void clear();
};

struct SchedulerOptions {
  int64_t max_batch_tokens = 256;  // tokens per step
  int64_t max_running = 64;        // sequences per step
  int64_t prompt_logit_rows = 0;   // logit rows a step keeps for prompt logprobs
  bool prefix_caching = true;
};

class Scheduler {
 public:
  Scheduler(const ModelConfig& config, const ModelLimits& limits, const SchedulerOptions& options);

  // Inserts `seq` among the waiting in serving order.
  void enqueue(std::unique_ptr<Sequence> seq);
  // This step's plan; false when nothing runs.
  bool schedule(StepPlan& plan);
  // After a step: records the blocks that became full in the prefix cache, and gives back those
  // that slid out of the attention window.
  void record_blocks();
  // Gives back every block `seq` still holds.
  void release_blocks(Sequence& seq);
  // Drops the sequences in `done` (finished) from the running ones.
  void remove_running(const std::vector<Sequence*>& done);

  std::deque<std::unique_ptr<Sequence>>& waiting() { return waiting_; }  // in serving order
  std::vector<std::unique_ptr<Sequence>>& running() { return running_; }
  // Sequences preempted so far (each time counts).
  int64_t n_preemptions() const { return n_preemptions_; }
  const BlockAllocator& blocks() const { return blocks_; }
  bool idle() const { return waiting_.empty() && running_.empty(); }

 private:
  void add_running(std::unique_ptr<Sequence> seq);
  // Preempts the last running sequence (the newest of the highest priority value): its blocks
  // go back and it waits to be recomputed. Returns the tokens it had been given this step.
  int64_t preempt_last();
  // Blocks for tokens [0, n_computed + take) of `seq`; false when the cache is full.
  bool reserve(Sequence& seq, int64_t take);
  // The step's running sequences (decodes, then prefill chunks) and admissions.
  void schedule_running();
  void admit_waiting(StepPlan& plan);
  // Admits waiting_[w] if it fits (true), else leaves it waiting.
  enum class Admission { kAdmitted, kSkipped, kStop };
  Admission admit(size_t w, StepPlan& plan, int64_t& n_waiting_for_blocks);
  // Gives `seq` up to `want` more step tokens from running sequences of higher priority values.
  void reclaim(const Sequence& seq, int64_t want);
  // The last running sequence when its priority value is higher than `seq`'s.
  Sequence* lower(const Sequence& seq) const;
  void build_batch(StepPlan& plan);
  // True when a sequence scheduled this step has the same tokens [0, (block + 1) * block_size)
  // as `seq` (whose table holds the matched blocks before `block`) and will record that block
  // next.
  bool being_computed(const Sequence& seq, int64_t block) const;
  void drop_out_of_window(Sequence& seq);  // gives back the blocks no later token attends to

  ModelLimits limits_;
  int64_t sliding_window_;
  SchedulerOptions options_;
  BlockAllocator blocks_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // in serving order (preempted last)
  int64_t budget_ = 0;                              // step tokens left while scheduling
  int64_t n_preemptions_ = 0;                       // see n_preemptions()
  int64_t prompt_rows_left_ = 0;                    // logit rows left for prompt logprobs this step
};

}  // namespace sy
