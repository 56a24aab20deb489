// The routed communicator of GPU ranks (parallel/routed_communicator.h) under mpiexec -n W, on
// the CPU: a stand-in backend ("staging ops") keeps its memory on the host but labels its tensors
// as device tensors, so every collective of the model takes the host-staging path that several
// ranks sharing one GPU take (copy out, MPI, copy back). Checked: each collective against the
// plain MPI communicator on the same data (exactly), host tensors still going straight to MPI,
// mixed host/device operands refused, and the whole parallel forward pass through staging
// giving exactly the logits and tokens of the plain run, for every layout and both exchanges
// (with the all-gather exchange through the device-routing MoE block of GPU decode steps).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "parallel/context.h"
#include "parallel/routed_communicator.h"
#include "runtime/engine/generator.h"
#include "tests/common/fixtures.h"
#include "tests/common/forwarding_ops.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

// CPU kernels and host memory, presented as a device backend: tensors it makes say kCuda, and
// copies to and from the "device" are counted.
class StagingOps final : public test::ForwardingOps {
 public:
  Device device() const override { return Device::kCuda; }
  void copy_from_host(void* dst, const void* src, size_t bytes) override {
    ++copies_in;
    ForwardingOps::copy_from_host(dst, src, bytes);
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    ++copies_out;
    ForwardingOps::copy_to_host(dst, src, bytes);
  }

  int64_t copies_in = 0;
  int64_t copies_out = 0;
};

class RoutedCommunicator : public ::testing::Test {
 protected:
  void SetUp() override {
    world_ = make_mpi_world_communicator();
    routed_ = make_routed_communicator(*world_, nullptr, ops_);
  }
  // A "device" tensor over `v`.
  static Tensor dev(std::vector<float>& v, int64_t rows) {
    return Tensor(v.data(), DType::kF32, {rows, static_cast<int64_t>(v.size()) / rows},
                  Device::kCuda);
  }
  static Tensor host(std::vector<float>& v, int64_t rows) {
    return Tensor(v.data(), DType::kF32, {rows, static_cast<int64_t>(v.size()) / rows});
  }
  std::vector<float> seeded(size_t n, int salt) const {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i)
      v[i] =
          static_cast<float>((i * 7 + static_cast<size_t>(world_->rank()) * 13 + salt) % 17) - 8.f;
    return v;
  }

  StagingOps ops_;
  std::unique_ptr<Communicator> world_;
  std::unique_ptr<Communicator> routed_;
};

TEST_F(RoutedCommunicator, StagedCollectivesEqualPlainMpi) {
  const int W = world_->size();
  const int me = world_->rank();
  const int64_t row = 5;
  // Unequal counts, one rank with none.
  std::vector<int64_t> counts(static_cast<size_t>(W));
  for (int r = 0; r < W; ++r) counts[r] = (r * 3 + 1) % 4;
  int64_t sum = 0;
  for (int64_t c : counts) sum += c;

  {  // all_reduce_sum
    auto a = seeded(24, 1), b = a;
    routed_->all_reduce_sum(dev(a, 4));
    world_->all_reduce_sum(host(b, 4));
    EXPECT_EQ(a, b);
  }
  {  // reduce_scatter_sum
    auto in_a = seeded(static_cast<size_t>(sum * row), 2), in_b = in_a;
    std::vector<float> out_a(static_cast<size_t>(counts[me] * row) + 1);
    std::vector<float> out_b = out_a;
    out_a.pop_back();
    out_b.pop_back();
    routed_->reduce_scatter_sum(Tensor(out_a.data(), DType::kF32, {counts[me], row}, Device::kCuda),
                                Tensor(in_a.data(), DType::kF32, {sum, row}, Device::kCuda),
                                counts);
    world_->reduce_scatter_sum(Tensor(out_b.data(), DType::kF32, {counts[me], row}),
                               Tensor(in_b.data(), DType::kF32, {sum, row}), counts);
    EXPECT_EQ(out_a, out_b);
  }
  {  // all_gather
    auto in = seeded(static_cast<size_t>(counts[me] * row), 3);
    std::vector<float> out_a(static_cast<size_t>(sum * row), -1.f), out_b = out_a;
    routed_->all_gather(Tensor(out_a.data(), DType::kF32, {sum, row}, Device::kCuda),
                        Tensor(in.data(), DType::kF32, {counts[me], row}, Device::kCuda), counts);
    world_->all_gather(Tensor(out_b.data(), DType::kF32, {sum, row}),
                       Tensor(in.data(), DType::kF32, {counts[me], row}), counts);
    EXPECT_EQ(out_a, out_b);
  }
  {  // all_to_all, BF16-sized rows (16-bit words) as the MoE exchange sends them
    std::vector<int64_t> send(static_cast<size_t>(W)), recv(static_cast<size_t>(W));
    int64_t n_send = 0, n_recv = 0;
    for (int p = 0; p < W; ++p) {
      send[p] = (me + 2 * p) % 3;
      recv[p] = (p + 2 * me) % 3;
      n_send += send[p];
      n_recv += recv[p];
    }
    std::vector<uint16_t> in(static_cast<size_t>(n_send * row));
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint16_t>(me * 1000 + i);
    std::vector<uint16_t> out_a(static_cast<size_t>(n_recv * row)), out_b = out_a;
    routed_->all_to_all(Tensor(out_a.data(), DType::kBF16, {n_recv, row}, Device::kCuda), recv,
                        Tensor(in.data(), DType::kBF16, {n_send, row}, Device::kCuda), send);
    world_->all_to_all(Tensor(out_b.data(), DType::kBF16, {n_recv, row}), recv,
                       Tensor(in.data(), DType::kBF16, {n_send, row}), send);
    EXPECT_EQ(out_a, out_b);
  }
  EXPECT_GT(ops_.copies_out, 0);
  EXPECT_GT(ops_.copies_in, 0);
}

TEST_F(RoutedCommunicator, HostTensorsSkipStagingAndMixedOperandsAreRefused) {
  auto a = seeded(8, 4), b = a;
  const int64_t before = ops_.copies_out;
  routed_->all_reduce_sum(host(a, 2));
  world_->all_reduce_sum(host(b, 2));
  EXPECT_EQ(a, b);
  EXPECT_EQ(ops_.copies_out, before);
  std::vector<int64_t> ones(static_cast<size_t>(world_->size()), 1);
  std::vector<float> out(static_cast<size_t>(world_->size()) * 4);
  EXPECT_THROW(routed_->all_gather(host(out, world_->size()), dev(a, 2), ones), Error);
  // A split keeps routing: its ranks and staging work as the parent's.
  auto sub = routed_->split(world_->rank() % 2, world_->rank());
  auto plain = world_->split(world_->rank() % 2, world_->rank());
  auto c = seeded(6, 5), d = c;
  const int64_t copies = ops_.copies_out;
  sub->all_reduce_sum(dev(c, 2));
  plain->all_reduce_sum(host(d, 2));
  EXPECT_EQ(c, d);
  EXPECT_GT(ops_.copies_out, copies);  // staged
  EXPECT_EQ(sub->size(), plain->size());
  EXPECT_EQ(sub->rank(), plain->rank());
}

// Every layout and both exchanges: staged and plain runs give identical logits and tokens.
TEST_F(RoutedCommunicator, ParallelModelThroughStagingEqualsPlainRun) {
  const fs::path dir = test::fixture_dirs().front();
  const ModelConfig config = ModelConfig::load(dir.string());
  const auto prompts = test::load_prompts(dir, config.vocab_size);
  const int W = world_->size();
  int n_layouts = 0;
  for (const ParallelConfig& pc : test::parallel_layouts(W, world_->rank(), config)) {
    auto par_plain = ParallelContext::create(pc, *world_);
    auto par_staged = ParallelContext::create(pc, *routed_);
    auto cpu = make_cpu_ops();
    LoadedModel plain = load_model(dir.string(), 64, 16, false, par_plain.get(), cpu.get());
    LoadedModel staged = load_model(dir.string(), 64, 16, false, par_staged.get(), &ops_);
    // The all-gather exchange also runs the device-routing MoE block here (rows of other
    // ranks' experts marked -1), as GPUs do for decode steps.
    if (pc.exchange == MoeExchange::kAllGather) staged.model->set_device_routing(int64_t{1} << 30);
    for (const auto& p : prompts) {
      GenerateOptions o;
      o.max_tokens = 4;
      o.ignore_eos = true;
      o.all_prompt_logits = true;
      const GenerateResult a = generate(*plain.model, p.ids, o);
      const GenerateResult b = generate(*staged.model, p.ids, o);
      EXPECT_EQ(a.tokens, b.tokens)
          << "tp " << pc.tp << " ep " << pc.ep_size() << " " << moe_exchange_name(pc.exchange);
      EXPECT_EQ(a.prompt_logits, b.prompt_logits)
          << "tp " << pc.tp << " ep " << pc.ep_size() << " " << moe_exchange_name(pc.exchange);
    }
    ++n_layouts;
  }
  EXPECT_GE(n_layouts, 2);
}

}  // namespace
}  // namespace sy
