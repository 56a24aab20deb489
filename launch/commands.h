// Subcommands of the switchyard program: their flags and entry points.
#pragma once

#include <cstdint>
#include <string>

#include <CLI/CLI.hpp>

#include "runtime/sampler.h"
#include "runtime/tiny_model.h"

namespace sy::launch {

struct MakeTinyModelArgs {
  std::string out;
  TinyModelOptions options = TinyModelOptions::defaults();
  std::string dtype = "bf16";
  double shard_mib = 8;
};
void add_make_tiny_model(CLI::App& app, MakeTinyModelArgs& args);
int run_make_tiny_model(const MakeTinyModelArgs& args);

struct GenerateArgs {
  std::string model;
  std::string prompt;
  std::string prompt_ids;
  int64_t max_tokens = 64;
  SamplingParams sampling;
  bool ignore_eos = false;
  bool print_ids = false;
  bool no_bos = false;
  std::string logits_out;
  int64_t max_context = 0;      // 0: prompt + max_tokens
  int64_t prefill_chunk = 512;  // prompt tokens per forward step
  int tp = 1;                   // tensor-parallel ranks of attention
  int ep = 0;                   // expert-parallel ranks (0 = the world)
  std::string moe_exchange = "all-to-all";
};
void add_generate(CLI::App& app, GenerateArgs& args);
int run_generate(const GenerateArgs& args);

// True when this process was started by an MPI launcher (mpirun, srun --mpi=pmix, ...).
bool launched_by_mpi();

}  // namespace sy::launch
