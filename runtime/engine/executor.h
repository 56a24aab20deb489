// The executor: runs a step's batch on every rank and samples its logit rows on rank 0. Rank 0
// broadcasts each batch to the other ranks (which run run_worker), every rank runs the forward
// pass in lockstep (its collectives included), and rank 0's StepSampler turns the logits into
// tokens.
//
// A batch on the wire (int32 words, broadcast from rank 0):
//   header [kind, n_tokens, n_seqs, n_logits]      kind: 1 = step, 2 = step and report, 0 = exit
//
// A report (asked for by rank 0 now and then, never every step) follows that step's forward
// pass: each rank in turn broadcasts its RankCounters since its last report, so rank 0 gets
// every rank's figures tagged with the step they end at, with no collective on other steps.
//   body   tokens[n_tokens] positions[n_tokens] token_seq[n_tokens]
//          block_tables[n_seqs * max_blocks_per_seq] logit_rows[n_logits]
#pragma once

#include <cstdint>
#include <vector>

#include "parallel/communicator.h"
#include "runtime/engine/sampling.h"
#include "runtime/model/model.h"

namespace sy {

// One rank's figures since its last report: its MoE counts and its forward passes' times.
struct RankCounters {
  int rank = 0;
  MoeCounters moe;
  std::vector<int64_t> step_buckets;  // [step_seconds_edges().size() + 1] passes per bucket
  double step_seconds = 0;            // their total time
  int64_t steps = 0;                  // their number
};

// Upper edges (seconds) of the forward-pass time buckets of RankCounters.
const std::vector<double>& step_seconds_edges();

class Executor {
 public:
  // `world` (null for one rank) carries the batches to the workers.
  Executor(Model& model, Communicator* world);

  // Runs `batch` on every rank and samples rows[i] of its logit rows: the tokens, one per row
  // (valid until the next step). sampler() then holds the rows' logprobs.
  // With `report`, every rank's RankCounters come back after the forward pass (reports()).
  const std::vector<int32_t>& execute(const StepBatch& batch,
                                      const std::vector<SampleRequest>& rows, bool report = false);
  // Every rank's figures, by rank, as the last reporting step gathered them.
  const std::vector<RankCounters>& reports() const { return reports_; }
  const StepSampler& sampler() const { return sampler_; }
  // Tells the workers to return.
  void stop_workers();

  // The loop of every other rank: runs broadcast batches until told to exit. Polls with growing
  // sleeps while idle, so an idle rank does not keep a core busy.
  static void run_worker(Model& model, Communicator& world);

 private:
  Model& model_;
  Communicator* world_;
  StepSampler sampler_;
  std::vector<int32_t> wire_;
  std::vector<int32_t> tokens_;
  RankCounters local_;  // this rank's since its last report
  std::vector<RankCounters> reports_;
};

}  // namespace sy
