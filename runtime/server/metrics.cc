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
const std::vector<double> kStepEdges = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                        0.25,  0.5,    1.0,   2.5,  5.0,   10.0};

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

Metrics::Metrics(std::string model_name, int64_t max_model_len, std::string prefix)
    : model_label_("model_name=\"" + escape_label(model_name) + "\""),
      prefix_(std::move(prefix)),
      ttft_(kTtftEdges),
      inter_token_(kInterTokenEdges),
      e2e_(kLatencyEdges),
      queue_(kLatencyEdges),
      prompt_tokens_(buckets_1_2_5(max_model_len)),
      generation_tokens_(buckets_1_2_5(max_model_len)),
      step_(kStepEdges) {
  SY_CHECK(prefix_ == "switchyard:" || prefix_ == "switchyard_", "metrics prefix '", prefix_,
           "' must be switchyard: or switchyard_");
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
  step_.observe(r.seconds);
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
  head(out, p + "step_seconds", "histogram", "Wall time of an engine step on a rank, seconds.");
  step_.render(p + "step_seconds", l + ",rank=\"0\"", out);
  return out;
}

}  // namespace sy
