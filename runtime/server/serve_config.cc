// ServeConfig (see serve_config.h).
#include "runtime/server/serve_config.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "kernels/error.h"

namespace sy {

void ServeConfig::validate() const {
  SY_CHECK(!model.empty(), "--model is required");
  SY_CHECK(!listen.empty(), "--listen is empty");
  SY_CHECK(max_batch_tokens > 0, "--max-batch-tokens ", max_batch_tokens, " must be positive");
  SY_CHECK(max_running > 0, "--max-running ", max_running, " must be positive");
  SY_CHECK(max_running <= max_batch_tokens, "--max-running ", max_running,
           " must be at most --max-batch-tokens ", max_batch_tokens,
           " (every running sequence may need a token in the same step)");
  // Every request passes through the queue, so a queue of 0 would refuse everything.
  SY_CHECK(max_queue_requests >= 1, "--max-queue-requests ", max_queue_requests,
           " must be at least 1");
  SY_CHECK(max_queue_tokens >= 1, "--max-queue-tokens ", max_queue_tokens, " must be at least 1");
  SY_CHECK(prompt_logit_rows >= 0, "prompt_logit_rows ", prompt_logit_rows, " must be >= 0");
  SY_CHECK(max_completions >= 1 && max_completions <= 1024, "--max-completions ", max_completions,
           " outside [1, 1024]");
  SY_CHECK(kv_blocks >= 0, "--kv-blocks ", kv_blocks, " must be >= 0 (0 = enough for ",
           "--max-running full contexts)");
  SY_CHECK(block_size > 0 && block_size <= 4096, "--block-size ", block_size, " outside [1, 4096]");
  SY_CHECK(max_context >= 0, "--max-context ", max_context, " must be >= 0");
  SY_CHECK(std::isfinite(grace_period_s) && grace_period_s >= 0, "--grace-period-s ",
           grace_period_s, " must be >= 0");
  SY_CHECK(http_listen.empty() || http_listen.find(':') != std::string::npos, "--http-listen '",
           http_listen, "' is not host:port");
  SY_CHECK(http_listen.empty() || http_listen != listen, "--http-listen ", http_listen,
           " is the gRPC --listen address too");
  SY_CHECK(
      std::isfinite(metrics_interval_s) && metrics_interval_s >= 0 && metrics_interval_s <= 3600,
      "--metrics-interval-s ", metrics_interval_s, " outside [0, 3600]");
  SY_CHECK(metrics_prefix == "switchyard:" || metrics_prefix == "switchyard_", "--metrics-prefix '",
           metrics_prefix, "' must be switchyard: or switchyard_");
  SY_CHECK(http_max_connections >= 1 && http_max_connections <= 65536, "--http-max-connections ",
           http_max_connections, " outside [1, 65536]");
  SY_CHECK(http_max_body_bytes >= 1024 && http_max_body_bytes <= (int64_t{1} << 30),
           "--http-max-body-bytes ", http_max_body_bytes, " outside [1024, 2^30]");
}

int64_t ServeConfig::context(const ModelConfig& config) const {
  SY_CHECK(max_context <= config.max_position_embeddings, "--max-context ", max_context,
           " exceeds the model's max_position_embeddings of ", config.max_position_embeddings);
  return max_context > 0 ? max_context : config.max_position_embeddings;
}

int64_t ServeConfig::context_limit(const ModelConfig& config) const {
  return Engine::context_limit_for(config, model_limits(config), max_batch_tokens);
}

int64_t ServeConfig::n_kv_blocks(const ModelConfig& config) const {
  if (kv_blocks > 0) return kv_blocks;
  const int64_t per_seq = (context(config) + block_size - 1) / block_size;
  return max_running * per_seq;
}

ModelLimits ServeConfig::model_limits(const ModelConfig& config) const {
  ModelLimits limits;
  limits.block_size = block_size;
  limits.max_blocks_per_seq = (context(config) + block_size - 1) / block_size;
  limits.n_blocks = n_kv_blocks(config);
  limits.max_seqs = max_running;
  limits.max_tokens = max_batch_tokens;
  limits.max_logit_rows = std::min(max_batch_tokens, max_running + prompt_logit_rows);
  limits.validate();
  return limits;
}

EngineOptions ServeConfig::engine_options() const {
  EngineOptions o;
  o.max_batch_tokens = max_batch_tokens;
  o.max_running = max_running;
  o.max_queue_requests = max_queue_requests;
  o.max_queue_tokens = max_queue_tokens;
  o.max_completions = max_completions;
  o.report_interval_s = metrics_interval_s;
  o.prefix_caching = prefix_caching;
  return o;
}

uint64_t ServeConfig::kv_cache_bytes(const ModelConfig& config, int tp,
                                     size_t bytes_per_value) const {
  // K and V, per layer [n_blocks, block_size, n_kv_heads / tp, head_dim].
  const uint64_t per_token = 2ull * static_cast<uint64_t>(config.num_hidden_layers) *
                             static_cast<uint64_t>(config.kv_dim() / tp) * bytes_per_value;
  return per_token * static_cast<uint64_t>(n_kv_blocks(config) * block_size);
}

std::vector<std::pair<std::string, std::string>> ServeConfig::table(const ModelConfig& config,
                                                                    int tp,
                                                                    size_t bytes_per_value) const {
  auto mib = [](uint64_t bytes) { return std::to_string((bytes + (1u << 20) - 1) >> 20) + " MiB"; };
  std::ostringstream grace;
  grace << grace_period_s;
  return {
      {"model", model},
      {"listen", listen},
      {"max_batch_tokens", std::to_string(max_batch_tokens)},
      {"max_running", std::to_string(max_running)},
      {"max_queue_requests", std::to_string(max_queue_requests)},
      {"max_queue_tokens", std::to_string(max_queue_tokens)},
      {"max_completions", std::to_string(max_completions)},
      {"prompt_logit_rows", std::to_string(model_limits(config).max_logit_rows - max_running)},
      {"context_limit_tokens", std::to_string(context_limit(config))},
      {"block_size", std::to_string(block_size)},
      {"kv_blocks", std::to_string(n_kv_blocks(config))},
      {"kv_cache_per_rank", mib(kv_cache_bytes(config, tp, bytes_per_value))},
      {"prefix_caching", prefix_caching ? "on" : "off"},
      {"grace_period_s", grace.str()},
      {"http_listen", http_listen.empty() ? "off" : http_listen},
      {"served_model_name", model_name()},
      {"api_key", api_key.empty() ? "none" : "set"},
  };
}

}  // namespace sy
