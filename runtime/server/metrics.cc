// The server's Prometheus metrics (see metrics.h).
#include "runtime/server/metrics.h"

#include <algorithm>
#include <cstdio>

#include "kernels/error.h"

namespace sy {
namespace {

// vLLM's bucket edges.
const std::vector<double> kTtftEdges = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                        0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                        20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
const std::vector<double> kInterTokenEdges = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                                              0.3,  0.4,   0.5,  0.75,  1.0, 2.5,  5.0,
                                              7.5,  10.0,  20.0, 40.0,  80.0};
const std::vector<double> kLatencyEdges = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,    2.5,
                                           5.0,  10.0,  15.0,  20.0,  30.0,  40.0,   50.0,
                                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

std::string number(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.12g", v);
  return buf;
}

void head(std::string& out, const std::string& name, const char* type, const char* help) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void sample(std::string& out, const std::string& name, const std::string& labels, double v) {
  out += name + "{" + labels + "} " + number(v) + "\n";
}

int finish_slot(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop:
      return 0;
    case FinishReason::kLength:
      return 1;
    case FinishReason::kCancelled:
    case FinishReason::kDeadline:
      return 2;
    default:
      return 3;
  }
}

}  // namespace

Histogram::Histogram(std::vector<double> edges)
    : edges_(std::move(edges)), counts_(edges_.size() + 1, 0) {
  SY_CHECK(std::is_sorted(edges_.begin(), edges_.end()), "histogram edges must ascend");
}

void Histogram::observe(double value) {
  const size_t b =
      static_cast<size_t>(std::lower_bound(edges_.begin(), edges_.end(), value) - edges_.begin());
  ++counts_[b];
  sum_ += value;
  ++count_;
}

void Histogram::add(const std::vector<int64_t>& buckets, double sum) {
  SY_CHECK(buckets.size() == counts_.size(), "histogram: ", buckets.size(), " buckets for ",
           counts_.size());
  for (size_t i = 0; i < buckets.size(); ++i) {
    counts_[i] += buckets[i];
    count_ += buckets[i];
  }
  sum_ += sum;
}

void Histogram::render(const std::string& name, const std::string& labels, std::string& out) const {
  int64_t cumulative = 0;
  for (size_t i = 0; i <= edges_.size(); ++i) {
    cumulative += counts_[i];
    const std::string le = i < edges_.size() ? number(edges_[i]) : "+Inf";
    out += name + "_bucket{" + labels + ",le=\"" + le + "\"} " + std::to_string(cumulative) + "\n";
  }
  out += name + "_sum{" + labels + "} " + number(sum_) + "\n";
  out += name + "_count{" + labels + "} " + std::to_string(count_) + "\n";
}

std::vector<double> buckets_1_2_5(int64_t max) {
  std::vector<double> out;
  for (int64_t scale = 1; scale <= max && scale <= (int64_t{1} << 60) / 10; scale *= 10)
    for (int64_t m : {1, 2, 5})
      if (m * scale <= max) out.push_back(static_cast<double>(m * scale));
  return out;
}

std::string escape_label(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

Metrics::Metrics(std::string model_name, int64_t max_model_len, int64_t n_experts,
                 std::string prefix)
    : n_experts_(n_experts),
      model_label_("model_name=\"" + escape_label(model_name) + "\""),
      prefix_(std::move(prefix)),
      ttft_(kTtftEdges),
      inter_token_(kInterTokenEdges),
      e2e_(kLatencyEdges),
      queue_(kLatencyEdges),
      prompt_tokens_(buckets_1_2_5(max_model_len)),
      generation_tokens_(buckets_1_2_5(max_model_len)) {
  SY_CHECK(prefix_ == "switchyard:" || prefix_ == "switchyard_", "metrics prefix '", prefix_,
           "' must be switchyard: or switchyard_");
  SY_CHECK(n_experts_ >= 1, "metrics: ", n_experts_, " experts per layer");
}

void Metrics::attach(const Engine* engine) {
  std::lock_guard<std::mutex> lock(mu_);
  engine_ = engine;
}

void Metrics::on_step(const StepReport& r) {
  std::lock_guard<std::mutex> lock(mu_);
  prompt_tokens_total_ += r.prompt_tokens;
  generation_tokens_total_ += r.generated_tokens;
  preemptions_total_ += r.preemptions;
  for (double s : r.inter_token_seconds) inter_token_.observe(s);
}

void Metrics::on_ranks(const std::vector<RankCounters>& ranks, int64_t step) {
  if (ranks.empty()) return;
  std::lock_guard<std::mutex> lock(mu_);
  const size_t n = ranks.front().moe.expert_tokens.size();
  expert_tokens_.resize(n, 0);
  std::vector<int64_t> window(n, 0);
  for (const RankCounters& r : ranks) {
    SY_CHECK(r.moe.expert_tokens.size() == n, "rank ", r.rank, " reports ",
             r.moe.expert_tokens.size(), " expert counts, rank 0 ", n);
    for (size_t i = 0; i < n; ++i) window[i] += r.moe.expert_tokens[i];
    exchange_bytes_[0] += r.moe.dispatch_bytes;
    exchange_bytes_[1] += r.moe.combine_bytes;
    exchange_seconds_[0] += r.moe.dispatch_seconds;
    exchange_seconds_[1] += r.moe.combine_seconds;
    while (rank_steps_.size() <= static_cast<size_t>(r.rank))
      rank_steps_.emplace_back(step_seconds_edges());
    rank_steps_[static_cast<size_t>(r.rank)].add(r.step_buckets, r.step_seconds);
  }
  for (size_t i = 0; i < n; ++i) expert_tokens_[i] += window[i];
  report_step_ = step;
  // max / mean of the window's counts per layer (layers without tokens keep their last value).
  const size_t per_layer = static_cast<size_t>(n_experts_);
  SY_CHECK(n % per_layer == 0, n, " expert counts are not layers of ", per_layer, " experts");
  imbalance_.resize(n / per_layer, 0.0);
  for (size_t l = 0; l < imbalance_.size(); ++l) {
    int64_t total = 0, most = 0;
    for (size_t e = 0; e < per_layer; ++e) {
      total += window[l * per_layer + e];
      most = std::max(most, window[l * per_layer + e]);
    }
    if (total > 0)
      imbalance_[l] =
          static_cast<double>(most) * static_cast<double>(per_layer) / static_cast<double>(total);
  }
}

void Metrics::on_finish(const Usage& u, FinishReason reason) {
  std::lock_guard<std::mutex> lock(mu_);
  ++finished_[finish_slot(reason)];
  e2e_.observe(u.total_time_ms / 1e3);
  queue_.observe(u.queue_time_ms / 1e3);
  if (u.completion_tokens > 0) ttft_.observe(u.time_to_first_token_ms / 1e3);
  prompt_tokens_.observe(static_cast<double>(u.prompt_tokens));
  generation_tokens_.observe(static_cast<double>(u.completion_tokens));
}

void Metrics::render_ranks(std::string& out) const {
  const std::string& l = model_label_;
  const std::string& p = prefix_;
  if (expert_tokens_.empty()) return;  // before the first report
  head(out, p + "ranks_report_step", "gauge",
       "The engine step the ranks' figures below were gathered at.");
  sample(out, p + "ranks_report_step", l, static_cast<double>(report_step_));
  head(out, p + "expert_tokens_total", "counter", "Tokens routed to each expert (top-k pairs).");
  for (size_t i = 0; i < expert_tokens_.size(); ++i)
    sample(out, p + "expert_tokens_total",
           l + ",layer=\"" + std::to_string(i / static_cast<size_t>(n_experts_)) + "\",expert=\"" +
               std::to_string(i % static_cast<size_t>(n_experts_)) + "\"",
           static_cast<double>(expert_tokens_[i]));
  head(out, p + "expert_load_imbalance", "gauge",
       "Max over mean of the experts' routed tokens in the last report window, per layer.");
  for (size_t layer = 0; layer < imbalance_.size(); ++layer)
    sample(out, p + "expert_load_imbalance", l + ",layer=\"" + std::to_string(layer) + "\"",
           imbalance_[layer]);
  const char* kinds[2] = {"dispatch", "combine"};
  head(out, p + "moe_exchange_bytes_total", "counter",
       "Bytes the ranks sent in the MoE all-to-all exchange, by direction.");
  for (int k = 0; k < 2; ++k)
    sample(out, p + "moe_exchange_bytes_total", l + ",kind=\"" + kinds[k] + "\"",
           static_cast<double>(exchange_bytes_[k]));
  head(out, p + "moe_exchange_seconds_total", "counter",
       "Seconds the ranks spent in the MoE all-to-all exchange (summed over ranks), by direction.");
  for (int k = 0; k < 2; ++k)
    sample(out, p + "moe_exchange_seconds_total", l + ",kind=\"" + kinds[k] + "\"",
           exchange_seconds_[k]);
  head(out, p + "step_seconds", "histogram", "Wall time of a forward pass on each rank, seconds.");
  for (size_t r = 0; r < rank_steps_.size(); ++r)
    rank_steps_[r].render(p + "step_seconds", l + ",rank=\"" + std::to_string(r) + "\"", out);
}

std::string Metrics::render() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  const std::string& l = model_label_;
  const std::string& p = prefix_;
  if (engine_ != nullptr) {
    const EngineStats s = engine_->stats();
    head(out, p + "num_requests_running", "gauge", "Requests in the running batch.");
    sample(out, p + "num_requests_running", l, static_cast<double>(s.running));
    head(out, p + "num_requests_waiting", "gauge", "Requests waiting for admission.");
    sample(out, p + "num_requests_waiting", l, static_cast<double>(s.queue_depth));
    head(out, p + "kv_cache_usage_perc", "gauge",
         "Fraction of the KV-cache blocks in use (1 = all).");
    sample(out, p + "kv_cache_usage_perc", l,
           s.kv_blocks_total > 0
               ? static_cast<double>(s.kv_blocks_used) / static_cast<double>(s.kv_blocks_total)
               : 0.0);
    head(out, p + "prefix_cache_queries_total", "counter",
         "Prompt tokens looked up in the prefix cache.");
    sample(out, p + "prefix_cache_queries_total", l,
           static_cast<double>(s.prefix_cache_queried_tokens));
    head(out, p + "prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.");
    sample(out, p + "prefix_cache_hits_total", l, static_cast<double>(s.prefix_cache_hit_tokens));
  }
  head(out, p + "prompt_tokens_total", "counter", "Prompt tokens computed.");
  sample(out, p + "prompt_tokens_total", l, static_cast<double>(prompt_tokens_total_));
  head(out, p + "generation_tokens_total", "counter", "Tokens generated.");
  sample(out, p + "generation_tokens_total", l, static_cast<double>(generation_tokens_total_));
  head(out, p + "num_preemptions_total", "counter",
       "Times a running request was preempted to free KV-cache blocks.");
  sample(out, p + "num_preemptions_total", l, static_cast<double>(preemptions_total_));
  head(out, p + "request_success_total", "counter", "Requests finished, by finish reason.");
  const char* reasons[4] = {"stop", "length", "abort", "error"};
  for (int i = 0; i < 4; ++i)
    sample(out, p + "request_success_total", l + ",finished_reason=\"" + reasons[i] + "\"",
           static_cast<double>(finished_[i]));
  struct {
    const Histogram& h;
    const char* name;
    const char* help;
  } histograms[] = {
      {ttft_, "time_to_first_token_seconds", "Time from arrival to the first token, seconds."},
      {inter_token_, "inter_token_latency_seconds", "Time between a request's tokens, seconds."},
      {e2e_, "e2e_request_latency_seconds", "Time from arrival to the last token, seconds."},
      {queue_, "request_queue_time_seconds", "Time waiting for admission, seconds."},
      {prompt_tokens_, "request_prompt_tokens", "Prompt tokens of finished requests."},
      {generation_tokens_, "request_generation_tokens", "Generated tokens of finished requests."},
  };
  for (const auto& h : histograms) {
    head(out, p + h.name, "histogram", h.help);
    h.h.render(p + h.name, l, out);
  }
  render_ranks(out);
  return out;
}

}  // namespace sy
