// The report of `switchyard bench serve`: the statistics of one sweep value's requests, the
// tables printed after a sweep, and its JSON file.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "launch/commands.h"

namespace sy::launch {

struct Stats {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0;
};
// Mean and quantiles of `v` (all 0 when empty).
Stats stats_of(std::vector<double> v);

// The measured results of one sweep value.
struct Run {
  std::string mode;  // "rate" or "concurrency"
  double value = 0;  // requests/s or requests in flight
  int64_t n_completed = 0, n_tokens = 0, n_good = 0, n_cancelled_at_end = 0;
  int64_t n_prompt_tokens = 0, n_cached_tokens = 0, n_preemptions = 0;  // of completed requests
  double duration_s = 0;
  Stats ttft, tpot, e2e, itl;
  std::map<std::string, int64_t> errors;  // status code name -> requests
  nlohmann::json samples = nlohmann::json::array();
};

// The two tables of a sweep (throughput and latencies; errors and goodput).
void print_tables(const std::vector<Run>& runs, const BenchServeArgs& a);
// `header` with a "runs" array of every run, written to `path`.
void write_json(const std::vector<Run>& runs, nlohmann::json header, const std::string& path);

}  // namespace sy::launch
