// `switchyard generate`: one prompt through a model, the text streamed as it is generated.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <cstdlib>

#include "launch/commands.h"
#include "parallel/context.h"
#include "parallel/mpi_env.h"
#include "runtime/engine/generator.h"
#include "runtime/engine/request.h"
#include "runtime/formats/tokenizer.h"

namespace sy::launch {

std::vector<int32_t> parse_ids(const std::string& text, const char* flag) {
  std::vector<int32_t> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    while (used < item.size() && item[used] == ' ') ++used;
    SY_CHECK(used == item.size() && !item.empty(), flag, ": \"", item,
             "\" is not an integer token id");
    SY_CHECK(v >= 0 && v <= INT32_MAX, flag, ": token id ", v, " out of range");
    ids.push_back(static_cast<int32_t>(v));
  }
  SY_CHECK(!ids.empty(), flag, " is empty");
  return ids;
}

std::vector<std::pair<int32_t, float>> parse_logit_bias(const std::vector<std::string>& items,
                                                        const char* flag) {
  std::vector<std::pair<int32_t, float>> out;
  for (const std::string& item : items) {
    const size_t colon = item.find(':');
    SY_CHECK(colon != std::string::npos, flag, ": \"", item, "\" is not ID:BIAS");
    const int32_t id = parse_ids(item.substr(0, colon), flag).at(0);
    size_t used = 0;
    float bias = 0;
    try {
      bias = std::stof(item.substr(colon + 1), &used);
    } catch (const std::exception&) {
      used = 0;
    }
    SY_CHECK(used > 0 && used == item.size() - colon - 1, flag, ": \"", item,
             "\" has no number after the colon");
    out.emplace_back(id, bias);
  }
  return out;
}

void print_layout(const ParallelContext& par, const ModelConfig& config, const Weights& w) {
  const int W = par.config.world;
  std::vector<int32_t> mine = {static_cast<int32_t>(w.expert_bytes >> 10),
                               static_cast<int32_t>(w.total_bytes >> 10)};
  std::vector<int32_t> all(static_cast<size_t>(2 * W));
  par.world->all_gather(Tensor(all.data(), DType::kI32, {W, 2}),
                        Tensor(mine.data(), DType::kI32, {1, 2}),
                        std::vector<int64_t>(static_cast<size_t>(W), 1));
  if (par.config.rank != 0) return;
  std::fputs(layout_table(par.config, config.layout_shape()).c_str(), stderr);
  const LayerWeights& l0 = w.layers.front();
  std::fprintf(stderr, "# weights held as: attention %s, experts %s, lm_head %s\n",
               dtype_name(l0.wq.dtype), l0.w1.empty() ? "-" : dtype_name(l0.w1.front().dtype),
               dtype_name(w.lm_head.dtype));
  std::fprintf(stderr, "#  rank  expert_KiB  weight_KiB\n");
  for (int r = 0; r < W; ++r)
    std::fprintf(stderr, "  %5d  %10d  %10d\n", r, all[2 * r], all[2 * r + 1]);
}

void add_layout_flags(CLI::App* cmd, int& tp, int& ep, std::string& moe_exchange) {
  cmd->add_option("--tp", tp, "Tensor-parallel ranks of attention (divides the world)")
      ->capture_default_str();
  cmd->add_option("--ep", ep, "Expert-parallel ranks (divides the world; 0 = the world)")
      ->capture_default_str();
  cmd->add_option("--moe-exchange", moe_exchange,
                  "all-to-all, all-gather, or auto (all-gather for steps of at most 256 routed "
                  "rows, all-to-all above)")
      ->capture_default_str();
}

void add_device_flags(CLI::App* cmd, BackendOptions& backend) {
  cmd->add_option("--device", backend.device, "cpu or cuda")->capture_default_str();
  cmd->add_option("--dtype", backend.dtype,
                  "Weights, KV cache and GEMM inputs: auto (cpu f32, cuda bf16), bf16 or f32")
      ->capture_default_str();
  cmd->add_option("--weights", backend.weights,
                  "Linear weights: auto (a GGUF file's own types on cpu), f32, bf16, f16, q8_0, "
                  "q4_0 or q4_k (quantized at load; cpu only)")
      ->capture_default_str();
  cmd->add_option(
         "--threads", backend.threads,
         "Threads per CPU rank (0 = the cores the rank is bound to, or the node's cores / its "
         "ranks when unbound)")
      ->capture_default_str();
  cmd->add_option("--comm", backend.comm,
                  "GPU ranks: auto, nccl (one GPU per rank) or mpi (host staging; ranks may "
                  "share a GPU)")
      ->capture_default_str();
}

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"})
    if (std::getenv(v) != nullptr) return true;
  return false;
}

void add_generate(CLI::App& app, GenerateArgs& a) {
  CLI::App* cmd = app.add_subcommand("generate", "Generate text from one prompt");
  cmd->add_option("--model", a.model, "Model directory (Hugging Face layout) or GGUF file")
      ->required();
  auto* prompt = cmd->add_option("--prompt", a.prompt, "Prompt text (BOS is added)");
  auto* ids = cmd->add_option("--prompt-ids", a.prompt_ids, "Prompt token ids, e.g. 1,2,3");
  prompt->excludes(ids);
  ids->excludes(prompt);
  cmd->add_option("--max-tokens", a.max_tokens, "Tokens to generate at most")
      ->capture_default_str();
  cmd->add_option("--temperature", a.sampling.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", a.sampling.top_k, "0 = off")->capture_default_str();
  cmd->add_option("--top-p", a.sampling.top_p, "1 = off")->capture_default_str();
  cmd->add_option("--min-p", a.sampling.min_p, "0 = off")->capture_default_str();
  cmd->add_option("--repetition-penalty", a.sampling.repetition_penalty, "1 = off")
      ->capture_default_str();
  cmd->add_option("--presence-penalty", a.sampling.presence_penalty,
                  "Subtracted from generated tokens' logits once, in [-2, 2]; 0 = off")
      ->capture_default_str();
  cmd->add_option("--frequency-penalty", a.sampling.frequency_penalty,
                  "Subtracted once per time a token was generated, in [-2, 2]; 0 = off")
      ->capture_default_str();
  cmd->add_option("--seed", a.sampling.seed, "Sampling seed")->capture_default_str();
  cmd->add_option("--logit-bias", a.logit_bias,
                  "ID:BIAS added to a token's logit before the penalties, in [-100, 100] "
                  "(repeatable)");
  cmd->add_option("--min-tokens", a.sampling.min_tokens,
                  "Tokens generated before an end-of-sequence token may end generation")
      ->capture_default_str();
  cmd->add_flag("--ignore-eos", a.ignore_eos, "Do not stop at end-of-sequence tokens");
  cmd->add_flag("--no-bos", a.no_bos, "Do not add BOS before a --prompt text");
  cmd->add_flag("--print-ids", a.print_ids, "Print the generated ids on one line");
  cmd->add_option("--logits-out", a.logits_out,
                  "Write float32 little-endian logits [prompt tokens, vocab] to this file");
  cmd->add_option("--max-context", a.max_context, "KV cache size in tokens (0 = what is needed)")
      ->capture_default_str();
  cmd->add_option("--prefill-chunk", a.prefill_chunk, "Prompt tokens per forward step")
      ->capture_default_str();
  add_layout_flags(cmd, a.tp, a.ep, a.moe_exchange);
  add_device_flags(cmd, a.backend);
}

namespace {

// The request of the flags, checked as the server checks one (before any weight is read);
// returns the context the model needs.
int64_t check_request(const GenerateArgs& a, const ModelConfig& config,
                      const std::vector<int32_t>& prompt) {
  RequestParams p;
  p.prompt = prompt;
  p.max_tokens = a.max_tokens;
  p.sampling = a.sampling;
  p.sampling.logit_bias = parse_logit_bias(a.logit_bias, "--logit-bias");
  RequestLimits limits;
  limits.vocab_size = config.vocab_size;
  limits.context_limit = config.max_position_embeddings;
  limits.max_prompt_tokens = config.max_position_embeddings;
  limits.allow_no_tokens = true;
  validate_request(p, limits);
  const int64_t needed = static_cast<int64_t>(prompt.size()) + a.max_tokens;
  const int64_t context = a.max_context > 0 ? a.max_context : needed;
  SY_CHECK(context >= needed, "--max-context ", context, " is smaller than the ", needed,
           " tokens this request needs");
  return context;
}

// This process's rank of the job (one rank without an MPI launcher) and its backend.
struct Ranks {
  std::unique_ptr<MpiEnv> env;
  std::unique_ptr<Communicator> world;
  Backend backend;
  std::unique_ptr<ParallelContext> par;
  bool root = true;
};

void join_ranks(const GenerateArgs& a, const ModelConfig& config, Ranks& r) {
  // Under an MPI launcher every rank runs this same request in lockstep.
  const bool parallel = launched_by_mpi() || a.tp > 1 || a.ep > 0;
  ParallelConfig pc;
  if (parallel) {
    r.env = std::make_unique<MpiEnv>(nullptr, nullptr);
    r.world = make_mpi_world_communicator();
    pc.world = r.env->size();
    pc.rank = r.env->rank();
    pc.tp = a.tp;
    pc.ep = a.ep;
    pc.exchange = parse_moe_exchange(a.moe_exchange);
    pc.validate(config.layout_shape());  // before any weight is read
  }
  r.backend = make_backend(a.backend, r.world.get(), r.env ? r.env->local_rank() : 0);
  if (parallel) r.par = ParallelContext::create(pc, r.backend.world ? *r.backend.world : *r.world);
  r.root = r.env == nullptr || r.env->is_root();
  if (r.root && a.backend.device != "cpu")
    std::fprintf(stderr, "device: %s\n", r.backend.description.c_str());
}

// Rank 0's report after the text: the logits file, the ids, and the rates.
void report(const GenerateArgs& a, size_t n_prompt, const GenerateResult& result) {
  if (!a.logits_out.empty()) {
    std::ofstream out(a.logits_out, std::ios::binary);
    out.write(reinterpret_cast<const char*>(result.prompt_logits.data()),
              static_cast<std::streamsize>(result.prompt_logits.size() * sizeof(float)));
    SY_CHECK(out.good(), "cannot write --logits-out ", a.logits_out);
  }
  if (a.print_ids) {
    std::printf("ids:");
    for (int32_t id : result.tokens) std::printf(" %d", id);
    std::printf("\n");
  }
  const double n_gen = static_cast<double>(result.tokens.size());
  // The first generated token comes from the prefill logits: decode time covers the rest.
  const double decode_tps = n_gen > 1 ? (n_gen - 1) / result.decode_seconds : 0.0;
  std::printf(
      "prompt tokens: %zu, generated tokens: %zu, prefill: %.1f tok/s, decode: %.1f tok/s, "
      "finish: %s\n",
      n_prompt, result.tokens.size(), static_cast<double>(n_prompt) / result.prefill_seconds,
      decode_tps, result.finish_reason.c_str());
}

}  // namespace

int run_generate(const GenerateArgs& a) {
  SY_CHECK(!a.prompt.empty() || !a.prompt_ids.empty(), "give --prompt or --prompt-ids");
  SY_CHECK(a.prefill_chunk > 0, "--prefill-chunk ", a.prefill_chunk, " must be positive");
  a.backend.validate();
  const ModelConfig config = ModelConfig::load(a.model);
  std::unique_ptr<Tokenizer> tokenizer =
      Tokenizer::load(a.model, config.bos_token_id, config.eos_token_ids);
  std::vector<int32_t> prompt = a.prompt_ids.empty() ? tokenizer->encode(a.prompt, !a.no_bos)
                                                     : parse_ids(a.prompt_ids, "--prompt-ids");
  SY_CHECK(!prompt.empty(), "the prompt encodes to no tokens");
  const int64_t context = check_request(a, config, prompt);
  Ranks ranks;
  join_ranks(a, config, ranks);
  LoadedModel loaded = load_model(a.model, context, a.prefill_chunk, ranks.root, ranks.par.get(),
                                  ranks.backend.ops.get(), a.backend.weight_format());
  if (ranks.par != nullptr) print_layout(*ranks.par, config, loaded.model->weights());
  GenerateOptions options;
  options.max_tokens = a.max_tokens;
  options.sampling = a.sampling;
  options.sampling.logit_bias = parse_logit_bias(a.logit_bias, "--logit-bias");
  options.ignore_eos = a.ignore_eos;
  options.eos_ids = config.eos_token_ids;
  options.all_prompt_logits = !a.logits_out.empty();

  StreamDecoder decoder(*tokenizer, prompt);
  const bool root = ranks.root;
  GenerateResult result = generate(*loaded.model, prompt, options, [&](int32_t id) {
    if (!root) return;
    const std::string delta = decoder.push(id);
    std::fwrite(delta.data(), 1, delta.size(), stdout);
    std::fflush(stdout);
  });
  if (!root) return 0;
  const std::string tail = decoder.flush();
  std::fwrite(tail.data(), 1, tail.size(), stdout);
  std::printf("\n");
  report(a, prompt.size(), result);
  return 0;
}

}  // namespace sy::launch
