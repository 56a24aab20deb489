// The transformers reference fixtures (tests/fixtures/<model>/reference.json and logits files),
// read by the single-rank and the multi-rank model tests.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "parallel/layout.h"
#include "runtime/model/config.h"

namespace sy::test {

struct FixturePrompt {
  std::string name;
  std::vector<int32_t> ids;
  std::vector<float> logits;  // [n, vocab] from transformers
  std::vector<int32_t> greedy;
};

// Model directories with a reference.json; SY_FIXTURES_DIR in the environment points the tests
// at other reference models laid out the same way.
inline std::vector<std::filesystem::path> fixture_dirs() {
  const char* env = std::getenv("SY_FIXTURES_DIR");
  std::vector<std::filesystem::path> dirs;
  for (const auto& e : std::filesystem::directory_iterator(env != nullptr ? env : SY_FIXTURES_DIR))
    if (e.is_directory() && std::filesystem::exists(e.path() / "reference.json"))
      dirs.push_back(e.path());
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

inline std::vector<FixturePrompt> load_prompts(const std::filesystem::path& dir, int64_t vocab) {
  std::ifstream in(dir / "reference.json");
  auto j = nlohmann::json::parse(in);
  std::vector<FixturePrompt> prompts;
  for (const auto& p : j.at("prompts")) {
    FixturePrompt pr;
    pr.name = p.value("name", "");
    pr.ids = p.at("ids").get<std::vector<int32_t>>();
    pr.greedy = p.at("greedy").get<std::vector<int32_t>>();
    std::ifstream bin(dir / p.at("logits").get<std::string>(), std::ios::binary);
    pr.logits.resize(pr.ids.size() * static_cast<size_t>(vocab));
    bin.read(reinterpret_cast<char*>(pr.logits.data()),
             static_cast<std::streamsize>(pr.logits.size() * sizeof(float)));
    EXPECT_TRUE(bin.good()) << "short logits file for " << dir << " " << pr.name;
    prompts.push_back(std::move(pr));
  }
  return prompts;
}

// Every layout (tp, ep, MoE exchange) the world allows for `config`, as seen from `rank`.
inline std::vector<ParallelConfig> parallel_layouts(int world, int rank,
                                                    const ModelConfig& config) {
  std::vector<ParallelConfig> out;
  for (int tp = 1; tp <= world; ++tp) {
    if (world % tp || config.num_key_value_heads % tp) continue;
    for (int ep = 1; ep <= world; ++ep) {
      if (world % ep || ep > config.num_local_experts) continue;
      for (MoeExchange ex : {MoeExchange::kAllToAll, MoeExchange::kAllGather}) {
        ParallelConfig pc;
        pc.world = world;
        pc.rank = rank;
        pc.tp = tp;
        pc.ep = ep;
        pc.exchange = ex;
        out.push_back(pc);
      }
    }
  }
  return out;
}

}  // namespace sy::test
