// `switchyard bench engine`: drives the ranks directly (no gRPC) over a sweep of batch sizes,
// prompt and output lengths, on a checkpoint or on seeded synthetic weights at real shapes.
//
// Every rank builds the same step batches from the same seed, so no plan is broadcast: the
// ranks run prefill and decode steps in lockstep, timed as served (no profile: decode steps run
// as graphs where they can), then once more with a ForwardProfile attached. Rank 0 gathers the
// profiles and prints tables: throughput, the decode step split into phases (slowest rank and
// mean), bytes per collective, expert load per layer, and a roofline line (bytes of weights and
// KV read per decode step against memory bandwidth; FLOPs against peak).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <cblas.h>
#include <nlohmann/json.hpp>

#include "kernels/cpu/threads.h"
#include "launch/commands.h"
#include "parallel/context.h"
#include "parallel/mpi_env.h"
#include "runtime/engine/sampling.h"
#include "runtime/formats/safetensors.h"
#include "runtime/model/loader.h"
#include "runtime/model/model.h"

namespace sy::launch {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Sustained memory bandwidth of this rank (bytes/s): a triad a = b + s*c over 3 x 256 MiB (far
// larger than any cache), split over the rank's threads (kernels/cpu/threads.h), counted as
// STREAM counts it (two reads and one write per element).
double measure_bandwidth() {
  const int64_t n = (256ll << 20) / static_cast<int64_t>(sizeof(float));
  std::vector<float> a(static_cast<size_t>(n)), b(static_cast<size_t>(n)),
      c(static_cast<size_t>(n));
  // First touch on the threads that later stream each part.
  cpu::parallel_for(n, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) a[i] = 1.f, b[i] = 2.f, c[i] = 3.f;
  });
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t = Clock::now();
    cpu::parallel_for(n, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) a[i] = b[i] + 0.5f * c[i];
    });
    best = std::max(best, 3.0 * static_cast<double>(n) * sizeof(float) / seconds_since(t));
  }
  volatile float sink = a[static_cast<size_t>(n / 2)];
  (void)sink;
  return best;
}

// Sustained fp32 GEMM rate of this rank (FLOP/s) through the BLAS the CPU backend uses.
double measure_flops() {
  const int n = 1024;
  std::vector<float> a(size_t(n) * n, 0.5f), b(size_t(n) * n, 0.25f), c(size_t(n) * n);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.f, a.data(), n, b.data(), n,
                0.f, c.data(), n);
    best = std::max(best, 2.0 * n * n * n / seconds_since(t));
  }
  return best;
}

// The same two figures on a device backend, through its own ops: an F32 add over 3 x 256 MiB
// (two reads, one write) and a 4096^3 GEMM in the storage dtype.
double measure_device_bandwidth(Ops& ops) {
  const int64_t n = (256ll << 20) / 4;
  DeviceBuffer a(ops, n * 4), b(ops, n * 4), c(ops, n * 4);
  const Device d = ops.device();
  Tensor ta(a.get(), DType::kF32, {n}, d), tb(b.get(), DType::kF32, {n}, d),
      tc(c.get(), DType::kF32, {n}, d);
  ops.fill_zero(tb);
  ops.fill_zero(tc);
  double best = 0;
  for (int rep = 0; rep < 6; ++rep) {
    ops.synchronize();
    const auto t = Clock::now();
    ops.add(ta, tb, tc);
    ops.synchronize();
    if (rep > 0) best = std::max(best, 3.0 * n * 4 / seconds_since(t));
  }
  return best;
}

double measure_device_flops(Ops& ops) {
  const int64_t n = 4096;
  const DType S = ops.storage_dtype();
  const Device d = ops.device();
  DeviceBuffer x(ops, n * n * dtype_size(S)), w(ops, n * n * dtype_size(S)), o(ops, n * n * 4);
  Tensor tx(x.get(), S, {n, n}, d), tw(w.get(), S, {n, n}, d), to(o.get(), DType::kF32, {n, n}, d);
  ops.fill_zero(tx);
  ops.fill_zero(tw);
  double best = 0;
  for (int rep = 0; rep < 6; ++rep) {
    ops.synchronize();
    const auto t = Clock::now();
    ops.matmul(to, tx, tw);
    ops.synchronize();
    if (rep > 0) best = std::max(best, 2.0 * n * n * n / seconds_since(t));
  }
  return best;
}

// Gathers one double per rank (as two floats would lose precision: sent as int32 pairs).
std::vector<double> gather_all(Communicator* world, const std::vector<double>& mine) {
  if (world == nullptr) return mine;
  const int W = world->size();
  const int64_t n = static_cast<int64_t>(mine.size());
  std::vector<double> all(static_cast<size_t>(W * n));
  world->all_gather(Tensor(all.data(), DType::kI32, {W, 2 * n}),
                    Tensor(const_cast<double*>(mine.data()), DType::kI32, {1, 2 * n}),
                    std::vector<int64_t>(static_cast<size_t>(W), 1));
  return all;
}

struct Case {
  int64_t batch, prompt, output;
};

// One step batch of sequences [0, batch) with the tokens [begin_s, end_s) of each.
void build_step(StepBatch& b, const std::vector<std::vector<int32_t>>& tokens,
                const std::vector<std::pair<int64_t, int64_t>>& ranges, const ModelLimits& limits,
                int64_t blocks_per_seq, bool want_logits_at_end, int64_t seq_len) {
  b.clear();
  std::vector<int32_t> blocks(static_cast<size_t>(blocks_per_seq));
  for (size_t s = 0; s < ranges.size(); ++s) {
    const auto [begin, end] = ranges[s];
    if (begin == end) continue;
    for (int64_t i = 0; i < blocks_per_seq; ++i)
      blocks[static_cast<size_t>(i)] = static_cast<int32_t>(s * blocks_per_seq + i);
    b.add_sequence(tokens[s].data(), begin, end, blocks.data(), blocks_per_seq,
                   limits.max_blocks_per_seq, want_logits_at_end && end == seq_len);
  }
}

}  // namespace

void add_bench_engine(CLI::App& bench, BenchEngineArgs& a) {
  CLI::App* cmd = bench.add_subcommand("engine", "Prefill and decode throughput of the ranks");
  auto* model = cmd->add_option("--model", a.model, "Checkpoint directory or GGUF file");
  auto* synth =
      cmd->add_option("--synthetic", a.synthetic,
                      "Seeded random weights: mixtral-8x7b, mixtral-8x22b or a config.json");
  model->excludes(synth);
  synth->excludes(model);
  cmd->add_option("--layers", a.layers, "Decoder layers to run (0 = all)")->capture_default_str();
  cmd->add_option("--batch", a.batch, "Sequences per step, e.g. 1,8,64")->delimiter(',');
  cmd->add_option("--prompt-len", a.prompt_len, "Prompt tokens per sequence")->delimiter(',');
  cmd->add_option("--output-len", a.output_len, "Decode steps")->delimiter(',');
  add_layout_flags(cmd, a.tp, a.ep, a.moe_exchange);
  add_device_flags(cmd, a.backend);
  cmd->add_option("--max-batch-tokens", a.max_batch_tokens, "Prefill tokens per step")
      ->capture_default_str();
  cmd->add_option("--seed", a.seed, "Weights and token seed")->capture_default_str();
  cmd->add_option("--mem-bandwidth-gbs", a.mem_bandwidth_gbs,
                  "Memory bandwidth of the whole job in GB/s for the roofline (0 = measure)")
      ->capture_default_str();
  cmd->add_option("--peak-gflops", a.peak_gflops,
                  "GEMM rate of the whole job in GFLOP/s for %flops (0 = measure)")
      ->capture_default_str();
  cmd->add_option("--json", a.json, "Write every sample as JSON to this file");
}

namespace {

void check_args(const BenchEngineArgs& a) {
  SY_CHECK(!a.model.empty() || !a.synthetic.empty(), "bench engine: give --model or --synthetic");
  SY_CHECK(!a.batch.empty() && !a.prompt_len.empty() && !a.output_len.empty(),
           "bench engine: empty sweep");
  for (int64_t v : a.batch) SY_CHECK(v >= 1, "--batch ", v, " must be >= 1");
  for (int64_t v : a.prompt_len) SY_CHECK(v >= 1, "--prompt-len ", v, " must be >= 1");
  for (int64_t v : a.output_len) SY_CHECK(v >= 1, "--output-len ", v, " must be >= 1");
  SY_CHECK(a.mem_bandwidth_gbs >= 0, "--mem-bandwidth-gbs ", a.mem_bandwidth_gbs,
           " must be >= 0 (0 = measure)");
  SY_CHECK(a.peak_gflops >= 0, "--peak-gflops ", a.peak_gflops, " must be >= 0 (0 = measure)");
  a.backend.validate();
}

// One case's timings as served (the profiled run's figures are in the gathered profiles).
struct CaseTimes {
  double prefill_s = 0;
  double decode_s = 0;
  int64_t decode_graph_steps = 0;
};

// The ranks of one `bench engine` run: the model, the machine's figures and the samples.
class EngineBench {
 public:
  explicit EngineBench(const BenchEngineArgs& a) : a_(a), rng_(a.seed) {
    if (launched_by_mpi()) {
      env_ = std::make_unique<MpiEnv>(nullptr, nullptr);
      world_ = make_mpi_world_communicator();
    }
    W_ = world_ ? world_->size() : 1;
    root_ = !world_ || world_->rank() == 0;
    build_model();
    measure_machine();
  }
  void run();

 private:
  void build_model();
  void measure_machine();  // every rank at the same time, summed (the job's aggregate)
  void print_header() const;
  void barrier() {
    if (world_) world_->barrier();
  }
  // Each step ends as the engine's does: rank 0 samples (greedily here) through the engine's
  // sampler, on the device on GPUs, where only the ids come back. The other ranks only join the
  // collectives.
  void forward(const StepBatch& b);
  void make_tokens(const Case& c);
  void run_prefill(const Case& c, int64_t len);  // chunks of at most max_tokens, in order
  void run_decode(const Case& c, int64_t from, int64_t steps);
  CaseTimes time_case(const Case& c);
  json case_sample(const Case& c, const CaseTimes& t);
  // The profiles' columns gathered from every rank into profile_all_; col(i) over the ranks.
  void gather_profiles();
  double col(size_t i, bool take_max) const;
  void add_profile_json(json& sample, double steps) const;
  void print_summary() const;

  const BenchEngineArgs& a_;
  std::mt19937_64 rng_;  // the cases' tokens
  std::unique_ptr<MpiEnv> env_;
  std::unique_ptr<Communicator> world_;
  int W_ = 1;
  bool root_ = true;
  ModelConfig config_;
  int64_t all_layers_ = 0;
  ParallelConfig pc_;
  Backend backend_;
  std::unique_ptr<ParallelContext> par_;
  ModelLimits limits_;
  double load_s_ = 0;
  uint64_t weight_bytes_ = 0;
  std::unique_ptr<Model> model_;
  std::unique_ptr<StepSampler> sampler_;
  std::vector<SampleRequest> greedy_;
  std::vector<int32_t> sampled_;
  double bw_ = 0, peak_flops_ = 0;
  std::vector<std::vector<int32_t>> tokens_;
  StepBatch batch_;
  ForwardProfile prefill_profile_, decode_profile_;
  std::vector<double> profile_all_;
  size_t profile_cols_ = 0;
  json out_;
};

void EngineBench::build_model() {
  config_ = a_.synthetic.empty() ? ModelConfig::load(a_.model) : ModelConfig::preset(a_.synthetic);
  all_layers_ = config_.num_hidden_layers;
  if (a_.layers > 0) {
    SY_CHECK(a_.layers <= all_layers_, "--layers ", a_.layers, " exceeds the model's ",
             all_layers_);
    config_.num_hidden_layers = a_.layers;
  }
  pc_.world = W_;
  pc_.rank = world_ ? world_->rank() : 0;
  pc_.tp = a_.tp;
  pc_.ep = a_.ep;
  pc_.exchange = parse_moe_exchange(a_.moe_exchange);
  pc_.validate(config_.layout_shape());
  backend_ = make_backend(a_.backend, world_.get(), env_ ? env_->local_rank() : 0);
  if (world_) par_ = ParallelContext::create(pc_, backend_.world ? *backend_.world : *world_);

  const int64_t max_b = *std::max_element(a_.batch.begin(), a_.batch.end());
  const int64_t max_len = *std::max_element(a_.prompt_len.begin(), a_.prompt_len.end()) +
                          *std::max_element(a_.output_len.begin(), a_.output_len.end());
  SY_CHECK(max_len <= config_.max_position_embeddings, "prompt + output of ", max_len,
           " tokens exceeds the context of ", config_.max_position_embeddings);
  limits_.block_size = 16;
  limits_.max_blocks_per_seq = (max_len + limits_.block_size - 1) / limits_.block_size;
  limits_.n_blocks = limits_.max_blocks_per_seq * max_b;
  limits_.max_seqs = max_b;
  limits_.max_tokens = std::max(a_.max_batch_tokens, max_b);
  limits_.max_logit_rows = max_b;

  Ops& ops = *backend_.ops;
  const WeightShard shard = shard_for(config_, par_.get());
  const auto t_load = Clock::now();
  Weights weights;
  if (a_.synthetic.empty()) {
    auto ckpt = open_weight_source(a_.model);
    weights = Weights::load(*ckpt, config_, shard, ops, root_, a_.backend.weight_format());
  } else {
    weights = Weights::synthetic(config_, shard, ops, a_.seed);
  }
  load_s_ = seconds_since(t_load);
  weight_bytes_ = weights.total_bytes;
  model_ = std::make_unique<Model>(config_, std::move(weights), ops, limits_, par_.get());
  sampler_ = std::make_unique<StepSampler>(*model_);
  sampled_.resize(static_cast<size_t>(max_b));
}

void EngineBench::measure_machine() {
  barrier();
  Ops& ops = *backend_.ops;
  const bool on_cpu = ops.device() == Device::kCpu;
  // A figure given on the command line is not measured (every rank sees the same flags).
  bw_ = a_.mem_bandwidth_gbs * 1e9;
  peak_flops_ = a_.peak_gflops * 1e9;
  if (bw_ <= 0) {
    const double bw_rank = on_cpu ? measure_bandwidth() : measure_device_bandwidth(ops);
    for (double v : gather_all(world_.get(), {bw_rank})) bw_ += v;
  }
  if (peak_flops_ <= 0) {
    const double flops_rank = on_cpu ? measure_flops() : measure_device_flops(ops);
    for (double v : gather_all(world_.get(), {flops_rank})) peak_flops_ += v;
  }
}

void EngineBench::print_header() const {
  const DType S = backend_.ops->storage_dtype();
  std::printf("# bench engine: %s%s, %lld of %lld layers, world %d, tp %d, ep %d, %s, %s %s\n",
              a_.synthetic.empty() ? a_.model.c_str() : a_.synthetic.c_str(),
              a_.synthetic.empty() ? "" : " (synthetic)", (long long)config_.num_hidden_layers,
              (long long)all_layers_, W_, pc_.tp, pc_.ep_size(), moe_exchange_name(pc_.exchange),
              backend_.description.c_str(), dtype_name(S));
  std::printf(
      "# weights %.2f GiB on rank 0, made in %.1f s; memory %.1f GB/s (%s), %s GEMM %.1f "
      "GFLOP/s (%s; all ranks)\n",
      weight_bytes_ / double(1 << 30), load_s_, bw_ / 1e9,
      a_.mem_bandwidth_gbs > 0 ? "given" : "measured", dtype_name(S), peak_flops_ / 1e9,
      a_.peak_gflops > 0 ? "given" : "measured");
  std::printf("#\n# %6s %7s %7s %14s %13s %12s %10s %11s %9s %9s %7s\n", "batch", "prompt",
              "output", "prefill_tok/s", "decode_tok/s", "step_ms", "MB/step", "GB/s", "%bw",
              "%flops", "graphs");
}

void EngineBench::forward(const StepBatch& b) {
  model_->forward(b);
  if (!root_) return;
  greedy_.assign(b.logit_rows.size(), SampleRequest{});
  sampler_->sample(*model_, greedy_, sampled_.data());
}

void EngineBench::make_tokens(const Case& c) {
  tokens_.assign(static_cast<size_t>(c.batch), {});
  for (auto& t : tokens_) {
    t.resize(static_cast<size_t>(c.prompt + c.output));
    for (auto& id : t)
      id = static_cast<int32_t>(rng_() % static_cast<uint64_t>(config_.vocab_size));
    t[0] = static_cast<int32_t>(std::max<int64_t>(config_.bos_token_id, 0));
  }
}

int64_t blocks_per_seq(const Case& c, const ModelLimits& limits) {
  return (c.prompt + c.output + limits.block_size - 1) / limits.block_size;
}

void EngineBench::run_prefill(const Case& c, int64_t len) {
  // Chunks of at most max_tokens, filled sequence by sequence.
  std::vector<int64_t> done(static_cast<size_t>(c.batch), 0);
  size_t s = 0;
  while (s < done.size()) {
    std::vector<std::pair<int64_t, int64_t>> ranges(done.size(), {0, 0});
    int64_t budget = limits_.max_tokens;
    for (size_t i = s; i < done.size() && budget > 0; ++i) {
      const int64_t take = std::min(len - done[i], budget);
      ranges[i] = {done[i], done[i] + take};
      done[i] += take;
      budget -= take;
    }
    build_step(batch_, tokens_, ranges, limits_, blocks_per_seq(c, limits_), true, len);
    forward(batch_);
    while (s < done.size() && done[s] == len) ++s;
  }
}

void EngineBench::run_decode(const Case& c, int64_t from, int64_t steps) {
  for (int64_t i = 0; i < steps; ++i) {
    std::vector<std::pair<int64_t, int64_t>> ranges(tokens_.size(), {from + i, from + i + 1});
    build_step(batch_, tokens_, ranges, limits_, blocks_per_seq(c, limits_), true, from + i + 1);
    forward(batch_);
  }
}

CaseTimes EngineBench::time_case(const Case& c) {
  make_tokens(c);
  // Warm-up (untimed): a short prefill, then two decode steps of the timed steps' shape, so
  // that a backend with graphs has recorded it (the timed prefill rewrites those positions).
  const int64_t warm = std::min<int64_t>(c.prompt, 4);
  run_prefill(c, warm);
  run_decode(c, warm, std::min<int64_t>(c.output, 2));
  barrier();
  // Timed as served: no profile, so nothing waits between phases and decode steps run as
  // graphs where the backend and layout allow.
  CaseTimes t;
  auto t0 = Clock::now();
  run_prefill(c, c.prompt);
  barrier();
  t.prefill_s = seconds_since(t0);
  const int64_t graphs_before = model_->graph_steps();
  t0 = Clock::now();
  run_decode(c, c.prompt, c.output);
  barrier();
  t.decode_s = seconds_since(t0);
  t.decode_graph_steps = model_->graph_steps() - graphs_before;
  // The same steps again with a profile, for the phase split, traffic and expert load (they
  // rewrite the KV cache with the same values).
  model_->set_profile(&prefill_profile_);
  prefill_profile_.reset();
  run_prefill(c, c.prompt);
  model_->set_profile(&decode_profile_);
  decode_profile_.reset();
  run_decode(c, c.prompt, c.output);
  barrier();
  model_->set_profile(nullptr);
  gather_profiles();
  return t;
}

// Phases per rank -> slowest and mean; bytes and expert tokens summed over ranks.
void EngineBench::gather_profiles() {
  std::vector<double> mine;
  for (double v : decode_profile_.seconds) mine.push_back(v);
  for (double v : prefill_profile_.seconds) mine.push_back(v);
  for (uint64_t v : decode_profile_.bytes) mine.push_back(static_cast<double>(v));
  for (int64_t v : decode_profile_.expert_tokens) mine.push_back(static_cast<double>(v));
  for (int64_t v : prefill_profile_.expert_tokens) mine.push_back(static_cast<double>(v));
  profile_all_ = gather_all(world_.get(), mine);
  profile_cols_ = mine.size();
}

// Column i over the ranks: the largest value, or the sum.
double EngineBench::col(size_t i, bool take_max) const {
  double m = 0;
  for (int r = 0; r < W_; ++r) {
    const double v = profile_all_[r * profile_cols_ + i];
    m = take_max ? std::max(m, v) : m + v;
  }
  return m;
}

// Roofline of a decode step: weights read (attention, router, norms and lm_head of every rank;
// the experts that receive a token: E(1 - (1 - k/E)^B) per layer if routing is uniform) and the
// KV cache read at the mean context, against the measured bandwidth.
json EngineBench::case_sample(const Case& c, const CaseTimes& t) {
  const ModelConfig& m = config_;
  const double E = double(m.num_local_experts), L = double(m.num_hidden_layers);
  const double dim = double(m.hidden_size);
  const double steps = static_cast<double>(c.output);
  const double step_s = t.decode_s / steps;
  const double attn_params = double(m.q_dim()) * dim * 2 + double(m.kv_dim()) * dim * 2;
  const double expert_params = 3.0 * dim * m.intermediate_size;
  const double k = double(m.num_experts_per_tok);
  const double active_experts = E * (1 - std::pow(1 - k / E, double(c.batch)));
  const double ctx = c.prompt + c.output / 2.0;
  const double es = static_cast<double>(dtype_size(backend_.ops->storage_dtype()));
  // Bytes per weight as held here (quantized CPU weights hold under one byte).
  const Weights& w = model_->weights();
  auto held = [&](const Tensor& t) {
    return t.numel() > 0 ? static_cast<double>(t.bytes()) / static_cast<double>(t.numel()) : es;
  };
  const LayerWeights& l0 = w.layers.front();
  const double es_attn = held(l0.wq), es_head = held(w.lm_head);
  const double es_expert = l0.w1.empty() ? es : held(l0.w1.front());
  const double weight_bytes_step =
      L * (es_attn * attn_params + es_expert * active_experts * expert_params) +
      es_head * double(m.vocab_size) * dim +
      4.0 * L * E * dim;  // the router's weight is F32 on every backend
  const double kv_bytes_step = es * L * c.batch * ctx * 2 * m.kv_dim();
  const double bytes_step = weight_bytes_step + kv_bytes_step;
  const double flops_step =
      2.0 * c.batch *
          (L * (attn_params + E * dim + k * expert_params) + double(m.vocab_size) * dim) +
      4.0 * c.batch * L * ctx * m.q_dim();
  const double gbs = bytes_step / step_s / 1e9;
  if (root_)
    std::printf("  %6lld %7lld %7lld %14.1f %13.1f %12.3f %10.1f %11.2f %8.1f%% %8.1f%% %6.0f%%\n",
                (long long)c.batch, (long long)c.prompt, (long long)c.output,
                c.batch * c.prompt / t.prefill_s, c.batch * c.output / t.decode_s, step_s * 1e3,
                bytes_step / 1e6, gbs, 100 * gbs * 1e9 / bw_,
                100 * flops_step / step_s / peak_flops_, 100.0 * t.decode_graph_steps / steps);
  json sample = {{"batch", c.batch},
                 {"prompt_len", c.prompt},
                 {"output_len", c.output},
                 {"prefill_tok_s", c.batch * c.prompt / t.prefill_s},
                 {"decode_tok_s", c.batch * c.output / t.decode_s},
                 {"decode_step_ms", step_s * 1e3},
                 {"bytes_per_step", bytes_step},
                 {"achieved_gbs", gbs},
                 {"flops_per_step", flops_step},
                 {"decode_graph_steps", t.decode_graph_steps}};
  add_profile_json(sample, steps);
  return sample;
}

void EngineBench::add_profile_json(json& sample, double steps) const {
  const int P = ForwardProfile::kPhases, T = ForwardProfile::kTraffics;
  const int64_t E = config_.num_local_experts, L = config_.num_hidden_layers;
  json phases = json::object();
  for (int p = 0; p < P; ++p)
    phases[ForwardProfile::phase_name(p)] = {{"decode_ms_max", col(p, true) / steps * 1e3},
                                             {"decode_ms_mean", col(p, false) / W_ / steps * 1e3},
                                             {"prefill_ms_max", col(P + p, true) * 1e3},
                                             {"prefill_ms_mean", col(P + p, false) / W_ * 1e3}};
  sample["phases"] = phases;
  json traffic = json::object();
  for (int t = 0; t < T; ++t)
    traffic[ForwardProfile::traffic_name(t)] = col(2 * P + t, false) / steps;
  sample["decode_bytes_per_step"] = traffic;
  json load = json::array();
  for (int64_t l = 0; l < L; ++l) {
    std::vector<double> per_expert;
    for (int64_t e = 0; e < E; ++e)
      per_expert.push_back(col(2 * P + T + l * E + e, false) +
                           col(2 * P + T + L * E + l * E + e, false));
    load.push_back(per_expert);
  }
  sample["expert_tokens"] = load;  // [layer][expert], prefill + decode
}

// Phase split and traffic of the last case's decode steps, expert load of every case.
void EngineBench::print_summary() const {
  const int64_t E = config_.num_local_experts, L = config_.num_hidden_layers;
  const json& last = out_["samples"].back();
  std::printf(
      "#\n# decode step split, batch %lld (ms per step; slowest rank and mean over ranks)\n",
      (long long)last["batch"].get<int64_t>());
  std::printf("# %-10s %10s %10s\n", "phase", "max_ms", "mean_ms");
  for (int p = 0; p < ForwardProfile::kPhases; ++p) {
    const json& ph = last["phases"][ForwardProfile::phase_name(p)];
    std::printf("  %-10s %10.3f %10.3f\n", ForwardProfile::phase_name(p),
                ph["decode_ms_max"].get<double>(), ph["decode_ms_mean"].get<double>());
  }
  std::printf("#\n# collective bytes per decode step (sum over ranks)\n# %-16s %14s\n",
              "collective", "bytes");
  for (int t = 0; t < ForwardProfile::kTraffics; ++t)
    std::printf("  %-16s %14.0f\n", ForwardProfile::traffic_name(t),
                last["decode_bytes_per_step"][ForwardProfile::traffic_name(t)].get<double>());
  std::printf("#\n# expert load (tokens routed per expert, prefill + decode, summed over cases)\n");
  std::printf("# %5s  %-48s %9s\n", "layer", "tokens per expert", "max/mean");
  for (int64_t l = 0; l < L; ++l) {
    std::vector<double> sum(static_cast<size_t>(E), 0.0);
    for (const json& smp : out_["samples"])
      for (int64_t e = 0; e < E; ++e) sum[e] += smp["expert_tokens"][l][e].get<double>();
    std::string row;
    double mx = 0, mean = 0;
    for (double v : sum) {
      row += std::to_string(static_cast<long long>(v)) + " ";
      mx = std::max(mx, v);
      mean += v / E;
    }
    std::printf("  %5lld  %-48s %9.2f\n", (long long)l, row.c_str(), mean > 0 ? mx / mean : 0.0);
  }
}

void EngineBench::run() {
  out_["model"] = a_.synthetic.empty() ? a_.model : a_.synthetic;
  out_["layers"] = config_.num_hidden_layers;
  out_["world"] = W_;
  out_["tp"] = pc_.tp;
  out_["ep"] = pc_.ep_size();
  out_["moe_exchange"] = moe_exchange_name(pc_.exchange);
  out_["memory_bandwidth_gbs"] = bw_ / 1e9;
  out_["peak_gflops"] = peak_flops_ / 1e9;
  out_["samples"] = json::array();
  if (root_) print_header();
  for (int64_t b : a_.batch)
    for (int64_t p : a_.prompt_len)
      for (int64_t o : a_.output_len) {
        const Case c{b, p, o};
        const CaseTimes t = time_case(c);
        out_["samples"].push_back(case_sample(c, t));
      }
  if (!root_) return;
  print_summary();
  if (!a_.json.empty()) {
    std::ofstream f(a_.json);
    f << out_.dump(1) << "\n";
    SY_CHECK(f.good(), "cannot write --json ", a_.json);
  }
}

}  // namespace

int run_bench_engine(const BenchEngineArgs& a) {
  check_args(a);
  EngineBench bench(a);
  bench.run();
  return 0;
}

}  // namespace sy::launch
