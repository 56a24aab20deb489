// Host / device routing of collectives (see routed_communicator.h).
#include "parallel/routed_communicator.h"

#include <vector>

namespace sy {
namespace {

class RoutedCommunicator final : public Communicator {
 public:
  RoutedCommunicator(Communicator& host, std::unique_ptr<Communicator> owned_host,
                     std::unique_ptr<Communicator> device, Ops& ops)
      : host_(owned_host ? *owned_host : host),
        owned_host_(std::move(owned_host)),
        device_(std::move(device)),
        ops_(ops) {
    SY_CHECK(
        device_ == nullptr || (device_->size() == host_.size() && device_->rank() == host_.rank()),
        "routed communicator: device rank ", device_ ? device_->rank() : -1, " of ",
        device_ ? device_->size() : -1, " differs from host rank ", host_.rank(), " of ",
        host_.size());
  }

  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  // Host staging copies and waits; a device communicator may not.
  bool stream_ordered() const override { return device_ != nullptr && device_->stream_ordered(); }

  void all_reduce_sum(Tensor buf) override {
    if (on_host({&buf})) return host_.all_reduce_sum(buf);
    if (device_) return device_->all_reduce_sum(buf);
    Tensor h = stage(buf, in_, true);
    host_.all_reduce_sum(h);
    unstage(buf, h);
  }

  void reduce_scatter_sum(Tensor out, Tensor in, const std::vector<int64_t>& counts) override {
    if (on_host({&out, &in})) return host_.reduce_scatter_sum(out, in, counts);
    if (device_) return device_->reduce_scatter_sum(out, in, counts);
    Tensor hi = stage(in, in_, true);
    Tensor ho = stage(out, out_, false);
    host_.reduce_scatter_sum(ho, hi, counts);
    unstage(out, ho);
  }

  void all_gather(Tensor out, Tensor in, const std::vector<int64_t>& counts) override {
    if (on_host({&out, &in})) return host_.all_gather(out, in, counts);
    if (device_) return device_->all_gather(out, in, counts);
    Tensor hi = stage(in, in_, true);
    Tensor ho = stage(out, out_, false);
    host_.all_gather(ho, hi, counts);
    unstage(out, ho);
  }

  void all_to_all(Tensor out, const std::vector<int64_t>& recv_counts, Tensor in,
                  const std::vector<int64_t>& send_counts) override {
    if (on_host({&out, &in})) return host_.all_to_all(out, recv_counts, in, send_counts);
    if (device_) return device_->all_to_all(out, recv_counts, in, send_counts);
    Tensor hi = stage(in, in_, true);
    Tensor ho = stage(out, out_, false);
    host_.all_to_all(ho, recv_counts, hi, send_counts);
    unstage(out, ho);
  }

  // Step plans, sampled tokens and layout tables are host data.
  void broadcast(void* data, size_t bytes, int root) override {
    host_.broadcast(data, bytes, root);
  }
  void broadcast_idle(void* data, size_t bytes, int root, int max_sleep_ms) override {
    host_.broadcast_idle(data, bytes, root, max_sleep_ms);
  }
  void barrier() override {
    ops_.synchronize();
    host_.barrier();
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    std::unique_ptr<Communicator> host = host_.split(color, key);
    std::unique_ptr<Communicator> device = device_ ? device_->split(color, key) : nullptr;
    Communicator& ref = *host;
    return std::make_unique<RoutedCommunicator>(ref, std::move(host), std::move(device), ops_);
  }

 private:
  // True when every operand is host memory; mixed operands are an error.
  static bool on_host(std::initializer_list<const Tensor*> ts) {
    bool host = false;
    bool device = false;
    for (const Tensor* t : ts) (t->device == Device::kCpu ? host : device) = true;
    SY_CHECK(!(host && device), "collective mixes host and device tensors");
    return host;
  }

  // A host view of `t`'s shape in `buf`, filled with its contents when `copy`.
  Tensor stage(const Tensor& t, std::vector<char>& buf, bool copy) {
    if (buf.size() < t.bytes()) buf.resize(t.bytes());
    Tensor h = t;
    h.data = buf.data();
    h.device = Device::kCpu;
    if (copy) ops_.copy_to_host(h.data, t.data, t.bytes());
    return h;
  }
  void unstage(const Tensor& t, const Tensor& h) { ops_.copy_from_host(t.data, h.data, t.bytes()); }

  Communicator& host_;
  std::unique_ptr<Communicator> owned_host_;
  std::unique_ptr<Communicator> device_;
  Ops& ops_;
  std::vector<char> in_, out_;  // staging buffers, grown to the largest collective seen
};

}  // namespace

std::unique_ptr<Communicator> make_routed_communicator(Communicator& host,
                                                       std::unique_ptr<Communicator> device,
                                                       Ops& ops) {
  return std::make_unique<RoutedCommunicator>(host, nullptr, std::move(device), ops);
}

}  // namespace sy
