// The NCCL communicator: collectives on device buffers through NCCL (see nccl_communicator.h).
#include "parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/cuda/device.h"

namespace sy {
namespace {

std::string nccl_error(ncclResult_t rc) {
  std::string msg = std::string("NCCL error: ") + ncclGetErrorString(rc);
  // NCCL keeps the last error of this thread in words (e.g. "Duplicate GPU detected").
  const char* last = ncclGetLastError(nullptr);
  if (last != nullptr && last[0] != '\0') msg += std::string(" (") + last + ")";
  return msg;
}

}  // namespace
}  // namespace sy

#define SY_NCCL_CHECK(expr)                                                    \
  do {                                                                         \
    ncclResult_t sy_rc_ = (expr);                                              \
    if (sy_rc_ != ncclSuccess)                                                 \
      ::sy::detail::fail(__FILE__, __LINE__, #expr, ::sy::nccl_error(sy_rc_)); \
  } while (0)

namespace sy {
namespace {

int64_t total(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

bool all_equal(const std::vector<int64_t>& v) {
  return std::all_of(v.begin(), v.end(), [&](int64_t x) { return x == v.front(); });
}

char* at(const Tensor& t, int64_t row) {
  return static_cast<char*>(t.data) +
         row * t.row_numel() * static_cast<int64_t>(dtype_size(t.dtype));
}

class NcclCommunicator;
std::unique_ptr<Communicator> adopt(ncclComm_t comm, int device, cudaStream_t stream);

// The live communicators of this process, for abort_nccl_communicators() and the wait check.
std::mutex g_live_mutex;
std::vector<NcclCommunicator*> g_live;
// The wait check of every wait for a stream (cuda::wait_for_stream): asynchronous errors of
// every live communicator.
void check_live_communicators();

class NcclCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm`, an initialised communicator on `device` (the current device).
  // Enqueues on `stream` when it is not null (not owned), else on a stream of its own.
  NcclCommunicator(ncclComm_t comm, int device, cudaStream_t stream)
      : comm_(comm), device_(device), stream_(stream), owns_stream_(stream == nullptr) {
    try {
      SY_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
      SY_NCCL_CHECK(ncclCommCount(comm_, &size_));
      if (owns_stream_) SY_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      SY_CUDA_CHECK(cudaMalloc(&scratch_, sizeof(float)));
    } catch (...) {
      if (owns_stream_ && stream_ != nullptr) cudaStreamDestroy(stream_);
      throw;  // the caller (adopt) aborts `comm`
    }
    std::lock_guard<std::mutex> lock(g_live_mutex);
    g_live.push_back(this);
    cuda::set_wait_check(&check_live_communicators);
  }

  ~NcclCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(g_live_mutex);
      g_live.erase(std::remove(g_live.begin(), g_live.end(), this), g_live.end());
    }
    // Collectives on the caller's stream may still be pending: finish them first, so that
    // destroying frees local resources only. While an exception unwinds, a group may be half
    // enqueued and peers may be gone: abort instead.
    if (std::uncaught_exceptions() > 0) abort();
    if (!aborted_ && !owns_stream_) {
      try {
        wait();
      } catch (...) {
        abort();  // a peer failed: nothing pending can finish
      }
    }
    if (!aborted_) ncclCommDestroy(comm_);
    cudaFree(scratch_);
    if (owns_stream_) cudaStreamDestroy(stream_);
  }

  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  bool stream_ordered() const override { return !owns_stream_; }

  // Cancels pending work and frees the communicator; peers in a collective with it get an
  // error or are ended by the launcher. Never throws.
  void abort() noexcept {
    if (aborted_) return;
    aborted_ = true;
    ncclCommAbort(comm_);
  }

  // The asynchronous error NCCL reports for this communicator (a peer failed), or ncclSuccess.
  ncclResult_t async_error() const {
    if (aborted_) return ncclSuccess;
    ncclResult_t async = ncclSuccess;
    const ncclResult_t rc = ncclCommGetAsyncError(comm_, &async);
    return rc != ncclSuccess ? rc : async;
  }

  void all_reduce_sum(Tensor buf) override {
    check_usable();
    check_device(buf, "all_reduce_sum", "buf");
    SY_CHECK(buf.dtype == DType::kF32, "all_reduce_sum: F32 only, got ", dtype_name(buf.dtype));
    if (buf.numel() == 0) return;
    SY_NCCL_CHECK(ncclAllReduce(buf.data, buf.data, static_cast<size_t>(buf.numel()), ncclFloat32,
                                ncclSum, comm_, stream_));
    finish();
  }

  void reduce_scatter_sum(Tensor out, Tensor in, const std::vector<int64_t>& counts) override {
    check_usable();
    check_counts(counts, "reduce_scatter");
    check_device(in, "reduce_scatter", "in");
    check_device(out, "reduce_scatter", "out");
    const int64_t row = in.row_numel();
    SY_CHECK(in.dtype == DType::kF32 && out.dtype == DType::kF32, "reduce_scatter: F32 only");
    SY_CHECK(in.size(0) == total(counts) && out.size(0) == counts[rank_] && out.row_numel() == row,
             "reduce_scatter: in ", in.shape_str(), ", out ", out.shape_str(),
             " for counts of rank ", rank_, " = ", counts[rank_]);
    if (total(counts) == 0 || row == 0) return;
    if (all_equal(counts)) {
      SY_NCCL_CHECK(ncclReduceScatter(in.data, out.data, static_cast<size_t>(counts[0] * row),
                                      ncclFloat32, ncclSum, comm_, stream_));
    } else {
      // NCCL's reduce-scatter takes one count for all ranks: reduce each rank's rows to it.
      Group group(*this);
      int64_t first = 0;
      for (int r = 0; r < size_; ++r) {
        if (counts[r] > 0)
          SY_NCCL_CHECK(ncclReduce(at(in, first), r == rank_ ? out.data : nullptr,
                                   static_cast<size_t>(counts[r] * row), ncclFloat32, ncclSum, r,
                                   comm_, stream_));
        first += counts[r];
      }
      group.end();
    }
    finish();
  }

  void all_gather(Tensor out, Tensor in, const std::vector<int64_t>& counts) override {
    check_usable();
    check_counts(counts, "all_gather");
    check_device(in, "all_gather", "in");
    check_device(out, "all_gather", "out");
    const int64_t row = out.row_numel();
    SY_CHECK(in.dtype == out.dtype, "all_gather: dtypes differ");
    SY_CHECK(out.size(0) == total(counts) && in.size(0) == counts[rank_] && in.row_numel() == row,
             "all_gather: in ", in.shape_str(), ", out ", out.shape_str());
    const int64_t row_bytes = row * static_cast<int64_t>(dtype_size(out.dtype));
    if (total(counts) == 0 || row_bytes == 0) return;
    if (all_equal(counts)) {
      SY_NCCL_CHECK(ncclAllGather(in.data, out.data, static_cast<size_t>(counts[0] * row_bytes),
                                  ncclInt8, comm_, stream_));
    } else {
      // NCCL's all-gather takes one count for all ranks: each rank broadcasts its rows.
      Group group(*this);
      int64_t first = 0;
      for (int r = 0; r < size_; ++r) {
        if (counts[r] > 0)
          SY_NCCL_CHECK(ncclBroadcast(in.data, at(out, first),
                                      static_cast<size_t>(counts[r] * row_bytes), ncclInt8, r,
                                      comm_, stream_));
        first += counts[r];
      }
      group.end();
    }
    finish();
  }

  void all_to_all(Tensor out, const std::vector<int64_t>& recv_counts, Tensor in,
                  const std::vector<int64_t>& send_counts) override {
    check_usable();
    check_counts(recv_counts, "all_to_all recv");
    check_counts(send_counts, "all_to_all send");
    check_device(in, "all_to_all", "in");
    check_device(out, "all_to_all", "out");
    SY_CHECK(in.dtype == out.dtype, "all_to_all: dtypes differ");
    SY_CHECK(in.size(0) >= total(send_counts) && out.size(0) >= total(recv_counts),
             "all_to_all: ", total(send_counts), " rows to send from ", in.shape_str(), ", ",
             total(recv_counts), " to receive into ", out.shape_str());
    SY_CHECK(out.row_numel() == in.row_numel(), "all_to_all: row sizes differ: ", in.shape_str(),
             " and ", out.shape_str());
    SY_CHECK(send_counts[rank_] == recv_counts[rank_], "all_to_all: rank ", rank_, " sends ",
             send_counts[rank_], " rows to itself but receives ", recv_counts[rank_]);
    const size_t row_bytes = static_cast<size_t>(in.row_numel()) * dtype_size(in.dtype);
    if (row_bytes == 0) return;
    int64_t send_first = 0, recv_first = 0;
    for (int p = 0; p < rank_; ++p) {
      send_first += send_counts[p];
      recv_first += recv_counts[p];
    }
    if (send_counts[rank_] > 0)
      SY_CUDA_CHECK(cudaMemcpyAsync(at(out, recv_first), at(in, send_first),
                                    static_cast<size_t>(send_counts[rank_]) * row_bytes,
                                    cudaMemcpyDeviceToDevice, stream_));
    Group group(*this);
    send_first = recv_first = 0;
    for (int p = 0; p < size_; ++p) {
      if (p != rank_ && send_counts[p] > 0)
        SY_NCCL_CHECK(ncclSend(at(in, send_first), static_cast<size_t>(send_counts[p]) * row_bytes,
                               ncclInt8, p, comm_, stream_));
      if (p != rank_ && recv_counts[p] > 0)
        SY_NCCL_CHECK(ncclRecv(at(out, recv_first), static_cast<size_t>(recv_counts[p]) * row_bytes,
                               ncclInt8, p, comm_, stream_));
      send_first += send_counts[p];
      recv_first += recv_counts[p];
    }
    group.end();
    finish();
  }

  void broadcast(void* data, size_t bytes, int root) override {
    check_usable();
    SY_CHECK(root >= 0 && root < size_, "broadcast: root ", root, " outside ", size_, " ranks");
    if (bytes == 0) return;
    cudaPointerAttributes attr{};
    SY_CUDA_CHECK(cudaPointerGetAttributes(&attr, data));
    SY_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
             "broadcast: ", bytes, " bytes at ", data,
             " are not in device memory: the NCCL communicator needs device buffers");
    SY_NCCL_CHECK(ncclBroadcast(data, data, bytes, ncclInt8, root, comm_, stream_));
    finish();
  }

  // Step plans are host data: they travel over the MPI communicator, never through NCCL.
  void broadcast_idle(void*, size_t, int, int) override {
    SY_FAIL("broadcast_idle: host broadcasts go over the MPI communicator, not NCCL");
  }

  // A one-element all-reduce: no rank's stream finishes it before every rank has joined.
  void barrier() override {
    check_usable();
    SY_NCCL_CHECK(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_));
    wait();
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    check_usable();
    SY_CHECK(color >= 0, "split: color ", color, " must be >= 0");
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
    ncclComm_t sub = nullptr;
    SY_NCCL_CHECK(ncclCommSplit(comm_, color, key, &sub, nullptr));
    return adopt(sub, device_, owns_stream_ ? nullptr : stream_);
#else
    SY_FAIL("split needs NCCL >= 2.18 (ncclCommSplit); this build has ", NCCL_MAJOR, ".",
            NCCL_MINOR);
#endif
  }

 private:
  // An NCCL group of this communicator's calls. A call that throws inside leaves it open, and
  // NCCL's group depth is per thread: every later NCCL call of the thread would join the open
  // group and never launch. So on the way out the guard closes the group (launching what it
  // holds, which ncclCommAbort frees: the group still names the communicator until it ends),
  // then aborts the communicator: its peers cannot finish the collective either.
  class Group {
   public:
    explicit Group(NcclCommunicator& c) : c_(c) { SY_NCCL_CHECK(ncclGroupStart()); }
    void end() {
      ended_ = true;
      SY_NCCL_CHECK(ncclGroupEnd());
    }
    ~Group() {
      if (ended_) return;
      ncclGroupEnd();  // the communicator is aborted next: its result says nothing more
      c_.abort();
    }
    Group(const Group&) = delete;
    Group& operator=(const Group&) = delete;

   private:
    NcclCommunicator& c_;
    bool ended_ = false;
  };

  void check_usable() const {
    SY_CHECK(!aborted_, "the NCCL communicator was aborted");
  }

  void check_counts(const std::vector<int64_t>& counts, const char* what) const {
    SY_CHECK(static_cast<int>(counts.size()) == size_, what, ": ", counts.size(), " counts for ",
             size_, " ranks");
    for (size_t i = 0; i < counts.size(); ++i)
      SY_CHECK(counts[i] >= 0, what, ": negative count ", counts[i], " for rank ", i);
  }

  static void check_device(const Tensor& t, const char* what, const char* name) {
    SY_CHECK(t.device == Device::kCuda, what, ": `", name, "` ", t.shape_str(),
             " is in host memory; the NCCL communicator needs device buffers");
  }

  // The end of a collective: on a stream of its own the communicator waits for it; on the
  // caller's stream the collective stays enqueued, ordered before the work enqueued after it.
  void finish() {
    if (owns_stream_) wait();
  }

  // Waits for the stream, watching for asynchronous NCCL errors (a peer that failed) so that
  // the wait ends with an error instead of never.
  void wait() {
    cuda::wait_for_stream(stream_, "an NCCL collective");
  }

  ncclComm_t comm_;
  int device_;
  int rank_ = 0;
  int size_ = 1;
  bool aborted_ = false;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = true;
  void* scratch_ = nullptr;  // [1] f32: the barrier's all-reduce
};

// One failed communicator ends them all: the job is going down, and pending collectives on the
// others may wait for the failed peer too.
void check_live_communicators() {
  std::lock_guard<std::mutex> lock(g_live_mutex);
  for (NcclCommunicator* c : g_live) {
    const ncclResult_t async = c->async_error();
    if (async == ncclSuccess) continue;
    const std::string msg = nccl_error(async);
    for (NcclCommunicator* each : g_live) each->abort();
    SY_FAIL("asynchronous ", msg);
  }
}

// Wraps a new NCCL communicator; frees it when the wrapper cannot be built.
std::unique_ptr<Communicator> adopt(ncclComm_t comm, int device, cudaStream_t stream) {
  try {
    return std::make_unique<NcclCommunicator>(comm, device, stream);
  } catch (...) {
    ncclCommAbort(comm);
    throw;
  }
}

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device,
                                                     cudaStream_t stream) {
  const int n_devices = cuda::device_count();
  const bool ok = device >= 0 && device < n_devices;
  // Agree first: a rank without a device must not leave the others waiting for its id.
  float n_bad = ok ? 0.f : 1.f;
  bootstrap.all_reduce_sum(Tensor(&n_bad, DType::kF32, {1}));
  SY_CHECK(ok, "CUDA device ", device, " requested, but this node has ", n_devices,
           " CUDA device(s): the NCCL communicator needs one device per rank");
  SY_CHECK(n_bad == 0.f, n_bad,
           " rank(s) have no CUDA device of their own: the NCCL "
           "communicator needs one device per rank");
  SY_CUDA_CHECK(cudaSetDevice(device));
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (bootstrap.rank() == 0) SY_NCCL_CHECK(ncclGetUniqueId(&id));
  bootstrap.broadcast(&id, sizeof(id), 0);
  ncclComm_t comm = nullptr;
  SY_NCCL_CHECK(ncclCommInitRank(&comm, bootstrap.size(), id, bootstrap.rank()));
  return adopt(comm, device, stream);
}

void abort_nccl_communicators() noexcept {
  std::lock_guard<std::mutex> lock(g_live_mutex);
  for (NcclCommunicator* c : g_live) c->abort();
}

}  // namespace sy
