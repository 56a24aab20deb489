// Prometheus metrics of the server (GET /metrics, text format 0.0.4), named like vLLM's with
// the prefix `switchyard:` (or `switchyard_`, which promtool's linter accepts: it flags every
// name with a colon), and a model_name label on each, so that vLLM dashboards port over by
// changing the prefix.
//
// Request histograms and counters are fed by the engine (EngineObserver, on the engine thread);
// gauges and the prefix-cache counters are read from Engine::stats() at scrape time. Bucket
// edges are vLLM's.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/engine/engine.h"
#include "runtime/engine/executor.h"

namespace sy {

// A cumulative histogram over fixed upper edges (plus +Inf).
class Histogram {
 public:
  explicit Histogram(std::vector<double> edges);
  void observe(double value);
  // Adds counts made elsewhere over the same edges: per bucket [edges + 1], their sum.
  void add(const std::vector<int64_t>& buckets, double sum);
  // Appends the _bucket, _sum and _count lines of `name` with `labels` ("a=\"b\"", no braces).
  void render(const std::string& name, const std::string& labels, std::string& out) const;
  int64_t count() const { return count_; }

 private:
  std::vector<double> edges_;    // ascending upper bounds
  std::vector<int64_t> counts_;  // [edges + 1]: per bucket, not cumulative
  double sum_ = 0;
  int64_t count_ = 0;
};

// 1, 2, 5, 10, 20, 50, ... up to `max` (vLLM's build_1_2_5_buckets).
std::vector<double> buckets_1_2_5(int64_t max);

class Metrics final : public EngineObserver {
 public:
  // `max_model_len` sizes the token-count histograms; `n_experts` is the model's experts per
  // layer. `prefix`: "switchyard:" or "switchyard_".
  Metrics(std::string model_name, int64_t max_model_len, int64_t n_experts,
          std::string prefix = "switchyard:");

  // Gauges and the prefix-cache counters come from `engine` (null: left out) from now on.
  void attach(const Engine* engine);
  void on_step(const StepReport& report) override;
  void on_finish(const Usage& usage, FinishReason reason) override;
  void on_ranks(const std::vector<RankCounters>& ranks, int64_t step) override;
  // The exposition text.
  std::string render() const;

 private:
  // The ranks' figures, under mu_.
  void render_ranks(std::string& out) const;

  int64_t n_experts_;
  const std::string model_label_;  // model_name="..."
  const std::string prefix_;
  const Engine* engine_ = nullptr;

  mutable std::mutex mu_;
  Histogram ttft_, inter_token_, e2e_, queue_, prompt_tokens_, generation_tokens_;
  // From the ranks' reports: routed pairs per [layer, expert] (all ranks), the last window's
  // max/mean per layer, the exchanges' bytes and seconds (dispatch, combine), each rank's
  // forward-pass times, and the step the last report ended at.
  std::vector<int64_t> expert_tokens_;
  std::vector<double> imbalance_;
  int64_t exchange_bytes_[2] = {};
  double exchange_seconds_[2] = {};
  std::vector<Histogram> rank_steps_;
  int64_t report_step_ = 0;
  int64_t prompt_tokens_total_ = 0;
  int64_t generation_tokens_total_ = 0;
  int64_t preemptions_total_ = 0;
  int64_t finished_[4] = {};  // stop, length, abort, error
};

// A label value with \, " and newline escaped.
std::string escape_label(const std::string& value);

}  // namespace sy
