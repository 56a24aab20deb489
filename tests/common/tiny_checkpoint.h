// The seeded tiny checkpoint of the quantized-weight tests: the built-in tiny model's shapes
// (hidden 256, so every linear weight holds whole blocks of every GGML type, Q4_K's 256
// included) with 2 layers of 4 experts of 256, bf16, written once per test binary into its temp
// directory. tests/reference/make_llamacpp_fixture.py writes the same checkpoint with
// `switchyard make-tiny-model` for llama.cpp to quantize (tests/fixtures/gguf/tiny_q4_k_m.gguf):
// keep the two in step.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "runtime/model/tiny_model.h"

namespace sy::test {

inline const std::string& tiny_checkpoint() {
  static const std::string dir = [] {
    const std::string d = (std::filesystem::path(testing::TempDir()) / "tiny_checkpoint").string();
    std::ifstream in(std::string(SY_FIXTURES_DIR) + "/../../launch/tiny_corpus.txt");
    const std::string corpus{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    EXPECT_FALSE(corpus.empty());
    TinyModelOptions o = TinyModelOptions::defaults();
    o.seed = 20;
    o.config.num_hidden_layers = 2;
    o.config.num_local_experts = 4;
    o.config.intermediate_size = 256;
    write_tiny_model(d, o, corpus);
    return d;
  }();
  return dir;
}

}  // namespace sy::test
