// Subcommands of the switchyard program: their flags and entry points.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "parallel/context.h"
#include "runtime/engine/sampler.h"
#include "runtime/model/backend.h"
#include "runtime/model/tiny_model.h"
#include "runtime/model/weights.h"
#include "runtime/server/serve_config.h"

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
  std::vector<std::string> logit_bias;  // ID:BIAS items
  bool ignore_eos = false;
  bool print_ids = false;
  bool no_bos = false;
  std::string logits_out;
  int64_t max_context = 0;      // 0: prompt + max_tokens
  int64_t prefill_chunk = 512;  // prompt tokens per forward step
  int tp = 1;                   // tensor-parallel ranks of attention
  int ep = 0;                   // expert-parallel ranks (0 = the world)
  std::string moe_exchange = "auto";
  BackendOptions backend;  // --device, --comm
};
void add_generate(CLI::App& app, GenerateArgs& args);
int run_generate(const GenerateArgs& args);

struct ServeArgs {
  ServeConfig config;
  int tp = 1;  // tensor-parallel ranks of attention
  int ep = 0;  // expert-parallel ranks (0 = the world)
  std::string moe_exchange = "auto";
  BackendOptions backend;  // --device, --comm
};
void add_serve(CLI::App& app, ServeArgs& args);
int run_serve(const ServeArgs& args);

struct ClientArgs {
  std::string target = "127.0.0.1:50051";  // host:port of the server
  double timeout_s = 30;                   // deadline of the unary calls
  // generate
  std::string prompt;
  std::string prompt_ids;
  bool skip_bos = false;
  int64_t max_tokens = 0;  // 0 = the server's default (16)
  SamplingParams sampling;
  bool has_seed = false;
  std::vector<std::string> logit_bias;  // ID:BIAS items
  std::vector<std::string> stop;
  std::vector<int64_t> stop_token_ids;
  bool ignore_eos = false;
  int64_t logprobs = 0;
  int64_t prompt_logprobs = 0;
  int32_t priority = 0;
  int64_t n = 1;            // completions of the prompt
  int64_t deadline_ms = 0;  // 0 = none
  bool print_ids = false;
  // tokenize / detokenize
  std::string text;
  bool add_bos = false;
  std::string ids;
  // health
  std::string service;  // "" = the whole server
};
void add_client(CLI::App& app, ClientArgs& args);
// Runs the client subcommand that was parsed; returns the exit code.
int run_client(const CLI::App& app, const ClientArgs& args);

// Rank 0 prints the layout table, then every rank's weight bytes (gathered; a collective).
void print_layout(const ParallelContext& parallel, const ModelConfig& config,
                  const Weights& weights);
// Parses "1,2,3" into token ids; throws naming `flag`.
std::vector<int32_t> parse_ids(const std::string& text, const char* flag);
// `flag`'s "ID:BIAS" items as logit biases; throws naming the flag and the item.
std::vector<std::pair<int32_t, float>> parse_logit_bias(const std::vector<std::string>& items,
                                                        const char* flag);

// `switchyard bench MODE`: measurements for capacity planning. Modes: all-to-all, engine, serve.
struct BenchAllToAllArgs {
  std::string backend = "mpi";  // mpi (host buffers) or nccl (device buffers, one GPU per rank)
  int64_t hidden = 4096;        // elements per token row
  int top_k = 2;                // experts each token is sent to
  int64_t n_experts = 8;        // experts, placed contiguously over the ranks as in the model
  int64_t min_tokens = 1;       // tokens per rank of the first size
  int64_t max_tokens = 4096;    // tokens per rank of the last size (sizes double)
  std::string dtype = "auto";   // f32 or bf16; auto: f32 on mpi, bf16 on nccl
  int iters = 20;               // timed exchanges per size
  int warmup = 5;               // untimed exchanges per size, before the timed ones
  uint64_t seed = 1;            // routing and payload seed
  std::string json;             // also write the table here as JSON (rank 0); empty: no file
};
struct BenchEngineArgs {
  std::string model;                        // checkpoint directory, or
  std::string synthetic;                    // preset name or config.json: seeded random weights
  int64_t layers = 0;                       // decoder layers to run; 0 = all
  std::vector<int64_t> batch = {1, 8, 32};  // sequences per step
  std::vector<int64_t> prompt_len = {128};  // prompt tokens per sequence
  std::vector<int64_t> output_len = {16};   // decode steps
  int tp = 1;                               // tensor-parallel ranks of attention
  int ep = 0;                               // expert-parallel ranks; 0 = the world
  std::string moe_exchange = "auto";
  BackendOptions backend;           // --device, --comm
  int64_t max_batch_tokens = 1024;  // prefill tokens per step
  uint64_t seed = 1;                // weights and tokens
  double mem_bandwidth_gbs = 0;     // the job's memory bandwidth; 0 = measure
  double peak_gflops = 0;           // the job's GEMM rate; 0 = measure
  std::string json;                 // every sample as JSON (rank 0); empty: no file
};
struct BenchServeArgs {
  std::string target = "127.0.0.1:50051";  // host:port of a running server
  std::string endpoint = "grpc";           // "grpc", or "openai": the HTTP API at target
  std::vector<double> rate;                // open loop: requests/s (Poisson arrivals), a sweep
  std::vector<int64_t> concurrency;        // closed loop: requests in flight, a sweep
  int64_t prompt_len = 128;                // prompt tokens (fixed), unless a range or file
  int64_t output_len = 32;                 // generated tokens (fixed), unless a range or file
  std::string prompt_len_range;            // "A:B": prompt tokens uniform in [A, B]
  std::string output_len_range;            // "A:B": generated tokens uniform in [A, B]
  std::string lengths_file;                // lines "prompt_len output_len", drawn uniformly
  double warmup_s = 2;                     // per sweep value, before the measured window
  double duration_s = 10;                  // measured window per sweep value
  double slo_ttft_ms = 0;                  // goodput: time to first token at most; 0 = any
  double slo_tpot_ms = 0;                  // goodput: time per output token at most; 0 = any
  uint64_t seed = 1;                       // arrivals, lengths and prompt tokens
  int64_t channels = 1;                    // gRPC connections, requests round-robin over them
  int64_t shared_prefix_len = 0;           // leading prompt tokens every request has in common
  std::string json;                        // every sample as JSON; empty: no file
};
struct BenchArgs {
  std::string mode;  // the mode given on the command line, e.g. "all-to-all"
  BenchAllToAllArgs all_to_all;
  BenchEngineArgs engine;
  BenchServeArgs serve;
};
void add_bench_engine(CLI::App& bench, BenchEngineArgs& args);
int run_bench_engine(const BenchEngineArgs& args);
void add_bench_serve(CLI::App& bench, BenchServeArgs& args);
int run_bench_serve(const BenchServeArgs& args);
void add_bench(CLI::App& app, BenchArgs& args);
int run_bench(const BenchArgs& args);
int run_bench_all_to_all(const BenchAllToAllArgs& args);

// --tp, --ep and --moe-exchange, the rank layout flags of generate, serve and bench engine.
void add_layout_flags(CLI::App* cmd, int& tp, int& ep, std::string& moe_exchange);
// --device cpu|cuda and --comm auto|nccl|mpi.
void add_device_flags(CLI::App* cmd, BackendOptions& backend);

// True when this process was started by an MPI launcher (mpirun, srun --mpi=pmix, ...).
bool launched_by_mpi();

}  // namespace sy::launch
