// The communicator of a process that runs alone, without an MPI launcher: one rank, host
// buffers, every collective a local copy (see communicator.h).
#include <cstring>

#include "parallel/communicator.h"

namespace sy {
namespace {

int64_t total(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }

  void all_reduce_sum(Tensor buf) override {
    check_host(buf, "all_reduce_sum");
    SY_CHECK(buf.dtype == DType::kF32, "all_reduce_sum: F32 only, got ", dtype_name(buf.dtype));
  }

  void reduce_scatter_sum(Tensor out, Tensor in, const std::vector<int64_t>& counts) override {
    check_counts(counts, "reduce_scatter");
    SY_CHECK(in.dtype == DType::kF32 && out.dtype == DType::kF32, "reduce_scatter: F32 only");
    SY_CHECK(
        in.size(0) == counts[0] && out.size(0) == counts[0] && out.row_numel() == in.row_numel(),
        "reduce_scatter: in ", in.shape_str(), ", out ", out.shape_str(), " for ", counts[0],
        " rows");
    copy(out, in, counts[0], "reduce_scatter");
  }

  void all_gather(Tensor out, Tensor in, const std::vector<int64_t>& counts) override {
    check_counts(counts, "all_gather");
    SY_CHECK(in.dtype == out.dtype, "all_gather: dtypes differ");
    SY_CHECK(
        in.size(0) == counts[0] && out.size(0) == counts[0] && out.row_numel() == in.row_numel(),
        "all_gather: in ", in.shape_str(), ", out ", out.shape_str());
    copy(out, in, counts[0], "all_gather");
  }

  void all_to_all(Tensor out, const std::vector<int64_t>& recv_counts, Tensor in,
                  const std::vector<int64_t>& send_counts) override {
    check_counts(recv_counts, "all_to_all recv");
    check_counts(send_counts, "all_to_all send");
    SY_CHECK(in.dtype == out.dtype, "all_to_all: dtypes differ");
    SY_CHECK(send_counts[0] == recv_counts[0], "all_to_all: ", send_counts[0],
             " rows sent to this rank, ", recv_counts[0], " received");
    SY_CHECK(in.size(0) >= total(send_counts) && out.size(0) >= total(recv_counts) &&
                 out.row_numel() == in.row_numel(),
             "all_to_all: ", total(send_counts), " rows from ", in.shape_str(), " into ",
             out.shape_str());
    copy(out, in, send_counts[0], "all_to_all");
  }

  void broadcast(void* data, size_t bytes, int root) override {
    SY_CHECK(root == 0, "broadcast: root ", root, " in a world of 1 rank");
  }
  void broadcast_idle(void* data, size_t bytes, int root, int max_sleep_ms) override {
    broadcast(data, bytes, root);
  }
  void barrier() override {}
  std::unique_ptr<Communicator> split(int color, int key) override {
    return std::make_unique<SelfCommunicator>();
  }

 private:
  static void check_counts(const std::vector<int64_t>& counts, const char* what) {
    SY_CHECK(counts.size() == 1, what, ": ", counts.size(), " counts for 1 rank");
    SY_CHECK(counts[0] >= 0, what, ": negative count ", counts[0]);
  }
  static void check_host(const Tensor& t, const char* what) {
    SY_CHECK(t.device == Device::kCpu, what, ": ", t.shape_str(),
             " is in device memory; this communicator takes host buffers");
  }
  // out rows [0, n) = in rows [0, n), unless they are the same memory.
  static void copy(Tensor out, Tensor in, int64_t n, const char* what) {
    check_host(out, what);
    check_host(in, what);
    const size_t bytes = static_cast<size_t>(n * in.row_numel()) * dtype_size(in.dtype);
    if (bytes > 0 && out.data != in.data) std::memmove(out.data, in.data, bytes);
  }
};

}  // namespace

std::unique_ptr<Communicator> make_self_communicator() {
  return std::make_unique<SelfCommunicator>();
}

}  // namespace sy
