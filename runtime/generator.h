// Single-request generation on one model: chunked prefill of the prompt, then token-by-token
// decode with sampling. Used by `switchyard generate` and by the tests.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "runtime/model.h"
#include "runtime/sampler.h"

namespace sy {

struct GenerateOptions {
  int64_t max_tokens = 16;         // tokens to generate at most
  SamplingParams sampling;         // greedy by default
  bool ignore_eos = false;         // keep going past an end-of-sequence token
  std::vector<int64_t> eos_ids;    // tokens that end generation (unless ignore_eos)
  bool all_prompt_logits = false;  // fill GenerateResult::prompt_logits
};

struct GenerateResult {
  std::vector<int32_t> tokens;       // generated ids (the EOS that ended it included)
  std::vector<float> prompt_logits;  // [n_prompt, vocab] when all_prompt_logits
  std::string finish_reason;         // "stop" (EOS) or "length"
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

// Loads config, checkpoint and this rank's weights of `model_dir` and builds a Model with
// room for one sequence of `max_context` tokens. `parallel` (not owned, may be null) selects
// this rank's shard; the layout is validated before any weight is read.
// `ops` (not owned) is the backend to load onto; null: a CPU backend owned by the result.
struct LoadedModel {
  ModelConfig config;
  std::unique_ptr<Ops> ops;  // the CPU backend made when none was given
  std::unique_ptr<Model> model;
};
LoadedModel load_model(const std::string& model_dir, int64_t max_context,
                       int64_t max_tokens_per_step, bool show_progress,
                       const ParallelContext* parallel = nullptr, Ops* ops = nullptr);
// The same for serving: a Model with the given capacity (many sequences, a shared KV cache).
// `config` is model_dir's config.json, already loaded (and the layout validated against it).
LoadedModel load_model(const std::string& model_dir, const ModelConfig& config,
                       const ModelLimits& limits, bool show_progress,
                       const ParallelContext* parallel = nullptr, Ops* ops = nullptr);

// Runs one request to completion. `on_token` is called with each generated id as it is sampled.
// With a parallel model every rank calls it with the same arguments; rank 0's sampled token is
// broadcast so all ranks continue in lockstep.
GenerateResult generate(Model& model, const std::vector<int32_t>& prompt,
                        const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token = nullptr);

}  // namespace sy
