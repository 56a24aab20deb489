// The CUDA backend end to end on one GPU (label gpu; every test skips without a CUDA device, and
// runs on the CUDA emulator as emu.*): every transformers fixture, every prompt, against the CPU
// backend (fp32 throughout) and transformers.
//
// Each prompt is extended by the CPU's greedy continuation and run teacher-forced (one prefill of
// prompt + continuation, in chunks of 7 tokens), so every row's logits are compared on the same
// context; the row at position i predicts token i + 1. Then `generate` runs on the GPU, through
// decode steps (device routing, CUDA graphs, device sampling), and its tokens are compared with
// the CPU's.
//
// F32 storage (--dtype f32): the GPU differs from the CPU only in the order of fp32 arithmetic
// (cuBLAS and block reductions) and CUDA's libm (a few ulp): every row within kF32Budget = 1e-4
// of its largest |logit| (errors of ~1e-6 per op over 2-4 layers stay below 1e-5; a wrong kernel
// errs by 1e-2 and more) and every greedy token identical, except at a step whose CPU top-2
// margin is within that budget. Transformers gets twice the budget (the CPU's own 1e-4 on top).
//
// Sampling and serving (F32 storage, one fixture): generate() with seeded sampling on the GPU
// (Ops::sample, the host sampler's stream of draws) and the serving engine (continuous batching,
// graphs, device sampling from the engine's thread) give each request the CPU's tokens. Logits
// differ by ~1e-6 only, so a draw would have to fall that close to a boundary to differ.
//
// BF16 storage (the serving default): weights, KV cache and every GEMM input rounded to bf16
// (relative error <= 2^-9 each). Over 2-4 layers this moves the logits by about 1e-2 of the
// largest, so kBf16Budget = 4e-2. One effect has no such bound: a token whose router sees two
// experts nearly tied (within the rounding) may pick the other one, and from then on the two
// backends compute different (both valid) functions; that token's row moves by O(1) and later
// rows attend to it. So both runs record their routing (Model::set_routing_trace), and:
//   - every row before the first token whose expert set differs is within kBf16Budget, and so
//     is the median row (past a difference, rows are not bounded one by one);
//   - over all fixtures, at most 5% of (token, layer) routing decisions differ (0.67% do on the
//     emulator; a broken router or GEMM changes most of them);
//   - greedy tokens are identical up to the first step that is a close call: the CPU's top-2
//     margin within kBf16Budget, or at or past the first routing difference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <vector>

#include "kernels/cuda/device.h"
#include "runtime/engine/generator.h"
#include "runtime/model/backend.h"
#include "runtime/model/loader.h"
#include "tests/common/compare.h"
#include "tests/common/engine_check.h"
#include "tests/common/fixtures.h"
#include "tests/common/routing.h"

namespace sy {
namespace {

namespace fs = std::filesystem;
constexpr double kF32Budget = 1e-4;
constexpr double kBf16Budget = 4e-2;
constexpr int64_t kChunk = 7;  // prefill tokens per step (load_model's max_tokens_per_step)

// Margin between the two largest logits of a row, relative to its largest |logit|.
double top2_margin(const float* row, int64_t vocab) {
  double a = -1e30, b = -1e30, scale = 1e-30;
  for (int64_t v = 0; v < vocab; ++v) {
    const double x = row[v];
    scale = std::max(scale, std::fabs(x));
    if (x > a) {
      b = a;
      a = x;
    } else if (x > b) {
      b = x;
    }
  }
  return (a - b) / scale;
}

int64_t argmax(const float* row, int64_t vocab) {
  return std::max_element(row, row + vocab) - row;
}

void check_fixtures(const std::string& dtype) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const bool bf16 = dtype == "bf16";
  const double budget = bf16 ? kBf16Budget : kF32Budget;
  BackendOptions opts;
  opts.device = "cuda";
  opts.dtype = dtype;
  Backend gpu = make_backend(opts, nullptr, 0);
  int close_calls = 0, rows_total = 0, rows_past_divergence = 0;
  double decisions = 0, decisions_differing = 0;
  for (const fs::path& dir : test::fixture_dirs()) {
    const ModelConfig config = ModelConfig::load(dir.string());
    const int64_t V = config.vocab_size;
    LoadedModel cpu = load_model(dir.string(), 64, kChunk, false);
    LoadedModel cuda = load_model(dir.string(), 64, kChunk, false, nullptr, gpu.ops.get());
    for (const test::FixturePrompt& p : test::load_prompts(dir, V)) {
      const std::string what = dir.filename().string() + "/" + p.name;
      const int64_t n_prompt = static_cast<int64_t>(p.ids.size());
      GenerateOptions o;
      o.max_tokens = static_cast<int64_t>(p.greedy.size());
      o.ignore_eos = true;
      const std::vector<int32_t> cont = generate(*cpu.model, p.ids, o).tokens;
      std::vector<int32_t> seq = p.ids;
      seq.insert(seq.end(), cont.begin(), cont.end() - 1);
      const int64_t n = static_cast<int64_t>(seq.size());

      const test::TracedLogits want = test::traced_prompt_logits(*cpu.model, seq);
      const test::TracedLogits got = test::traced_prompt_logits(*cuda.model, seq);
      const test::RoutingDifference route = test::routing_difference(
          got.trace, want.trace, n, config.num_hidden_layers, config.num_experts_per_tok, kChunk);
      const std::vector<double> err = test::row_rel_errors(got.logits, want.logits, V);
      ASSERT_EQ(err.size(), static_cast<size_t>(n)) << what;
      const std::vector<float> got_prompt(got.logits.begin(), got.logits.begin() + n_prompt * V);
      const double err_ref = test::max_rel_error(got_prompt, p.logits, V);
      double err_before = 0, err_all = 0;
      for (int64_t r = 0; r < n; ++r) {
        if (r < route.first) err_before = std::max(err_before, err[static_cast<size_t>(r)]);
        err_all = std::max(err_all, err[static_cast<size_t>(r)]);
      }
      std::vector<double> sorted = err;
      std::sort(sorted.begin(), sorted.end());
      const double err_median = sorted[sorted.size() / 2];
      rows_total += static_cast<int>(n);
      rows_past_divergence += static_cast<int>(n - route.first);
      decisions += static_cast<double>(n * config.num_hidden_layers);
      decisions_differing += route.share * static_cast<double>(n * config.num_hidden_layers);
      std::printf(
          "%-30s %s rows %2lld: logits vs cpu %.2e (before the first routing difference "
          "%.2e), vs transformers %.2e; routing differs at %.1f%% of decisions%s\n",
          what.c_str(), dtype.c_str(), static_cast<long long>(n), err_all, err_before, err_ref,
          100 * route.share,
          route.first < n ? (", first at token " + std::to_string(route.first)).c_str() : "");
      if (bf16) {
        EXPECT_LE(err_before, budget) << what;
        EXPECT_LE(err_median, budget) << what;
      } else {
        EXPECT_EQ(route.first, n) << what << ": routing differs in fp32";
        EXPECT_LE(err_all, budget) << what;
        EXPECT_LE(err_ref, 2 * budget) << what;
      }

      // Greedy tokens: teacher-forced argmax, and the GPU's own decode steps.
      const std::vector<int32_t> decoded = generate(*cuda.model, p.ids, o).tokens;
      ASSERT_EQ(decoded.size(), cont.size()) << what;
      for (size_t i = 0; i < cont.size(); ++i) {
        const int64_t row = n_prompt - 1 + static_cast<int64_t>(i);
        const float* cpu_row = want.logits.data() + row * V;
        if (top2_margin(cpu_row, V) <= budget || row >= route.first) {
          ++close_calls;
          break;
        }
        EXPECT_EQ(argmax(got.logits.data() + row * V, V), cont[i]) << what << " step " << i;
        ASSERT_EQ(decoded[i], cont[i]) << what << " decode step " << i;
      }
    }
  }
  const double share = decisions_differing / std::max(decisions, 1.0);
  std::printf(
      "%s: greedy comparisons ended early by a close call: %d; rows at or past a routing "
      "difference: %d of %d; routing decisions differing: %.2f%%\n",
      dtype.c_str(), close_calls, rows_past_divergence, rows_total, 100 * share);
  EXPECT_LE(share, 0.05);
}

TEST(CudaModel, F32StorageMatchesCpuAndTransformersOnEveryFixture) {
  check_fixtures("f32");
}

TEST(CudaModel, Bf16StorageWithinBudgetOnEveryFixture) {
  check_fixtures("bf16");
}

TEST(CudaModel, F32SampledGenerateAndEngineMatchCpu) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  BackendOptions opts;
  opts.device = "cuda";
  opts.dtype = "f32";
  Backend gpu = make_backend(opts, nullptr, 0);
  const std::string dir = std::string(SY_FIXTURES_DIR) + "/window_gqa4";
  const ModelConfig config = ModelConfig::load(dir);
  LoadedModel cpu = load_model(dir, 128, 64, false);
  {
    LoadedModel cuda = load_model(dir, 64, kChunk, false, nullptr, gpu.ops.get());
    for (const test::FixturePrompt& p : test::load_prompts(dir, config.vocab_size)) {
      GenerateOptions o;
      o.max_tokens = 10;
      o.ignore_eos = true;
      o.sampling.temperature = 0.9f;
      o.sampling.top_k = 20;
      o.sampling.top_p = 0.9f;
      o.sampling.min_p = 0.01f;
      o.sampling.seed = 7;
      EXPECT_EQ(generate(*cuda.model, p.ids, o).tokens, generate(*cpu.model, p.ids, o).tokens)
          << p.name;
    }
    // Penalties (applied on the device), greedy and sampled as above; they must change
    // some prompt's tokens, or it went unapplied on both sides. Sampled tokens match only while
    // no draw lands within the backends' logit differences of a boundary of the kept tokens'
    // distribution: sampling the whole vocabulary, one did (short_text's second token with
    // OpenBLAS on one thread, as launch/test runs it); the top-k 20, top-p 0.9 cut keeps fewer
    // boundaries.
    bool changed = false;
    for (const test::FixturePrompt& p : test::load_prompts(dir, config.vocab_size)) {
      for (float temperature : {0.f, 0.9f}) {
        GenerateOptions o;
        o.max_tokens = 12;
        o.ignore_eos = true;
        o.sampling.temperature = temperature;
        o.sampling.top_k = 20;
        o.sampling.top_p = 0.9f;
        o.sampling.seed = 7;
        const std::vector<int32_t> plain = generate(*cpu.model, p.ids, o).tokens;
        o.sampling.repetition_penalty = 1.5f;
        o.sampling.presence_penalty = 0.5f;
        o.sampling.frequency_penalty = 0.25f;
        const std::vector<int32_t> want = generate(*cpu.model, p.ids, o).tokens;
        EXPECT_EQ(generate(*cuda.model, p.ids, o).tokens, want)
            << p.name << " penalised, temperature " << temperature;
        changed = changed || want != plain;
      }
    }
    EXPECT_TRUE(changed) << "the penalties changed no tokens";
  }

  test::expect_engine_matches_each_request_alone(*gpu.ops);
}

// The MoE counts (for the server's metrics) are the same whether the layout is made on the host
// or, for small steps, on the device (tallied there and read when taken): every forwarded token
// top-k times per layer.
TEST(CudaModel, MoeCountsOnTheHostAndTheDeviceAgree) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  BackendOptions opts;
  opts.device = "cuda";
  opts.dtype = "f32";
  Backend gpu = make_backend(opts, nullptr, 0);
  const std::string dir = std::string(SY_FIXTURES_DIR) + "/window_gqa4";
  const ModelConfig config = ModelConfig::load(dir);
  LoadedModel cpu = load_model(dir, 128, 64, false);
  LoadedModel cuda = load_model(dir, 64, kChunk, false, nullptr, gpu.ops.get());
  GenerateOptions o;
  o.max_tokens = 9;
  o.ignore_eos = true;
  const std::vector<int32_t> prompt = {1, 50, 60, 70, 80};
  generate(*cpu.model, prompt, o);
  generate(*cuda.model, prompt, o);
  const MoeCounters host = cpu.model->take_moe_counters();
  const MoeCounters device = cuda.model->take_moe_counters();
  EXPECT_EQ(device.expert_tokens, host.expert_tokens) << "decode steps routed on the device";
  const int64_t forwarded = 5 + 9 - 1;
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    int64_t routed = 0;
    for (int64_t e = 0; e < config.num_local_experts; ++e)
      routed += host.expert_tokens[static_cast<size_t>(l * config.num_local_experts + e)];
    EXPECT_EQ(routed, forwarded * config.num_experts_per_tok) << "layer " << l;
  }
  const MoeCounters again = cuda.model->take_moe_counters();
  EXPECT_EQ(std::count(again.expert_tokens.begin(), again.expert_tokens.end(), 0),
            static_cast<std::ptrdiff_t>(again.expert_tokens.size()))
      << "taking them starts again from zero";
}

// Quantized CPU weight types are not a GPU format: the flag is refused before anything is
// loaded, and Weights::load refuses them on CUDA ops too, naming the flag and the way out.
TEST(CudaModel, QuantizedWeightsAreAClearErrorOnCuda) {
  BackendOptions opts;
  opts.device = "cuda";
  for (const char* w : {"q8_0", "q4_0", "q4_k"}) {
    opts.weights = w;
    try {
      opts.validate();
      ADD_FAILURE() << w << " accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--device cpu"), std::string::npos) << e.what();
    }
  }
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  opts.weights = "auto";
  Backend gpu = make_backend(opts, nullptr, 0);
  const std::string dir = std::string(SY_FIXTURES_DIR) + "/window_gqa4";
  try {
    load_model(dir, 64, kChunk, false, nullptr, gpu.ops.get(), WeightFormat::kQ4_K);
    ADD_FAILURE() << "q4_k weights loaded on CUDA";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--weights q4_k"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--device cpu"), std::string::npos) << e.what();
  }
  // A GGUF file's quantized tensors are dequantized to the GPU's bf16 (auto).
  LoadedModel from_gguf = load_model(std::string(SY_FIXTURES_DIR) + "/gguf/window_q8_0.gguf", 64,
                                     kChunk, false, nullptr, gpu.ops.get());
  EXPECT_EQ(from_gguf.model->weights().layers.front().wq.dtype, DType::kBF16);
}

}  // namespace
}  // namespace sy
