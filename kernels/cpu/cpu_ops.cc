// The CPU backend of the ops interface: host memory and the kernels of this folder.
#include <cstdlib>
#include <cstring>

#include "kernels/cpu/ops.h"

namespace sy {
namespace {

class CpuOps final : public Ops {
 public:
  Device device() const override { return Device::kCpu; }
  DType storage_dtype() const override { return DType::kF32; }
  void* alloc(size_t bytes) override {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    SY_CHECK(p != nullptr, "out of host memory allocating ", bytes, " bytes");
    return p;
  }
  void free(void* ptr) override { std::free(ptr); }
  void copy_from_host(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void fill_zero(Tensor t) override {
    if (t.numel() > 0) std::memset(t.data, 0, t.bytes());
  }
  void synchronize() override {}

  void embedding(Tensor out, Tensor ids, Tensor table, int64_t row_offset) override {
    cpu::embedding(out, ids, table, row_offset);
  }
  void rmsnorm(Tensor out, Tensor x, Tensor weight, float eps) override {
    cpu::rmsnorm(out, x, weight, eps);
  }
  void add(Tensor out, Tensor a, Tensor b) override { cpu::add(out, a, b); }
  void matmul(Tensor out, Tensor x, Tensor w) override { cpu::matmul(out, x, w); }
  void rope(Tensor q, Tensor k, Tensor positions, double theta) override {
    cpu::rope(q, k, positions, theta);
  }
  void kv_append(Tensor k_cache, Tensor v_cache, Tensor k, Tensor v,
                 const AttentionMeta& meta) override {
    cpu::kv_append(k_cache, v_cache, k, v, meta);
  }
  void attention(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache,
                 const AttentionMeta& meta) override {
    cpu::attention(out, q, k_cache, v_cache, meta);
  }
  void moe_gate(Tensor topk_idx, Tensor topk_weights, Tensor logits) override {
    cpu::moe_gate(topk_idx, topk_weights, logits);
  }
  void gather_rows(Tensor out, Tensor x, Tensor rows) override { cpu::gather_rows(out, x, rows); }
  void scatter_add_weighted(Tensor out, Tensor x, Tensor rows, Tensor weights) override {
    cpu::scatter_add_weighted(out, x, rows, weights);
  }
  void swiglu(Tensor out, Tensor gate, Tensor up) override { cpu::swiglu(out, gate, up); }
};

}  // namespace

std::unique_ptr<Ops> make_cpu_ops() {
  return std::make_unique<CpuOps>();
}

}  // namespace sy
