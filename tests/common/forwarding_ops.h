// A backend for tests that runs every op on the CPU backend; stand-ins for a GPU derive from it
// and override what they change (the device they claim, copies, recording).
#pragma once

#include <memory>

#include "kernels/ops.h"

namespace sy::test {

class ForwardingOps : public Ops {
 public:
  ForwardingOps() : cpu_(make_cpu_ops()) {}
  Device device() const override { return Device::kCpu; }
  DType storage_dtype() const override { return DType::kF32; }
  void* alloc(size_t bytes) override { return cpu_->alloc(bytes); }
  void free(void* ptr) override { cpu_->free(ptr); }
  void copy_from_host(void* dst, const void* src, size_t bytes) override {
    cpu_->copy_from_host(dst, src, bytes);
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    cpu_->copy_to_host(dst, src, bytes);
  }
  void fill_zero(Tensor t) override { cpu_->fill_zero(t); }
  void synchronize() override {}
  void embedding(Tensor out, Tensor ids, Tensor table, int64_t row_offset) override {
    cpu_->embedding(out, ids, table, row_offset);
  }
  void rmsnorm(Tensor out, Tensor x, Tensor weight, float eps) override {
    cpu_->rmsnorm(out, x, weight, eps);
  }
  void add(Tensor out, Tensor a, Tensor b) override { cpu_->add(out, a, b); }
  void matmul(Tensor out, Tensor x, Tensor w) override { cpu_->matmul(out, x, w); }
  void rope(Tensor q, Tensor k, Tensor positions, double theta) override {
    cpu_->rope(q, k, positions, theta);
  }
  void kv_append(Tensor kc, Tensor vc, Tensor k, Tensor v, const AttentionMeta& m) override {
    cpu_->kv_append(kc, vc, k, v, m);
  }
  void attention(Tensor out, Tensor q, Tensor kc, Tensor vc, const AttentionMeta& m) override {
    cpu_->attention(out, q, kc, vc, m);
  }
  void moe_gate(Tensor idx, Tensor w, Tensor logits) override { cpu_->moe_gate(idx, w, logits); }
  void gather_rows(Tensor out, Tensor x, Tensor rows) override { cpu_->gather_rows(out, x, rows); }
  void scatter_add_weighted(Tensor out, Tensor x, Tensor rows, Tensor w) override {
    cpu_->scatter_add_weighted(out, x, rows, w);
  }
  void swiglu(Tensor out, Tensor gate, Tensor up) override { cpu_->swiglu(out, gate, up); }

 protected:
  std::unique_ptr<Ops> cpu_;
};

}  // namespace sy::test
