// Seeded random Mixtral-architecture checkpoints in the Hugging Face layout, for the built-in
// tiny model of `launch/serve` and for tests and benchmarks (`switchyard make-tiny-model`).
#pragma once

#include <cstdint>
#include <string>

#include "runtime/model/config.h"

namespace sy {

struct TinyModelOptions {
  uint64_t seed = 0;
  ModelConfig config;                   // shapes; vocab_size is the tokenizer's size
  uint64_t max_shard_bytes = 8u << 20;  // shards above this size are split (index written)
  // A sentencepiece tokenizer.model to copy instead of training one on the corpus (its piece
  // count must be config.vocab_size), e.g. the real Mixtral tokenizer for benchmarks.
  std::string tokenizer_model;

  // The defaults of the built-in tiny model.
  static TinyModelOptions defaults();
};

// Writes config.json, generation_config.json, tokenizer.model (trained on `corpus`, or copied),
// tokenizer_config.json and the (sharded) safetensors into `dir`, creating it.
void write_tiny_model(const std::string& dir, const TinyModelOptions& options,
                      const std::string& corpus);

}  // namespace sy
