// The CUDA model with several ranks (label gpu; skips without a CUDA device; also run on the CUDA
// emulator as mpi.emu.*), under mpiexec -n W: ranks sharing one GPU, whose device tensors travel
// through MPI host staging (--comm mpi), and ranks with a GPU each over NCCL on the compute stream
// (skipped with fewer GPUs than ranks; on the emulator SY_CUDA_EMU_DEVICES gives each rank one),
// whose decode steps run as CUDA graphs. Every layout and both MoE exchanges give the single-rank
// CUDA run's greedy tokens, and logits within 1e-4 of each row's largest |logit|.
// The storage dtype is F32, so that the ranks differ from one rank only in the order of fp32 sums:
// with BF16 they also round other intermediates, which may break a near-tie of the router the
// other way (tests/runtime/test_cuda_model_single.cc bounds BF16 against the CPU).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "kernels/cuda/device.h"
#include "kernels/error.h"
#include "parallel/context.h"
#include "runtime/engine/generator.h"
#include "runtime/model/backend.h"
#include "tests/common/compare.h"
#include "tests/common/fixtures.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

class CudaModel : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
    world_ = make_mpi_world_communicator();
  }
  std::unique_ptr<Communicator> world_;
};

// Every layout the world allows and both exchanges on `gpu` give the single-rank run's tokens.
// With `graphs` (stream-ordered collectives) the all-gather exchange's decode steps run as graph
// launches; the all-to-all exchange (host layout) and host staging never do.
void check_layouts(Backend& gpu, Communicator& world, bool graphs) {
  const int W = world.size();
  // SY_TEST_MAX_PROMPTS (the emulator's runs) takes the first prompts of each fixture only.
  const char* max_env = std::getenv("SY_TEST_MAX_PROMPTS");
  const size_t max_prompts = max_env != nullptr ? std::stoul(max_env) : SIZE_MAX;
  for (const fs::path& dir : test::fixture_dirs()) {
    const ModelConfig config = ModelConfig::load(dir.string());
    std::vector<test::FixturePrompt> prompts = test::load_prompts(dir, config.vocab_size);
    if (prompts.size() > max_prompts) prompts.resize(max_prompts);
    GenerateOptions o;
    o.ignore_eos = true;
    o.all_prompt_logits = true;
    std::vector<GenerateResult> want;  // one rank
    {
      LoadedModel single = load_model(dir.string(), 64, 16, false, nullptr, gpu.ops.get());
      for (const test::FixturePrompt& p : prompts) {
        o.max_tokens = static_cast<int64_t>(p.greedy.size());
        want.push_back(generate(*single.model, p.ids, o));
      }
    }
    for (const ParallelConfig& pc : test::parallel_layouts(W, world.rank(), config)) {
      auto par = ParallelContext::create(pc, *gpu.world);
      LoadedModel multi = load_model(dir.string(), 64, 16, false, par.get(), gpu.ops.get());
      const std::string layout = detail::concat(dir.filename().string(), " tp ", pc.tp, " ep ",
                                                pc.ep_size(), " ", moe_exchange_name(pc.exchange));
      int64_t n_decode = 0;
      for (size_t i = 0; i < prompts.size(); ++i) {
        const test::FixturePrompt& p = prompts[i];
        o.max_tokens = static_cast<int64_t>(p.greedy.size());
        n_decode += o.max_tokens - 1;
        const GenerateResult got = generate(*multi.model, p.ids, o);
        EXPECT_EQ(got.tokens, want[i].tokens) << layout << " " << p.name;
        EXPECT_LE(test::max_rel_error(got.prompt_logits, want[i].prompt_logits, config.vocab_size),
                  1e-4)
            << layout << " " << p.name;
      }
      // Decode steps of one shape: the first runs eagerly, the second records, the rest replay.
      const bool recorded = graphs && pc.exchange == MoeExchange::kAllGather && n_decode >= 2;
      if (recorded)
        EXPECT_GE(multi.model->graph_steps(), n_decode - static_cast<int64_t>(prompts.size()))
            << layout;
      else
        EXPECT_EQ(multi.model->graph_steps(), 0) << layout;
    }
  }
}

// W ranks on one GPU through host staging: every layout, both exchanges, the same tokens as
// one rank; no graphs (staging copies through the host).
TEST_F(CudaModel, RanksSharingOneGpuMatchOneRank) {
  BackendOptions opts;
  opts.device = "cuda";
  opts.comm = "mpi";
  opts.dtype = "f32";
  // The test's ranks run on one node: node-local rank and size are the world's.
  Backend gpu = make_backend(opts, world_.get(), world_->rank());
  check_layouts(gpu, *world_, false);
}

// W ranks with a GPU each, over NCCL on the compute stream: the same tokens as one rank, and the
// decode steps of the all-gather exchange recorded and replayed as CUDA graphs, collectives
// included.
TEST_F(CudaModel, RanksWithAGpuEachOverNcclMatchOneRank) {
  const int W = world_->size();
  // Every rank decides alike (one device count per node, all ranks on one node).
  if (cuda::device_count() < W)
    GTEST_SKIP() << "fewer GPUs (" << cuda::device_count() << ") than ranks (" << W << ") for NCCL";
  BackendOptions opts;
  opts.device = "cuda";
  opts.comm = "nccl";
  opts.dtype = "f32";
  Backend gpu = make_backend(opts, world_.get(), world_->rank());
  ASSERT_TRUE(gpu.world->stream_ordered());
  check_layouts(gpu, *world_, true);
}

}  // namespace
}  // namespace sy
