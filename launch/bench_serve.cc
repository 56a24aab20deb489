// `switchyard bench serve`: a load generator against a running server, measuring what a client
// sees: time to first token, time per output token, inter-token latency, end-to-end latency,
// throughput and goodput under a given load.
//
// The load is open loop (`--rate`: Poisson arrivals at R requests/s, seeded) or closed loop
// (`--concurrency`: C requests always in flight, a new one sent as each ends); a list of values is
// a sweep, run one value after the other. Each value runs `--warmup-s` seconds whose requests are
// not counted, then a measured window of `--duration-s` seconds: a request counts when it was sent
// inside the window and ended before the window closed. Requests still in flight when the window
// closes are cancelled and not counted.
//
// Prompts are random tokens; with `--shared-prefix-len N` every prompt begins with the same N
// tokens (a system prompt, say), so the server's prefix cache can serve them: the tables give the
// share of prompt tokens the server reports as cached.
//
// Requests use gRPC's callback API: every Generate stream is a reactor driven by gRPC's own
// threads, so hundreds of streams need no thread each. With `--endpoint openai` the same requests
// go to the OpenAI-compatible HTTP API as streamed /v1/completions, one connection and one thread
// each. The driver (the calling thread) only sends requests at their arrival times, collects the
// ended ones and prints progress.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>
#include <nlohmann/json.hpp>

#include "launch/bench_serve_report.h"
#include "launch/commands.h"
#include "launch/http_client.h"
#include "launch/rpc.h"
#include "switchyard/v1/switchyard.grpc.pb.h"

namespace sy::launch {
namespace {

namespace v1 = ::switchyard::v1;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// One request as the client saw it. Times are steady-clock instants; `message_times` has one
// entry per streamed message that carried tokens.
struct Sample {
  Clock::time_point sent;
  Clock::time_point last_message;  // the last streamed message (the one with the finish reason)
  Clock::time_point ended;         // the call's status
  std::vector<Clock::time_point> message_times;
  int64_t prompt_tokens = 0;
  int64_t max_tokens = 0;
  int64_t n_tokens = 0;       // tokens received
  int64_t cached_tokens = 0;  // prompt tokens the server found in its prefix cache
  int64_t preemptions = 0;    // times the server preempted (and later recomputed) it
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string message;  // the status message of a failed request
};

class Stream;

// Where streams go once they end; filled by the streams, emptied by the driver.
struct Sink {
  std::mutex mutex;
  std::condition_variable ended_cv;
  std::vector<Stream*> ended;  // guarded by mutex

  void add(Stream* s) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      ended.push_back(s);
    }
    ended_cv.notify_all();
  }
};

// One request in flight, over either API. The driver owns it and deletes it once it appears in
// Sink::ended.
class Stream {
 public:
  virtual ~Stream() = default;
  // Ends the request (thread-safe); it then ends CANCELLED.
  virtual void cancel() = 0;
  // The request as the client saw it; complete once the stream is in Sink::ended.
  Sample& sample() { return sample_; }

 protected:
  Sample sample_;
};

// One Generate stream (gRPC's callback API: no thread of its own).
class GrpcStream final : public Stream, public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  GrpcStream(v1::Switchyard::Stub& stub, Sink& sink, v1::GenerateRequest request, Sample sample)
      : sink_(sink), request_(std::move(request)) {
    sample_ = std::move(sample);
    sample_.sent = Clock::now();
    stub.async()->Generate(&context_, &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void cancel() override { context_.TryCancel(); }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    sample_.last_message = Clock::now();
    if (response_.has_usage()) {
      sample_.cached_tokens = response_.usage().cached_prompt_tokens();
      sample_.preemptions = response_.usage().preemptions();
    }
    if (response_.token_ids_size() > 0) {
      sample_.message_times.push_back(sample_.last_message);
      sample_.n_tokens += response_.token_ids_size();
    }
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    sample_.ended = Clock::now();
    sample_.code = status.error_code();
    sample_.message = status.error_message();
    sink_.add(this);  // `this` may be deleted from here on
  }

 private:
  Sink& sink_;
  grpc::ClientContext context_;
  v1::GenerateRequest request_;
  v1::GenerateResponse response_;
};

// One streamed /v1/completions request (a thread of its own, blocking on its connection). Each
// SSE chunk carries one engine event, like a gRPC message: its token_ids (return_token_ids)
// count the tokens, and the include_usage chunk the cached prompt tokens.
class HttpStream final : public Stream {
 public:
  HttpStream(const std::string& target, Sink& sink, std::string body, Sample sample) {
    sample_ = std::move(sample);
    sample_.sent = Clock::now();
    thread_ = std::thread([this, target, &sink, body = std::move(body)] {
      run(target, body);
      sink.add(this);
    });
  }
  ~HttpStream() override { thread_.join(); }

  void cancel() override { call_.cancel(); }

 private:
  void run(const std::string& target, const std::string& body) {
    std::string error;
    const HttpResult r = call_.post(target, "/v1/completions", body, [&](const std::string& data) {
      if (data == "[DONE]") return;
      const json chunk = json::parse(data, nullptr, false);
      if (chunk.is_discarded()) return;
      sample_.last_message = Clock::now();
      if (chunk.contains("error")) error = chunk["error"].value("message", "error");
      if (chunk.contains("usage") && chunk["usage"].is_object())
        sample_.cached_tokens =
            chunk["usage"]["prompt_tokens_details"].value("cached_tokens", int64_t{0});
      for (const json& c : chunk.value("choices", json::array())) {
        const size_t n = c.value("token_ids", json::array()).size();
        if (n == 0) continue;
        sample_.message_times.push_back(sample_.last_message);
        sample_.n_tokens += static_cast<int64_t>(n);
      }
    });
    sample_.ended = Clock::now();
    if (r.status == 200 && error.empty()) return;
    // The gRPC code of the same failure, so that both endpoints' tables read alike.
    sample_.code = r.status == 0     ? (r.error == "cancelled" ? grpc::StatusCode::CANCELLED
                                                               : grpc::StatusCode::UNAVAILABLE)
                   : r.status == 400 ? grpc::StatusCode::INVALID_ARGUMENT
                   : r.status == 503 || !error.empty() ? grpc::StatusCode::UNAVAILABLE
                                                       : grpc::StatusCode::INTERNAL;
    const json e = json::parse(r.body, nullptr, false);
    sample_.message = !error.empty()                         ? error
                      : e.is_object() && e.contains("error") ? e["error"].value("message", r.body)
                      : r.error.empty()                      ? "HTTP " + std::to_string(r.status)
                                                             : r.error;
  }

  HttpCall call_;
  std::thread thread_;  // last: starts once the rest is built
};

class Lengths {
 public:
  explicit Lengths(const BenchServeArgs& a) {
    if (!a.lengths_file.empty()) {
      std::ifstream f(a.lengths_file);
      SY_CHECK(f.good(), "cannot read --lengths-file ", a.lengths_file);
      std::string line;
      for (int64_t n = 1; std::getline(f, line); ++n) {
        if (line.find_first_not_of(" \t\r") == std::string::npos || line[0] == '#') continue;
        std::istringstream in(line);
        int64_t p = 0, o = 0;
        SY_CHECK(static_cast<bool>(in >> p >> o) && p >= 1 && o >= 1, "--lengths-file ",
                 a.lengths_file, " line ", n, ": want \"prompt_len output_len\", both >= 1, got \"",
                 line, "\"");
        pairs_.push_back({p, o});
      }
      SY_CHECK(!pairs_.empty(), "--lengths-file ", a.lengths_file, " has no lengths");
      return;
    }
    prompt_ = parse_range(a.prompt_len_range, a.prompt_len, "--prompt-len");
    output_ = parse_range(a.output_len_range, a.output_len, "--output-len");
  }

  // The most prompt + output tokens of any request.
  int64_t max_total() const {
    int64_t m = prompt_.second + output_.second;
    for (const auto& [p, o] : pairs_) m = std::max(m, p + o);
    return m;
  }

  // The fewest prompt tokens of any request.
  int64_t min_prompt() const {
    int64_t m = pairs_.empty() ? prompt_.first : INT64_MAX;
    for (const auto& [p, o] : pairs_) m = std::min(m, p);
    return m;
  }

  std::pair<int64_t, int64_t> draw(std::mt19937_64& rng) const {
    if (!pairs_.empty())
      return pairs_[std::uniform_int_distribution<size_t>(0, pairs_.size() - 1)(rng)];
    return {std::uniform_int_distribution<int64_t>(prompt_.first, prompt_.second)(rng),
            std::uniform_int_distribution<int64_t>(output_.first, output_.second)(rng)};
  }

 private:
  // "A:B" -> [A, B]; empty -> [fixed, fixed].
  static std::pair<int64_t, int64_t> parse_range(const std::string& text, int64_t fixed,
                                                 const char* flag) {
    if (text.empty()) {
      SY_CHECK(fixed >= 1, flag, " ", fixed, " must be >= 1");
      return {fixed, fixed};
    }
    const size_t colon = text.find(':');
    int64_t lo = 0, hi = 0;
    try {
      SY_CHECK(colon != std::string::npos, "no colon");
      lo = std::stoll(text.substr(0, colon));
      hi = std::stoll(text.substr(colon + 1));
    } catch (const std::exception&) {
      SY_FAIL(flag, "-range \"", text, "\": want A:B");
    }
    SY_CHECK(lo >= 1 && lo <= hi, flag, "-range \"", text, "\": want 1 <= A <= B");
    return {lo, hi};
  }

  std::pair<int64_t, int64_t> prompt_{0, 0}, output_{0, 0};
  std::vector<std::pair<int64_t, int64_t>> pairs_;
};

// Progress on stderr: rewritten in place on a terminal, else one line every few seconds.
class Progress {
 public:
  Progress() : tty_(isatty(fileno(stderr)) != 0) {}
  // Prints `line` if enough time has passed, or at once when `phase` changed.
  void update(const std::string& phase, const std::string& line) {
    const auto now = Clock::now();
    const auto every = tty_ ? std::chrono::milliseconds(200) : std::chrono::seconds(5);
    if (phase == phase_ && now - last_ < every) return;
    phase_ = phase;
    last_ = now;
    if (tty_)
      std::fprintf(stderr, "\r%-100s", line.c_str());
    else
      std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  }
  void done() {
    if (tty_) std::fprintf(stderr, "\r%-100s\r", "");
    last_ = Clock::time_point();
    phase_.clear();
  }

 private:
  bool tty_;
  Clock::time_point last_;
  std::string phase_;
};

class Driver {
 public:
  // `stubs`: one per channel (at least one), requests round-robin over them.
  Driver(const BenchServeArgs& a, const std::vector<std::unique_ptr<v1::Switchyard::Stub>>& stubs,
         int64_t vocab_size, std::string model_name)
      : a_(a),
        stubs_(stubs),
        vocab_size_(vocab_size),
        model_name_(std::move(model_name)),
        lengths_(a) {
    // The shared prefix: drawn once, from a stream of its own (the same for every sweep value).
    std::mt19937_64 rng(a.seed ^ 0x5eedf00dull);
    std::uniform_int_distribution<int64_t> token(0, vocab_size_ - 1);
    for (int64_t i = 0; i < a.shared_prefix_len; ++i)
      prefix_.push_back(static_cast<uint32_t>(token(rng)));
  }

  Run run(const std::string& mode, double value, uint64_t seed) {
    std::mt19937_64 rng(seed);
    Run run;
    run.mode = mode;
    run.value = value;
    run.duration_s = a_.duration_s;
    const bool open_loop = mode == "rate";
    const auto t0 = Clock::now();
    const auto window_begin = t0 + to_duration(a_.warmup_s);
    const auto window_end = window_begin + to_duration(a_.duration_s);
    std::exponential_distribution<double> gap(open_loop ? value : 1.0);
    auto next_arrival = t0;
    int64_t in_flight = 0, n_sent = 0;
    std::vector<Sample> counted;
    if (!open_loop)
      for (int64_t i = 0; i < static_cast<int64_t>(value); ++i, ++in_flight, ++n_sent) send(rng);

    while (Clock::now() < window_end) {
      if (open_loop) {
        while (next_arrival <= Clock::now()) {
          send(rng);
          ++in_flight;
          ++n_sent;
          next_arrival += to_duration(gap(rng));
        }
      }
      const auto wake = std::min({open_loop ? next_arrival : window_end, window_end,
                                  Clock::now() + std::chrono::milliseconds(100)});
      for (Sample& s : reap(wake)) {
        --in_flight;
        if (s.sent >= window_begin && s.ended <= window_end) counted.push_back(std::move(s));
        if (!open_loop && Clock::now() < window_end) {
          send(rng);
          ++in_flight;
          ++n_sent;
        }
      }
      const auto now = Clock::now();
      const char* phase = now < window_begin ? "warm-up" : "measuring";
      char line[160];
      std::snprintf(line, sizeof(line),
                    "# %s %g: %s %.0f/%.0f s, sent %lld, in flight %lld, counted %zu", mode.c_str(),
                    value, now < window_begin ? "warm-up" : "measuring",
                    std::chrono::duration<double>(now - t0).count(), a_.warmup_s + a_.duration_s,
                    (long long)n_sent, (long long)in_flight, counted.size());
      progress_.update(phase, line);
    }
    progress_.done();

    // Cancel what is left, wait for every stream to end, and count none of them.
    run.n_cancelled_at_end = static_cast<int64_t>(live_.size());
    for (auto& [stream, owned] : live_) stream->cancel();
    while (!live_.empty())
      for (Sample& s : reap(Clock::now() + std::chrono::milliseconds(100)))
        if (s.sent >= window_begin && s.ended <= window_end) counted.push_back(std::move(s));
    summarise(run, counted, window_begin);
    return run;
  }

 private:
  static Clock::duration to_duration(double seconds) {
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  }

  // Waits until a stream ends or `until`; deletes the ended streams and returns their samples.
  std::vector<Sample> reap(Clock::time_point until) {
    std::vector<Stream*> ended;
    {
      std::unique_lock<std::mutex> lock(sink_.mutex);
      sink_.ended_cv.wait_until(lock, until, [&] { return !sink_.ended.empty(); });
      ended.swap(sink_.ended);
    }
    std::vector<Sample> samples;
    for (Stream* s : ended) {
      samples.push_back(std::move(s->sample()));
      live_.erase(s);  // deletes it: gRPC is done with it
    }
    return samples;
  }

  void send(std::mt19937_64& rng) {
    const auto [prompt_len, output_len] = lengths_.draw(rng);
    v1::GenerateRequest request;
    std::uniform_int_distribution<int64_t> token(0, vocab_size_ - 1);
    for (int64_t i = 0; i < prompt_len; ++i)
      request.mutable_token_ids()->add_ids(i < static_cast<int64_t>(prefix_.size())
                                               ? prefix_[static_cast<size_t>(i)]
                                               : static_cast<uint32_t>(token(rng)));
    request.set_max_tokens(static_cast<uint32_t>(output_len));
    request.set_temperature(0);  // greedy
    request.set_ignore_eos(true);
    Sample sample;
    sample.prompt_tokens = prompt_len;
    sample.max_tokens = output_len;
    std::unique_ptr<Stream> stream;
    if (a_.endpoint == "openai") {
      stream =
          std::make_unique<HttpStream>(a_.target, sink_, openai_body(request), std::move(sample));
    } else {
      v1::Switchyard::Stub& stub = *stubs_[next_stub_++ % stubs_.size()];
      stream = std::make_unique<GrpcStream>(stub, sink_, std::move(request), std::move(sample));
    }
    Stream* key = stream.get();
    live_.emplace(key, std::move(stream));
  }

  // The same request as a streamed /v1/completions body.
  std::string openai_body(const v1::GenerateRequest& r) const {
    return json{
        {"model", model_name_},
        {"prompt", std::vector<uint32_t>(r.token_ids().ids().begin(), r.token_ids().ids().end())},
        {"max_tokens", r.max_tokens()},
        {"temperature", 0},
        {"ignore_eos", true},
        {"stream", true},
        {"stream_options", {{"include_usage", true}}},
        {"return_token_ids", true}}
        .dump();
  }

  void summarise(Run& run, const std::vector<Sample>& counted, Clock::time_point window_begin) {
    std::vector<double> ttft, tpot, e2e, itl;
    for (const Sample& s : counted) {
      json j = {{"arrival_s", ms_between(window_begin, s.sent) / 1e3},
                {"status", status_code_name(s.code)},
                {"prompt_tokens", s.prompt_tokens},
                {"max_tokens", s.max_tokens},
                {"tokens", s.n_tokens},
                {"e2e_ms", ms_between(s.sent, s.ended)}};  // for errors: until the status
      if (s.code != grpc::StatusCode::OK) {
        ++run.errors[status_code_name(s.code)];
        j["message"] = s.message;
        run.samples.push_back(j);
        continue;
      }
      ++run.n_completed;
      run.n_tokens += s.n_tokens;
      run.n_prompt_tokens += s.prompt_tokens;
      run.n_cached_tokens += s.cached_tokens;
      run.n_preemptions += s.preemptions;
      j["cached_tokens"] = s.cached_tokens;
      j["preemptions"] = s.preemptions;
      const double e2e_ms = ms_between(s.sent, s.last_message);
      j["e2e_ms"] = e2e_ms;
      const double ttft_ms =
          s.message_times.empty() ? e2e_ms : ms_between(s.sent, s.message_times[0]);
      json itl_ms = json::array();
      for (size_t i = 1; i < s.message_times.size(); ++i) {
        const double gap = ms_between(s.message_times[i - 1], s.message_times[i]);
        itl.push_back(gap);
        itl_ms.push_back(gap);
      }
      ttft.push_back(ttft_ms);
      e2e.push_back(e2e_ms);
      // A request of one token has no time per output token.
      double tpot_ms = 0;
      if (s.n_tokens > 1) {
        tpot_ms = (e2e_ms - ttft_ms) / static_cast<double>(s.n_tokens - 1);
        tpot.push_back(tpot_ms);
        j["tpot_ms"] = tpot_ms;
      }
      const bool good = (a_.slo_ttft_ms <= 0 || ttft_ms <= a_.slo_ttft_ms) &&
                        (a_.slo_tpot_ms <= 0 || tpot_ms <= a_.slo_tpot_ms);
      run.n_good += good ? 1 : 0;
      j["ttft_ms"] = ttft_ms;
      j["itl_ms"] = itl_ms;
      j["meets_slo"] = good;
      run.samples.push_back(j);
    }
    run.ttft = stats_of(ttft);
    run.tpot = stats_of(tpot);
    run.e2e = stats_of(e2e);
    run.itl = stats_of(itl);
  }

  const BenchServeArgs& a_;
  const std::vector<std::unique_ptr<v1::Switchyard::Stub>>& stubs_;
  size_t next_stub_ = 0;
  int64_t vocab_size_;
  std::string model_name_;  // the HTTP API's model id
  Lengths lengths_;
  std::vector<uint32_t> prefix_;  // --shared-prefix-len tokens
  Sink sink_;
  std::map<Stream*, std::unique_ptr<Stream>> live_;  // sent and not yet reaped
  Progress progress_;
};

// The channels of the run. Channels with the same arguments share one connection (gRPC's
// global subchannel pool): a local pool per channel gives each its own.
std::vector<std::unique_ptr<v1::Switchyard::Stub>> connect(const BenchServeArgs& a) {
  std::vector<std::unique_ptr<v1::Switchyard::Stub>> stubs;
  for (int64_t i = 0; i < a.channels; ++i) {
    grpc::ChannelArguments args;
    if (a.channels > 1) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    stubs.push_back(v1::Switchyard::NewStub(
        grpc::CreateCustomChannel(a.target, grpc::InsecureChannelCredentials(), args)));
  }
  return stubs;
}

v1::ModelInfo model_info(v1::Switchyard::Stub& stub, const std::string& target) {
  v1::ModelInfo info;
  grpc::ClientContext context;
  set_timeout(context, 30);
  context.set_wait_for_ready(true);
  const grpc::Status status = stub.GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
  SY_CHECK(status.ok(), "bench serve: GetModelInfo on ", target, ": ",
           status_code_name(status.error_code()), ": ", status.error_message());
  return info;
}

// The model as GET /v1/models describes it: its id (in model_path), context and vocabulary.
v1::ModelInfo http_model_info(const std::string& target) {
  HttpCall call;
  const HttpResult r = call.get(target, "/v1/models");
  SY_CHECK(r.status == 200, "bench serve: GET http://", target, "/v1/models: ",
           r.status == 0 ? r.error : "HTTP " + std::to_string(r.status) + " " + r.body);
  const json j = json::parse(r.body, nullptr, false);
  SY_CHECK(!j.is_discarded() && j.contains("data") && j["data"].is_array() && !j["data"].empty(),
           "bench serve: /v1/models of ", target, " lists no model");
  const json& m = j["data"][0];
  v1::ModelInfo info;
  info.set_model_path(m.value("id", ""));
  info.set_context_limit_tokens(m.value("max_model_len", uint32_t{0}));
  info.set_vocab_size(m.value("vocab_size", uint32_t{0}));
  info.set_device("openai http");
  SY_CHECK(info.vocab_size() > 0, "bench serve: /v1/models of ", target,
           " gives no vocab_size (a switchyard server's does)");
  return info;
}

void print_header(const BenchServeArgs& a, const v1::ModelInfo& info) {
  const bool open_loop = !a.rate.empty();
  std::printf("# switchyard bench serve: %s, %s (world %u, tp %u, ep %u, %s)\n", a.target.c_str(),
              info.model_path().c_str(), info.world_size(), info.tp(), info.ep(),
              info.device().c_str());
  std::string lengths =
      !a.lengths_file.empty()
          ? "from " + a.lengths_file
          : "prompt " +
                (a.prompt_len_range.empty() ? std::to_string(a.prompt_len) : a.prompt_len_range) +
                ", output " +
                (a.output_len_range.empty() ? std::to_string(a.output_len) : a.output_len_range);
  if (a.shared_prefix_len > 0)
    lengths += " tokens, every prompt's first " + std::to_string(a.shared_prefix_len) + " shared";
  else
    lengths += " tokens";
  std::printf(
      "# %s, lengths %s, greedy, ignore_eos; warm-up %g s, measured %g s, seed %llu, "
      "%lld channel%s\n",
      open_loop ? "open loop (Poisson arrivals)" : "closed loop", lengths.c_str(), a.warmup_s,
      a.duration_s, (unsigned long long)a.seed, (long long)a.channels, a.channels > 1 ? "s" : "");
}

}  // namespace

void add_bench_serve(CLI::App& bench, BenchServeArgs& a) {
  CLI::App* cmd =
      bench.add_subcommand("serve", "Load generator: latency and throughput of a running server");
  cmd->add_option("--target", a.target, "host:port of the server")->capture_default_str();
  cmd->add_option("--endpoint", a.endpoint,
                  "grpc, or openai: streamed /v1/completions over HTTP at --target (its "
                  "--http-listen), one connection per request")
      ->capture_default_str();
  auto* rate =
      cmd->add_option("--rate", a.rate, "Requests/s, Poisson arrivals, e.g. 1,2,4")->delimiter(',');
  auto* conc = cmd->add_option("--concurrency", a.concurrency,
                               "Requests in flight (closed loop), e.g. 1,4,16")
                   ->delimiter(',');
  rate->excludes(conc);
  conc->excludes(rate);
  auto* plen =
      cmd->add_option("--prompt-len", a.prompt_len, "Prompt tokens")->capture_default_str();
  auto* olen =
      cmd->add_option("--output-len", a.output_len, "Generated tokens")->capture_default_str();
  auto* prange =
      cmd->add_option("--prompt-len-range", a.prompt_len_range, "Prompt tokens uniform in A:B");
  auto* orange =
      cmd->add_option("--output-len-range", a.output_len_range, "Generated tokens uniform in A:B");
  auto* file = cmd->add_option("--lengths-file", a.lengths_file,
                               "Lines \"prompt_len output_len\", drawn uniformly");
  prange->excludes(plen);
  orange->excludes(olen);
  for (auto* o : {plen, olen, prange, orange}) file->excludes(o);
  cmd->add_option("--warmup-s", a.warmup_s, "Seconds per sweep value whose requests do not count")
      ->capture_default_str();
  cmd->add_option("--duration-s", a.duration_s, "Measured seconds per sweep value")
      ->capture_default_str();
  cmd->add_option("--slo-ttft-ms", a.slo_ttft_ms, "Goodput: time to first token at most (0 = any)")
      ->capture_default_str();
  cmd->add_option("--slo-tpot-ms", a.slo_tpot_ms,
                  "Goodput: time per output token at most (0 = any)")
      ->capture_default_str();
  cmd->add_option("--seed", a.seed, "Arrivals, lengths and prompt tokens")->capture_default_str();
  cmd->add_option("--channels", a.channels,
                  "gRPC connections to the server; requests go round-robin over them")
      ->capture_default_str();
  cmd->add_option("--shared-prefix-len", a.shared_prefix_len,
                  "Leading prompt tokens every request has in common (a system prompt)")
      ->capture_default_str();
  cmd->add_option("--json", a.json, "Write every sample as JSON to this file");
}

int run_bench_serve(const BenchServeArgs& a) {
  SY_CHECK(a.rate.empty() != a.concurrency.empty(), "bench serve: give --rate or --concurrency");
  for (double r : a.rate) SY_CHECK(r > 0 && std::isfinite(r), "--rate ", r, " must be > 0");
  for (int64_t c : a.concurrency) SY_CHECK(c >= 1, "--concurrency ", c, " must be >= 1");
  SY_CHECK(a.duration_s > 0, "--duration-s ", a.duration_s, " must be > 0");
  SY_CHECK(a.warmup_s >= 0, "--warmup-s ", a.warmup_s, " must be >= 0");
  SY_CHECK(a.channels >= 1 && a.channels <= 256, "--channels ", a.channels, " must be in [1, 256]");
  SY_CHECK(a.shared_prefix_len >= 0, "--shared-prefix-len ", a.shared_prefix_len, " must be >= 0");
  if (a.shared_prefix_len > 0) {
    const int64_t shortest = Lengths(a).min_prompt();
    SY_CHECK(a.shared_prefix_len <= shortest, "--shared-prefix-len ", a.shared_prefix_len,
             " is longer than the shortest prompt (", shortest, " tokens)");
  }

  SY_CHECK(a.endpoint == "grpc" || a.endpoint == "openai", "--endpoint '", a.endpoint,
           "' must be grpc or openai");
  const bool http = a.endpoint == "openai";
  std::vector<std::unique_ptr<v1::Switchyard::Stub>> stubs;
  if (!http) stubs = connect(a);
  const v1::ModelInfo info =
      http ? http_model_info(a.target) : model_info(*stubs.front(), a.target);
  Driver driver(a, stubs, info.vocab_size(), info.model_path());
  const int64_t max_total = Lengths(a).max_total();
  SY_CHECK(max_total <= info.context_limit_tokens(), "bench serve: prompt + output of ", max_total,
           " tokens exceeds the server's context limit of ", info.context_limit_tokens());

  const bool open_loop = !a.rate.empty();
  print_header(a, info);
  std::fflush(stdout);  // the header before the progress lines on stderr

  std::vector<Run> runs;
  std::vector<double> values;
  if (open_loop)
    values = a.rate;
  else
    for (int64_t c : a.concurrency) values.push_back(static_cast<double>(c));
  for (size_t i = 0; i < values.size(); ++i)
    runs.push_back(driver.run(open_loop ? "rate" : "concurrency", values[i], a.seed + i));
  print_tables(runs, a);

  if (!a.json.empty()) {
    const json header = {{"benchmark", "serve"},
                         {"target", a.target},
                         {"endpoint", a.endpoint},
                         {"model", info.model_path()},
                         {"world", info.world_size()},
                         {"device", info.device()},
                         {"mode", open_loop ? "rate" : "concurrency"},
                         {"warmup_s", a.warmup_s},
                         {"duration_s", a.duration_s},
                         {"slo_ttft_ms", a.slo_ttft_ms},
                         {"slo_tpot_ms", a.slo_tpot_ms},
                         {"seed", a.seed},
                         {"channels", a.channels},
                         {"shared_prefix_len", a.shared_prefix_len}};
    write_json(runs, header, a.json);
  }
  return 0;
}

}  // namespace sy::launch
