// ServeConfig: what `switchyard serve` is asked to do: the model, the listening address, the batch
// and KV-cache budgets, the admission limits and the shutdown grace period. A plain struct with
// validate(); it derives the engine's options and the model's capacity (ModelLimits).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "runtime/engine/engine.h"
#include "runtime/model/config.h"
#include "runtime/model/model.h"

namespace sy {

struct ServeConfig {
  std::string model;                       // model directory (Hugging Face layout)
  std::string listen = "127.0.0.1:50051";  // host:port of the gRPC server (rank 0)
  int64_t max_batch_tokens = 256;          // tokens per step: prefill chunks + decode tokens
  int64_t max_running = 64;                // sequences holding KV blocks at once
  int64_t max_queue_requests = 256;        // requests waiting for admission; past it refused
  int64_t max_queue_tokens = 1 << 20;      // prompt tokens of waiting requests; likewise
  int64_t max_completions = 16;            // completions one Generate call may ask for (its n)
  int64_t prompt_logit_rows = 64;  // logit rows of a step for prompt logprobs (at most the step)
  int64_t kv_blocks = 0;           // KV blocks per rank; 0 = max_running full contexts
  int64_t block_size = 16;         // tokens per KV block
  int64_t max_context = 0;         // prompt + generated tokens of a request; 0 = model's
  double grace_period_s = 30;      // after a drain signal, seconds until requests stop
  bool prefix_caching = true;      // reuse the KV blocks of prompts' shared prefixes
  // The OpenAI-compatible HTTP server (rank 0, beside gRPC): host:port, empty = none.
  std::string http_listen;
  std::string served_model_name;  // the model's id in the HTTP API; empty = the --model path
  std::string api_key;            // HTTP: needed as "Authorization: Bearer <key>"; empty = none
  std::string chat_template;      // a Jinja file; empty = the checkpoint's own (if any)
  std::string metrics_prefix = "switchyard:";
  double metrics_interval_s = 1;       // between the steps that gather every rank's figures  // or
                                       // "switchyard_" (promtool's linter)
  int64_t http_max_connections = 512;  // open HTTP connections; past it 503
  int64_t http_max_body_bytes = 8 << 20;  // an HTTP request body; past it 413

  // Throws naming the offending flag and its value. Needs no model.
  void validate() const;
  // served_model_name, or the model path.
  std::string model_name() const { return served_model_name.empty() ? model : served_model_name; }
  // The context limit of one request for `config`: max_context, or max_position_embeddings.
  int64_t context(const ModelConfig& config) const;
  // Prompt plus generated tokens of one request at most, by the engine's rule
  // (Engine::context_limit_for): context() rounded up to whole KV blocks, at most
  // max_position_embeddings and, unless a sliding window lets a request hold fewer blocks than
  // its length, the whole KV cache.
  int64_t context_limit(const ModelConfig& config) const;
  // KV blocks per rank: kv_blocks, or enough for max_running sequences of the whole context.
  int64_t n_kv_blocks(const ModelConfig& config) const;
  // The model's capacity: one step of max_batch_tokens tokens over max_running sequences, with a
  // logit row for each and prompt_logit_rows more (as the step's tokens allow).
  ModelLimits model_limits(const ModelConfig& config) const;
  EngineOptions engine_options() const;
  // KV cache bytes per rank for `config` sharded over `tp` attention ranks (fp32 on the CPU).
  // `bytes_per_value`: 4 for the CPU backend's fp32 cache, 2 for bf16 on GPUs.
  uint64_t kv_cache_bytes(const ModelConfig& config, int tp, size_t bytes_per_value = 4) const;
  // "name value" rows for the start-up table.
  std::vector<std::pair<std::string, std::string>> table(const ModelConfig& config, int tp,
                                                         size_t bytes_per_value = 4) const;
};

}  // namespace sy
