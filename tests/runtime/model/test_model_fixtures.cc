// The CPU forward pass against Hugging Face transformers on the committed fixtures
// (tests/reference/make_fixtures.py): logits at every prompt position within 1e-4 relative to
// the row's largest logit, for whole-prompt prefill, chunked prefill and token-by-token decode,
// and identical greedy continuations.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/engine/generator.h"
#include "tests/common/fixtures.h"

namespace sy {
namespace {

namespace fs = std::filesystem;
constexpr double kRelTol = 1e-4;

using test::fixture_dirs;
using test::load_prompts;
using Prompt = test::FixturePrompt;

// Rows within kRelTol of the row's largest |logit|; prints the first 10 mismatches.
int64_t compare_logits(const std::string& what, const float* got, const float* want, int64_t n_rows,
                       int64_t vocab, double* max_rel) {
  int64_t n_wrong = 0;
  for (int64_t r = 0; r < n_rows; ++r) {
    double scale = 0;
    for (int64_t v = 0; v < vocab; ++v)
      scale = std::max(scale, std::fabs(double(want[r * vocab + v])));
    for (int64_t v = 0; v < vocab; ++v) {
      const double err = std::fabs(double(got[r * vocab + v]) - want[r * vocab + v]) / scale;
      *max_rel = std::max(*max_rel, err);
      if (!(err <= kRelTol)) {
        if (n_wrong < 10)
          std::printf("  %s row %lld vocab %lld: got %.7g want %.7g (rel %.3g)\n", what.c_str(),
                      (long long)r, (long long)v, got[r * vocab + v], want[r * vocab + v], err);
        ++n_wrong;
      }
    }
  }
  if (n_wrong) std::printf("%s: %lld wrong logits\n", what.c_str(), (long long)n_wrong);
  return n_wrong;
}

void check_fixture(const fs::path& dir, int64_t chunk, bool device_routing = false) {
  LoadedModel m = load_model(dir.string(), 64, chunk, false);
  if (device_routing) m.model->set_device_routing(int64_t{1} << 30);
  const int64_t vocab = m.config.vocab_size;
  auto prompts = load_prompts(dir, vocab);
  ASSERT_GE(prompts.size(), 3u) << dir;
  double max_rel = 0;
  for (const Prompt& p : prompts) {
    GenerateOptions o;
    o.max_tokens = static_cast<int64_t>(p.greedy.size());
    o.ignore_eos = true;
    o.all_prompt_logits = true;
    GenerateResult r = generate(*m.model, p.ids, o);
    const std::string what =
        dir.filename().string() + "/" + p.name + " chunk " + std::to_string(chunk);
    EXPECT_EQ(compare_logits(what, r.prompt_logits.data(), p.logits.data(),
                             static_cast<int64_t>(p.ids.size()), vocab, &max_rel),
              0)
        << what;
    EXPECT_EQ(r.tokens, p.greedy) << what << ": greedy continuation differs";
  }
  std::printf("%s, %lld-token steps: max relative logit error %.3g over %zu prompts\n",
              dir.filename().string().c_str(), (long long)chunk, max_rel, prompts.size());
}

TEST(ModelFixtures, FixturesArePresent) {
  EXPECT_GE(fixture_dirs().size(), 3u);
}

TEST(ModelFixtures, WholePromptPrefillMatchesTransformers) {
  for (const auto& dir : fixture_dirs()) check_fixture(dir, 64);
}

TEST(ModelFixtures, TokenByTokenDecodeMatchesTransformers) {
  for (const auto& dir : fixture_dirs()) check_fixture(dir, 1);
}

TEST(ModelFixtures, ChunkedPrefillMatchesTransformers) {
  for (const auto& dir : fixture_dirs()) check_fixture(dir, 7);
}

// The MoE block with its layout made through Ops::moe_route and the experts' row ranges read
// by Ops::grouped_matmul_offsets (the GPU's decode path), forced on the CPU backend.
TEST(ModelFixtures, DeviceRoutingPathMatchesTransformers) {
  for (const auto& dir : fixture_dirs()) {
    check_fixture(dir, 1, true);
    check_fixture(dir, 7, true);
  }
}

}  // namespace
}  // namespace sy
