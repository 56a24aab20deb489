// The CUDA model with several ranks on one GPU (label gpu; skips without a CUDA device), under
// mpiexec -n W: all ranks share the GPU, so device tensors travel through MPI host staging
// (--comm mpi). Every layout and both MoE exchanges give the single-rank CUDA run's greedy
// tokens, and logits within 1e-2 of each row's largest |logit| (the ranks sum partial results
// in another order and round other intermediates to BF16 than one rank does). The single-rank
// comparison with the CPU backend and transformers is tests/runtime/test_cuda_model_single.cc.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "kernels/cuda/device.h"
#include "parallel/context.h"
#include "runtime/backend.h"
#include "runtime/generator.h"
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

// W ranks on one GPU through host staging: every layout, both exchanges, the same tokens as
// one rank.
TEST_F(CudaModel, RanksSharingOneGpuMatchOneRank) {
  BackendOptions opts;
  opts.device = "cuda";
  opts.comm = "mpi";
  // The test's ranks run on one node: node-local rank and size are the world's.
  Backend gpu = make_backend(opts, world_.get(), world_->rank());
  const int W = world_->size();
  for (const fs::path& dir : test::fixture_dirs()) {
    const ModelConfig config = ModelConfig::load(dir.string());
    LoadedModel single = load_model(dir.string(), 64, 16, false, nullptr, gpu.ops.get());
    for (const ParallelConfig& pc : test::parallel_layouts(W, world_->rank(), config)) {
      auto par = ParallelContext::create(pc, *gpu.world);
      LoadedModel multi = load_model(dir.string(), 64, 16, false, par.get(), gpu.ops.get());
      for (const test::FixturePrompt& p : test::load_prompts(dir, config.vocab_size)) {
        GenerateOptions o;
        o.max_tokens = static_cast<int64_t>(p.greedy.size());
        o.ignore_eos = true;
        o.all_prompt_logits = true;
        const GenerateResult a = generate(*single.model, p.ids, o);
        const GenerateResult b = generate(*multi.model, p.ids, o);
        EXPECT_EQ(a.tokens, b.tokens) << dir.filename() << " tp " << pc.tp << " ep " << pc.ep_size()
                                      << " " << moe_exchange_name(pc.exchange) << " " << p.name;
        EXPECT_LE(test::max_rel_error(b.prompt_logits, a.prompt_logits, config.vocab_size), 1e-2)
            << dir.filename() << " tp " << pc.tp << " ep " << pc.ep_size() << " "
            << moe_exchange_name(pc.exchange);
      }
    }
  }
}

}  // namespace
}  // namespace sy
