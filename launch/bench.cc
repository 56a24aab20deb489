// `switchyard bench MODE [flags]`: the measurement modes and their flags. Each mode prints an
// nccl-tests-style table on rank 0 and can write it as JSON; docs/benchmarks.md defines the
// columns.
#include "launch/commands.h"

namespace sy::launch {
namespace {

void add_all_to_all(CLI::App& bench, BenchArgs& args) {
  BenchAllToAllArgs& a = args.all_to_all;
  CLI::App* cmd = bench.add_subcommand(
      "all-to-all",
      "The MoE dispatch exchange: each token's row to the ranks of its top-k experts");
  cmd->callback([&args] { args.mode = "all-to-all"; });
  cmd->add_option("--backend", a.backend, "mpi (host buffers) or nccl (device buffers)")
      ->check(CLI::IsMember({"mpi", "nccl"}))
      ->capture_default_str();
  cmd->add_option("--hidden", a.hidden, "Elements per token row")->capture_default_str();
  cmd->add_option("--top-k", a.top_k, "Experts each token is sent to")->capture_default_str();
  cmd->add_option("--experts", a.n_experts, "Experts, placed contiguously over the ranks")
      ->capture_default_str();
  cmd->add_option("--min-tokens", a.min_tokens, "Tokens per rank of the first size")
      ->capture_default_str();
  cmd->add_option("--max-tokens", a.max_tokens, "Tokens per rank of the last size (doubling)")
      ->capture_default_str();
  cmd->add_option("--dtype", a.dtype, "f32 or bf16 (auto: f32 on mpi, bf16 on nccl)")
      ->check(CLI::IsMember({"auto", "f32", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--iters", a.iters, "Timed exchanges per size")->capture_default_str();
  cmd->add_option("--warmup", a.warmup, "Untimed exchanges per size")->capture_default_str();
  cmd->add_option("--seed", a.seed, "Routing and payload seed")->capture_default_str();
  cmd->add_option("--json", a.json, "Also write the results to this JSON file");
}

}  // namespace

void add_bench(CLI::App& app, BenchArgs& args) {
  CLI::App* bench =
      app.add_subcommand("bench", "Measurements: bench all-to-all|engine|serve [flags]");
  bench->require_subcommand(1);
  add_all_to_all(*bench, args);
  add_bench_engine(*bench, args.engine);
  bench->get_subcommand("engine")->callback([&args] { args.mode = "engine"; });
  add_bench_serve(*bench, args.serve);
  bench->get_subcommand("serve")->callback([&args] { args.mode = "serve"; });
}

int run_bench(const BenchArgs& args) {
  if (args.mode == "all-to-all") return run_bench_all_to_all(args.all_to_all);
  if (args.mode == "engine") return run_bench_engine(args.engine);
  if (args.mode == "serve") return run_bench_serve(args.serve);
  SY_FAIL("bench: unknown mode \"", args.mode, "\"");
}

}  // namespace sy::launch
