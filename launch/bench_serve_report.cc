// The report of `switchyard bench serve` (see bench_serve_report.h).
#include "launch/bench_serve_report.h"

#include <algorithm>
#include <cstdio>
#include <fstream>

#include "kernels/error.h"

namespace sy::launch {

using json = nlohmann::json;

namespace {

// The q-quantile of sorted values (linear interpolation); 0 when empty.
double quantile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const double pos = q * static_cast<double>(sorted.size() - 1);
  const size_t i = static_cast<size_t>(pos);
  if (i + 1 >= sorted.size()) return sorted.back();
  return sorted[i] + (pos - static_cast<double>(i)) * (sorted[i + 1] - sorted[i]);
}

}  // namespace

Stats stats_of(std::vector<double> v) {
  Stats s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  for (double x : v) s.mean += x / static_cast<double>(v.size());
  s.p50 = quantile(v, 0.5);
  s.p90 = quantile(v, 0.9);
  s.p99 = quantile(v, 0.99);
  return s;
}

namespace {

json stats_json(const Stats& s) {
  return {{"mean", s.mean}, {"p50", s.p50}, {"p90", s.p90}, {"p99", s.p99}};
}

std::string errors_text(const Run& r) {
  std::string s;
  for (const auto& [name, n] : r.errors)
    s += (s.empty() ? "" : ",") + name + ":" + std::to_string(n);
  return s.empty() ? "-" : s;
}
int64_t n_errors(const Run& r) {
  int64_t n = 0;
  for (const auto& [name, count] : r.errors) n += count;
  return n;
}

// The share of the completed requests' prompt tokens that came from the server's prefix cache.
double cached_percent(const Run& r) {
  return r.n_prompt_tokens > 0 ? 100.0 * static_cast<double>(r.n_cached_tokens) /
                                     static_cast<double>(r.n_prompt_tokens)
                               : 0.0;
}

}  // namespace

void print_tables(const std::vector<Run>& runs, const BenchServeArgs& a) {
  const bool open_loop = runs.front().mode == "rate";
  const char* load = open_loop ? "rate" : "conc";
  const char* load_unit = open_loop ? "(req/s)" : "(streams)";
  std::printf("#\n# throughput, time to first token and time per output token\n");
  std::printf("# %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s\n", load, "completed", "req/s",
              "tok/s", "ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99", "tpot_mean", "tpot_p50",
              "tpot_p90", "tpot_p99", "cancelled");
  std::printf("# %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s\n", load_unit, "(req)",
              "(req/s)", "(tok/s)", "(ms)", "(ms)", "(ms)", "(ms)", "(ms)", "(ms)", "(ms)", "(ms)",
              "(req)");
  for (const Run& r : runs)
    std::printf("  %9g %9lld %9.2f %9.1f %9.1f %9.1f %9.1f %9.1f %9.2f %9.2f %9.2f %9.2f %9lld\n",
                r.value, (long long)r.n_completed, r.n_completed / r.duration_s,
                r.n_tokens / r.duration_s, r.ttft.mean, r.ttft.p50, r.ttft.p90, r.ttft.p99,
                r.tpot.mean, r.tpot.p50, r.tpot.p90, r.tpot.p99, (long long)r.n_cancelled_at_end);
  std::printf("#\n# inter-token latency, end-to-end latency, errors and goodput\n");
  std::printf("# %9s %9s %9s %9s %9s %9s %9s %9s %9s %7s %7s  %s\n", load, "itl_p50", "itl_p99",
              "e2e_mean", "e2e_p50", "e2e_p90", "e2e_p99", "goodput", "errors", "good%", "cached",
              "errors_by_code");
  std::printf("# %9s %9s %9s %9s %9s %9s %9s %9s %9s %7s %7s\n", load_unit, "(ms)", "(ms)", "(ms)",
              "(ms)", "(ms)", "(ms)", "(req/s)", "(req)", "(%)", "(%)");
  for (const Run& r : runs) {
    const int64_t n_err = n_errors(r);
    const int64_t n_all = r.n_completed + n_err;
    std::printf("  %9g %9.2f %9.2f %9.1f %9.1f %9.1f %9.1f %9.2f %9lld %7.1f %7.1f  %s\n", r.value,
                r.itl.p50, r.itl.p99, r.e2e.mean, r.e2e.p50, r.e2e.p90, r.e2e.p99,
                r.n_good / r.duration_s, (long long)n_err,
                n_all > 0 ? 100.0 * r.n_good / n_all : 0.0, cached_percent(r),
                errors_text(r).c_str());
  }
  int64_t total_errors = 0;
  for (const Run& r : runs) total_errors += n_errors(r);
  std::printf("# goodput: requests/s meeting TTFT <= %s and TPOT <= %s\n",
              a.slo_ttft_ms > 0 ? (std::to_string(a.slo_ttft_ms) + " ms").c_str() : "any",
              a.slo_tpot_ms > 0 ? (std::to_string(a.slo_tpot_ms) + " ms").c_str() : "any");
  if (total_errors == 0)
    std::printf("# no errors\n");
  else
    std::printf("# ERRORS: %lld\n", (long long)total_errors);
}

void write_json(const std::vector<Run>& runs, json out, const std::string& path) {
  out["runs"] = json::array();
  for (const Run& r : runs) {
    json errors = json::object();
    for (const auto& [name, n] : r.errors) errors[name] = n;
    out["runs"].push_back({{"mode", r.mode},
                           {"value", r.value},
                           {"completed", r.n_completed},
                           {"cancelled_at_end", r.n_cancelled_at_end},
                           {"request_throughput", r.n_completed / r.duration_s},
                           {"output_token_throughput", r.n_tokens / r.duration_s},
                           {"goodput", r.n_good / r.duration_s},
                           {"prompt_tokens", r.n_prompt_tokens},
                           {"cached_prompt_tokens", r.n_cached_tokens},
                           {"preemptions", r.n_preemptions},
                           {"ttft_ms", stats_json(r.ttft)},
                           {"tpot_ms", stats_json(r.tpot)},
                           {"itl_ms", stats_json(r.itl)},
                           {"e2e_ms", stats_json(r.e2e)},
                           {"errors", errors},
                           {"samples", r.samples}});
  }
  std::ofstream f(path);
  f << out.dump(1) << "\n";
  SY_CHECK(f.good(), "cannot write --json ", path);
}

}  // namespace sy::launch
