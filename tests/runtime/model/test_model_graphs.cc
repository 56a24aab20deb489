// The model's graph path on the CPU: a stand-in backend records the ops issued between
// begin_graph() and end_graph() instead of running them (and refuses any copy or synchronisation
// while recording, as a CUDA stream under capture does), and launch_graph() replays them. The
// model must then record decode steps of one rank without touching the host inside the step, and
// the replays must give exactly the tokens of the plain CPU run. This is the logic that lets a
// GPU decode step run as one CUDA graph; the CUDA recording itself is tested in test_cuda_ops.
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <vector>

#include "runtime/engine/generator.h"
#include "tests/common/engine_check.h"
#include "tests/common/fixtures.h"
#include "tests/common/forwarding_ops.h"

namespace sy {
namespace {

class RecordingOps final : public test::ForwardingOps {
 public:
  // `device` kCuda makes the model treat it as a GPU: device routing and device sampling on.
  explicit RecordingOps(Device device = Device::kCpu) : device_(device) {}
  Device device() const override { return device_; }
  void* alloc(size_t bytes) override {
    refuse_while_recording("alloc");
    return cpu_->alloc(bytes);
  }
  void copy_from_host(void* dst, const void* src, size_t bytes) override {
    refuse_while_recording("copy_from_host");
    cpu_->copy_from_host(dst, src, bytes);
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    refuse_while_recording("copy_to_host");
    cpu_->copy_to_host(dst, src, bytes);
  }
  void synchronize() override { refuse_while_recording("synchronize"); }
  void fill_zero(Tensor t) override {
    run([=, this] { cpu_->fill_zero(t); });
  }
  void embedding(Tensor out, Tensor ids, Tensor table, int64_t row_offset) override {
    run([=, this] { cpu_->embedding(out, ids, table, row_offset); });
  }
  void rmsnorm(Tensor out, Tensor x, Tensor weight, float eps) override {
    run([=, this] { cpu_->rmsnorm(out, x, weight, eps); });
  }
  void add(Tensor out, Tensor a, Tensor b) override {
    run([=, this] { cpu_->add(out, a, b); });
  }
  void matmul(Tensor out, Tensor x, Tensor w) override {
    run([=, this] { cpu_->matmul(out, x, w); });
  }
  void rope(Tensor q, Tensor k, Tensor positions, double theta) override {
    run([=, this] { cpu_->rope(q, k, positions, theta); });
  }
  void kv_append(Tensor kc, Tensor vc, Tensor k, Tensor v, const AttentionMeta& m) override {
    run([=, this] { cpu_->kv_append(kc, vc, k, v, m); });
  }
  void attention(Tensor out, Tensor q, Tensor kc, Tensor vc, const AttentionMeta& m) override {
    run([=, this] { cpu_->attention(out, q, kc, vc, m); });
  }
  void moe_gate(Tensor idx, Tensor w, Tensor logits) override {
    run([=, this] { cpu_->moe_gate(idx, w, logits); });
  }
  void gather_rows(Tensor out, Tensor x, Tensor rows) override {
    run([=, this] { cpu_->gather_rows(out, x, rows); });
  }
  void scatter_add_weighted(Tensor out, Tensor x, Tensor rows, Tensor w) override {
    run([=, this] { cpu_->scatter_add_weighted(out, x, rows, w); });
  }
  void swiglu(Tensor out, Tensor gate, Tensor up) override {
    run([=, this] { cpu_->swiglu(out, gate, up); });
  }
  // The default moe_route, count_routed and grouped_matmul_offsets go through the host; a GPU does
  // them on the device, so here they run on the (host) data directly and are recordable.
  void moe_route(Tensor rows, Tensor weights, Tensor offsets, Tensor idx, Tensor w, int64_t begin,
                 int64_t end) override {
    run([=, this] { cpu_->moe_route(rows, weights, offsets, idx, w, begin, end); });
  }
  void count_routed(Tensor counts, Tensor offsets) override {
    run([=, this] { cpu_->count_routed(counts, offsets); });
  }
  void grouped_matmul_offsets(Tensor out, Tensor x, const Tensor* w, Tensor offsets, int64_t first,
                              size_t n_groups) override {
    std::vector<Tensor> ws(w, w + n_groups);
    run([=, this] { cpu_->grouped_matmul_offsets(out, x, ws.data(), offsets, first, n_groups); });
  }

  void sample(Tensor ids, Tensor logits, Tensor params) override {
    refuse_while_recording("sample");  // sampling follows the recorded step
    cpu_->sample(ids, logits, params);
    ++samples;
  }

  bool supports_graphs() const override { return true; }
  bool has_graph(int64_t id) const override { return graphs_.count(id) > 0; }
  void begin_graph() override {
    SY_CHECK(!recording_, "begin_graph while recording");
    recording_ = true;
    tape_.clear();
  }
  void end_graph(int64_t id) override {
    SY_CHECK(recording_, "end_graph without begin_graph");
    recording_ = false;
    graphs_[id] = std::move(tape_);
    tape_.clear();
  }
  void launch_graph(int64_t id) override {
    for (const auto& op : graphs_.at(id)) op();
    ++launches;
  }

  int64_t launches = 0;
  int64_t samples = 0;

 private:
  void refuse_while_recording(const char* what) const {
    SY_CHECK(!recording_, what, " inside a recorded step");
  }
  void run(std::function<void()> op) {
    if (recording_)
      tape_.push_back(std::move(op));
    else
      op();
  }

  Device device_;
  bool recording_ = false;
  std::vector<std::function<void()>> tape_;
  std::map<int64_t, std::vector<std::function<void()>>> graphs_;
};

// One backend for every fixture's model, as a server or a test may have: each model replays only
// the graphs it recorded (the shapes, and so the graph keys, are the same across models).
TEST(ModelGraphs, RecordedDecodeStepsReplayToTheSameTokens) {
  RecordingOps ops;
  int64_t total_launches = 0;
  for (const auto& dir : test::fixture_dirs()) {
    const int64_t launches_before = ops.launches;
    LoadedModel plain = load_model(dir.string(), 64, 7, false);
    LoadedModel graphed = load_model(dir.string(), 64, 7, false, nullptr, &ops);
    graphed.model->set_device_routing(256);
    for (const auto& p : test::load_prompts(dir, plain.config.vocab_size)) {
      GenerateOptions o;
      o.max_tokens = 12;
      o.ignore_eos = true;
      const GenerateResult want = generate(*plain.model, p.ids, o);
      const GenerateResult got = generate(*graphed.model, p.ids, o);
      EXPECT_EQ(got.tokens, want.tokens) << dir.filename() << " " << p.name;
    }
    EXPECT_GT(ops.launches, launches_before) << dir.filename() << ": no decode step was replayed";
    total_launches = ops.launches;
  }
  std::printf("replayed %lld recorded decode steps\n", static_cast<long long>(total_launches));
}

// The same backend presented as a GPU: the model routes on the device and records its decode
// steps by default, and generate() samples on the device (Ops::sample) with the host sampler's
// stream of draws: the same tokens as the CPU run, for greedy and for seeded sampling.
TEST(ModelGraphs, DeviceSamplingGivesTheHostSamplersTokens) {
  for (const auto& dir : test::fixture_dirs()) {
    RecordingOps ops(Device::kCuda);
    LoadedModel plain = load_model(dir.string(), 64, 7, false);
    LoadedModel device = load_model(dir.string(), 64, 7, false, nullptr, &ops);
    for (const auto& p : test::load_prompts(dir, plain.config.vocab_size)) {
      for (int sampled = 0; sampled < 2; ++sampled) {
        GenerateOptions o;
        o.max_tokens = 10;
        o.ignore_eos = true;
        if (sampled) {
          o.sampling.temperature = 0.9f;
          o.sampling.top_k = 20;
          o.sampling.top_p = 0.9f;
          o.sampling.min_p = 0.01f;
          o.sampling.seed = 7;
        }
        const GenerateResult want = generate(*plain.model, p.ids, o);
        const GenerateResult got = generate(*device.model, p.ids, o);
        EXPECT_EQ(got.tokens, want.tokens)
            << dir.filename() << " " << p.name << " sampled " << sampled;
      }
    }
    EXPECT_GT(ops.samples, 0);
    EXPECT_GT(ops.launches, 0);
  }
}

// The serving engine on the stand-in GPU: continuous batching with device routing, recorded
// decode steps and device sampling gives every request the tokens it gets alone on the CPU
// (greedy and seeded sampling mixed in one batch; a request with logprobs makes its steps sample
// on the host).
TEST(ModelGraphs, EngineOnTheDevicePathMatchesEachRequestAlone) {
  RecordingOps ops(Device::kCuda);
  test::expect_engine_matches_each_request_alone(ops);
  EXPECT_GT(ops.samples, 0);
  EXPECT_GT(ops.launches, 0);
}

}  // namespace
}  // namespace sy
