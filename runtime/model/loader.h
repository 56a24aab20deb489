// Loading a model directory onto a backend: its config, this rank's weights and a Model with the
// capacity asked for. Used by `switchyard generate`, `serve` and the tests.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "kernels/ops.h"
#include "parallel/context.h"
#include "runtime/model/config.h"
#include "runtime/model/model.h"
#include "runtime/model/weights.h"

namespace sy {

// The weights of `path`: a GGUF file (or the first of its splits), else a Hugging Face
// safetensors directory.
std::unique_ptr<WeightSource> open_weight_source(const std::string& path);

// A loaded model and, when the caller gave no backend, the CPU backend made for it.
struct LoadedModel {
  ModelConfig config;
  std::unique_ptr<Ops> ops;  // the CPU backend made when none was given
  std::unique_ptr<Model> model;
};

// Loads config, checkpoint and this rank's weights of `model_dir` (a directory, or a GGUF file) and
// builds a Model with room for one sequence of `max_context` tokens. `parallel` (not owned, may be
// null) selects this rank's shard; the layout is validated before any weight is read. `ops` (not
// owned) is the backend to load onto; null: a CPU backend owned by the result.
LoadedModel load_model(const std::string& model_dir, int64_t max_context,
                       int64_t max_tokens_per_step, bool show_progress,
                       const ParallelContext* parallel = nullptr, Ops* ops = nullptr,
                       WeightFormat format = WeightFormat::kAuto);
// The same for serving: a Model with the given capacity (many sequences, a shared KV cache).
// `config` is model_dir's config.json, already loaded (and the layout validated against it).
LoadedModel load_model(const std::string& model_dir, const ModelConfig& config,
                       const ModelLimits& limits, bool show_progress,
                       const ParallelContext* parallel = nullptr, Ops* ops = nullptr,
                       WeightFormat format = WeightFormat::kAuto);

}  // namespace sy
