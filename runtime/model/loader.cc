// Loading a model directory (see loader.h).
#include "runtime/model/loader.h"

#include <algorithm>

#include "runtime/formats/safetensors.h"
#include "runtime/model/gguf_model.h"
#include "runtime/model/weights.h"

namespace sy {

std::unique_ptr<WeightSource> open_weight_source(const std::string& path) {
  if (is_gguf_path(path)) return open_gguf_source(path);
  return open_safetensors_source(path);
}

LoadedModel load_model(const std::string& model_dir, int64_t max_context,
                       int64_t max_tokens_per_step, bool show_progress,
                       const ParallelContext* parallel, Ops* ops, WeightFormat format) {
  const ModelConfig config = ModelConfig::load(model_dir);
  if (parallel != nullptr) parallel->config.validate(config.layout_shape());
  SY_CHECK(max_context > 0 && max_context <= config.max_position_embeddings, "context of ",
           max_context,
           " tokens outside [1, max_position_embeddings = ", config.max_position_embeddings, "]");
  ModelLimits limits;
  limits.block_size = 16;
  limits.max_blocks_per_seq = (max_context + limits.block_size - 1) / limits.block_size;
  limits.n_blocks = limits.max_blocks_per_seq;
  limits.max_seqs = 1;
  limits.max_tokens = std::max<int64_t>(1, std::min(max_tokens_per_step, max_context));
  limits.max_logit_rows = limits.max_tokens;
  return load_model(model_dir, config, limits, show_progress, parallel, ops, format);
}

LoadedModel load_model(const std::string& model_dir, const ModelConfig& config,
                       const ModelLimits& limits, bool show_progress,
                       const ParallelContext* parallel, Ops* ops, WeightFormat format) {
  LoadedModel m;
  m.config = config;
  if (parallel != nullptr) parallel->config.validate(m.config.layout_shape());
  limits.validate();
  std::unique_ptr<WeightSource> source = open_weight_source(model_dir);
  if (ops == nullptr) {
    m.ops = make_cpu_ops();
    ops = m.ops.get();
  }
  Weights weights =
      Weights::load(*source, m.config, shard_for(m.config, parallel), *ops, show_progress, format);
  m.model = std::make_unique<Model>(m.config, std::move(weights), *ops, limits, parallel);
  return m;
}

}  // namespace sy
