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

#include "launch/commands.h"
#include "parallel/context.h"
#include "parallel/mpi_env.h"
#include "runtime/formats/safetensors.h"
#include "runtime/model/model.h"

namespace sy::launch {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Sustained memory bandwidth of this rank (bytes/s): a triad a = b + s*c over 3 x 64 MiB.
double measure_bandwidth() {
  const size_t n = (64u << 20) / sizeof(float);
  std::vector<float> a(n, 1.f), b(n, 2.f), c(n, 3.f);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t = Clock::now();
    for (size_t i = 0; i < n; ++i) a[i] = b[i] + 0.5f * c[i];
    best = std::max(best, 3.0 * n * sizeof(float) / seconds_since(t));
  }
  volatile float sink = a[n / 2];
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
  for (size_t s = 0; s < ranges.size(); ++s) {
    const auto [begin, end] = ranges[s];
    if (begin == end) continue;
    const int32_t row = static_cast<int32_t>(b.n_seqs++);
    for (int64_t p = begin; p < end; ++p) {
      b.tokens.push_back(tokens[s][static_cast<size_t>(p)]);
      b.positions.push_back(static_cast<int32_t>(p));
      b.token_seq.push_back(row);
    }
    for (int64_t i = 0; i < limits.max_blocks_per_seq; ++i)
      b.block_tables.push_back(i < blocks_per_seq ? static_cast<int32_t>(s * blocks_per_seq + i)
                                                  : 0);
    if (want_logits_at_end && end == seq_len)
      b.logit_rows.push_back(static_cast<int32_t>(b.tokens.size() - 1));
  }
}

}  // namespace

void add_bench_engine(CLI::App& bench, BenchEngineArgs& a) {
  CLI::App* cmd = bench.add_subcommand("engine", "Prefill and decode throughput of the ranks");
  auto* model = cmd->add_option("--model", a.model, "Checkpoint directory");
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

int run_bench_engine(const BenchEngineArgs& a) {
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

  std::unique_ptr<MpiEnv> env;
  std::unique_ptr<Communicator> world;
  if (launched_by_mpi()) {
    env = std::make_unique<MpiEnv>(nullptr, nullptr);
    world = make_mpi_world_communicator();
  }
  const int W = world ? world->size() : 1;
  const int rank = world ? world->rank() : 0;
  const bool root = rank == 0;

  ModelConfig config =
      a.synthetic.empty() ? ModelConfig::load(a.model) : ModelConfig::preset(a.synthetic);
  const int64_t all_layers = config.num_hidden_layers;
  if (a.layers > 0) {
    SY_CHECK(a.layers <= all_layers, "--layers ", a.layers, " exceeds the model's ", all_layers);
    config.num_hidden_layers = a.layers;
  }
  std::unique_ptr<ParallelContext> par;
  ParallelConfig pc;
  pc.world = W;
  pc.rank = rank;
  pc.tp = a.tp;
  pc.ep = a.ep;
  pc.exchange = parse_moe_exchange(a.moe_exchange);
  pc.validate(config.layout_shape());
  Backend backend = make_backend(a.backend, world.get(), env ? env->local_rank() : 0);
  if (world) par = ParallelContext::create(pc, backend.world ? *backend.world : *world);

  const int64_t max_b = *std::max_element(a.batch.begin(), a.batch.end());
  const int64_t max_len = *std::max_element(a.prompt_len.begin(), a.prompt_len.end()) +
                          *std::max_element(a.output_len.begin(), a.output_len.end());
  SY_CHECK(max_len <= config.max_position_embeddings, "prompt + output of ", max_len,
           " tokens exceeds the context of ", config.max_position_embeddings);
  ModelLimits limits;
  limits.block_size = 16;
  limits.max_blocks_per_seq = (max_len + limits.block_size - 1) / limits.block_size;
  limits.n_blocks = limits.max_blocks_per_seq * max_b;
  limits.max_seqs = max_b;
  limits.max_tokens = std::max(a.max_batch_tokens, max_b);
  limits.max_logit_rows = max_b;

  Ops* ops = backend.ops.get();
  const WeightShard shard = shard_for(config, par.get());
  const auto t_load = Clock::now();
  Weights weights;
  if (a.synthetic.empty()) {
    Checkpoint ckpt = Checkpoint::open(a.model);
    weights = Weights::load(ckpt, config, shard, *ops, root);
  } else {
    weights = Weights::synthetic(config, shard, *ops, a.seed);
  }
  const double load_s = seconds_since(t_load);
  const uint64_t weight_bytes = weights.total_bytes;
  Model model(config, std::move(weights), *ops, limits, par.get());

  // Machine figures, measured once: every rank at the same time, summed (the job's aggregate).
  if (world) world->barrier();
  const bool on_cpu = ops->device() == Device::kCpu;
  // A figure given on the command line is not measured (every rank sees the same flags).
  double bw = a.mem_bandwidth_gbs * 1e9, peak_flops = a.peak_gflops * 1e9;
  if (bw <= 0) {
    const double bw_rank = on_cpu ? measure_bandwidth() : measure_device_bandwidth(*ops);
    for (double v : gather_all(world.get(), {bw_rank})) bw += v;
  }
  if (peak_flops <= 0) {
    const double flops_rank = on_cpu ? measure_flops() : measure_device_flops(*ops);
    for (double v : gather_all(world.get(), {flops_rank})) peak_flops += v;
  }

  const int64_t E = config.num_local_experts, L = config.num_hidden_layers;
  const int64_t dim = config.hidden_size;
  if (root) {
    std::printf("# bench engine: %s%s, %lld of %lld layers, world %d, tp %d, ep %d, %s, %s %s\n",
                a.synthetic.empty() ? a.model.c_str() : a.synthetic.c_str(),
                a.synthetic.empty() ? "" : " (synthetic)", (long long)L, (long long)all_layers, W,
                pc.tp, pc.ep_size(), moe_exchange_name(pc.exchange), backend.description.c_str(),
                dtype_name(ops->storage_dtype()));
    std::printf(
        "# weights %.2f GiB on rank 0, made in %.1f s; memory %.1f GB/s (%s), %s GEMM %.1f "
        "GFLOP/s (%s; all ranks)\n",
        weight_bytes / double(1 << 30), load_s, bw / 1e9,
        a.mem_bandwidth_gbs > 0 ? "given" : "measured", dtype_name(ops->storage_dtype()),
        peak_flops / 1e9, a.peak_gflops > 0 ? "given" : "measured");
  }

  json out;
  out["model"] = a.synthetic.empty() ? a.model : a.synthetic;
  out["layers"] = L;
  out["world"] = W;
  out["tp"] = pc.tp;
  out["ep"] = pc.ep_size();
  out["moe_exchange"] = moe_exchange_name(pc.exchange);
  out["memory_bandwidth_gbs"] = bw / 1e9;
  out["peak_gflops"] = peak_flops / 1e9;
  out["samples"] = json::array();

  std::vector<Case> cases;
  for (int64_t b : a.batch)
    for (int64_t p : a.prompt_len)
      for (int64_t o : a.output_len) cases.push_back({b, p, o});
  if (root)
    std::printf("#\n# %6s %7s %7s %14s %13s %12s %10s %11s %9s %9s %7s\n", "batch", "prompt",
                "output", "prefill_tok/s", "decode_tok/s", "step_ms", "MB/step", "GB/s", "%bw",
                "%flops", "graphs");

  std::mt19937_64 rng(a.seed);
  std::vector<float> logits(static_cast<size_t>(max_b * config.vocab_size));
  // Each step ends as the engine's does: on GPUs (Engine::sample_on_device) rank 0 samples on
  // the device, greedily here, and only the ids come back; elsewhere it takes the logits to the
  // host. The other ranks only join the collectives.
  const bool device_sampling = !on_cpu && model.forward_sample_supported();
  const std::vector<float> greedy(static_cast<size_t>(max_b * Ops::kSampleParams), 0.f);
  std::vector<int32_t> sampled(static_cast<size_t>(max_b));
  auto forward = [&](const StepBatch& b) {
    if (device_sampling && root)
      model.forward_sample(b, greedy.data(), sampled.data());
    else
      model.forward(b, root ? logits.data() : nullptr);
  };
  StepBatch batch;
  ForwardProfile prefill_profile, decode_profile;
  for (const Case& c : cases) {
    const int64_t blocks_per_seq =
        (c.prompt + c.output + limits.block_size - 1) / limits.block_size;
    std::vector<std::vector<int32_t>> tokens(static_cast<size_t>(c.batch));
    for (auto& t : tokens) {
      t.resize(static_cast<size_t>(c.prompt + c.output));
      for (auto& id : t)
        id = static_cast<int32_t>(rng() % static_cast<uint64_t>(config.vocab_size));
      t[0] = static_cast<int32_t>(std::max<int64_t>(config.bos_token_id, 0));
    }
    auto run_prefill = [&](int64_t len) {
      // Chunks of at most max_tokens, filled sequence by sequence.
      std::vector<int64_t> done(static_cast<size_t>(c.batch), 0);
      size_t s = 0;
      while (s < done.size()) {
        std::vector<std::pair<int64_t, int64_t>> ranges(done.size(), {0, 0});
        int64_t budget = limits.max_tokens;
        for (size_t i = s; i < done.size() && budget > 0; ++i) {
          const int64_t take = std::min(len - done[i], budget);
          ranges[i] = {done[i], done[i] + take};
          done[i] += take;
          budget -= take;
        }
        build_step(batch, tokens, ranges, limits, blocks_per_seq, true, len);
        forward(batch);
        while (s < done.size() && done[s] == len) ++s;
      }
    };
    auto run_decode = [&](int64_t from, int64_t steps) {
      for (int64_t i = 0; i < steps; ++i) {
        std::vector<std::pair<int64_t, int64_t>> ranges(tokens.size(), {from + i, from + i + 1});
        build_step(batch, tokens, ranges, limits, blocks_per_seq, true, from + i + 1);
        forward(batch);
      }
    };
    // Warm-up (untimed): a short prefill, then two decode steps of the timed steps' shape, so
    // that a backend with graphs has recorded it (the timed prefill rewrites those positions).
    const int64_t warm = std::min<int64_t>(c.prompt, 4);
    run_prefill(warm);
    run_decode(warm, std::min<int64_t>(c.output, 2));
    if (world) world->barrier();
    // Timed as served: no profile, so nothing waits between phases and decode steps run as
    // graphs where the backend and layout allow.
    auto t0 = Clock::now();
    run_prefill(c.prompt);
    if (world) world->barrier();
    const double prefill_s = seconds_since(t0);
    const int64_t graphs_before = model.graph_steps();
    t0 = Clock::now();
    run_decode(c.prompt, c.output);
    if (world) world->barrier();
    const double decode_s = seconds_since(t0);
    const int64_t decode_graph_steps = model.graph_steps() - graphs_before;
    // The same steps again with a profile, for the phase split, traffic and expert load (they
    // rewrite the KV cache with the same values).
    model.set_profile(&prefill_profile);
    prefill_profile.reset();
    run_prefill(c.prompt);
    model.set_profile(&decode_profile);
    decode_profile.reset();
    run_decode(c.prompt, c.output);
    if (world) world->barrier();
    model.set_profile(nullptr);

    // Phases per rank -> slowest and mean; bytes and expert tokens summed over ranks.
    std::vector<double> mine;
    for (double v : decode_profile.seconds) mine.push_back(v);
    for (double v : prefill_profile.seconds) mine.push_back(v);
    for (uint64_t v : decode_profile.bytes) mine.push_back(static_cast<double>(v));
    for (int64_t v : decode_profile.expert_tokens) mine.push_back(static_cast<double>(v));
    for (int64_t v : prefill_profile.expert_tokens) mine.push_back(static_cast<double>(v));
    const std::vector<double> all = gather_all(world.get(), mine);
    const size_t n = mine.size();
    // Column i over the ranks: the largest value, or the sum.
    auto col = [&](size_t i, bool take_max) {
      double m = 0;
      for (int r = 0; r < W; ++r) m = take_max ? std::max(m, all[r * n + i]) : m + all[r * n + i];
      return m;
    };
    const int P = ForwardProfile::kPhases, T = ForwardProfile::kTraffics;
    const double steps = static_cast<double>(c.output);
    const double step_s = decode_s / steps;

    // Roofline of a decode step: weights read (attention, router, norms and lm_head of every
    // rank; the experts that receive a token: E(1 - (1 - k/E)^B) per layer if routing is
    // uniform) and the KV cache read at the mean context, against the measured bandwidth.
    const double attn_params = double(config.q_dim()) * dim * 2 + double(config.kv_dim()) * dim * 2;
    const double expert_params = 3.0 * dim * config.intermediate_size;
    const double k = double(config.num_experts_per_tok);
    const double active_experts = E * (1 - std::pow(1 - k / E, double(c.batch)));
    const double ctx = c.prompt + c.output / 2.0;
    const double es = static_cast<double>(dtype_size(ops->storage_dtype()));  // bytes/element
    const double weight_bytes_step =
        es *
            (L * (attn_params + active_experts * expert_params) + double(config.vocab_size) * dim) +
        4.0 * L * E * dim;  // the router's weight is F32 on every backend
    const double kv_bytes_step = es * L * c.batch * ctx * 2 * config.kv_dim();
    const double bytes_step = weight_bytes_step + kv_bytes_step;
    const double flops_step =
        2.0 * c.batch *
            (L * (attn_params + E * dim + k * expert_params) + double(config.vocab_size) * dim) +
        4.0 * c.batch * L * ctx * config.q_dim();
    const double gbs = bytes_step / step_s / 1e9;
    if (root) {
      std::printf(
          "  %6lld %7lld %7lld %14.1f %13.1f %12.3f %10.1f %11.2f %8.1f%% %8.1f%% %6.0f%%\n",
          (long long)c.batch, (long long)c.prompt, (long long)c.output,
          c.batch * c.prompt / prefill_s, c.batch * c.output / decode_s, step_s * 1e3,
          bytes_step / 1e6, gbs, 100 * gbs * 1e9 / bw, 100 * flops_step / step_s / peak_flops,
          100.0 * decode_graph_steps / steps);
    }
    json sample = {{"batch", c.batch},
                   {"prompt_len", c.prompt},
                   {"output_len", c.output},
                   {"prefill_tok_s", c.batch * c.prompt / prefill_s},
                   {"decode_tok_s", c.batch * c.output / decode_s},
                   {"decode_step_ms", step_s * 1e3},
                   {"bytes_per_step", bytes_step},
                   {"achieved_gbs", gbs},
                   {"flops_per_step", flops_step},
                   {"decode_graph_steps", decode_graph_steps}};
    json phases = json::object();
    for (int p = 0; p < P; ++p) {
      phases[ForwardProfile::phase_name(p)] = {{"decode_ms_max", col(p, true) / steps * 1e3},
                                               {"decode_ms_mean", col(p, false) / W / steps * 1e3},
                                               {"prefill_ms_max", col(P + p, true) * 1e3},
                                               {"prefill_ms_mean", col(P + p, false) / W * 1e3}};
    }
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
    out["samples"].push_back(sample);
  }

  if (root) {
    // Phase split and traffic of the last case's decode steps, expert load of every case.
    const json& last = out["samples"].back();
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
    std::printf(
        "#\n# expert load (tokens routed per expert, prefill + decode, summed over cases)\n");
    std::printf("# %5s  %-48s %9s\n", "layer", "tokens per expert", "max/mean");
    for (int64_t l = 0; l < L; ++l) {
      std::vector<double> sum(static_cast<size_t>(E), 0.0);
      for (const json& smp : out["samples"])
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
    if (!a.json.empty()) {
      std::ofstream f(a.json);
      f << out.dump(1) << "\n";
      SY_CHECK(f.good(), "cannot write --json ", a.json);
    }
  }
  return 0;
}

}  // namespace sy::launch
