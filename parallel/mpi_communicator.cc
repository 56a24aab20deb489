// The MPI communicator: collectives on host buffers through MPI (see communicator.h).
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <thread>

#include "parallel/communicator.h"

#define SY_MPI_CHECK(expr)                                                                    \
  do {                                                                                        \
    int sy_rc_ = (expr);                                                                      \
    if (sy_rc_ != MPI_SUCCESS) {                                                              \
      char sy_msg_[MPI_MAX_ERROR_STRING];                                                     \
      int sy_len_ = 0;                                                                        \
      MPI_Error_string(sy_rc_, sy_msg_, &sy_len_);                                            \
      ::sy::detail::fail(__FILE__, __LINE__, #expr,                                           \
                         ::sy::detail::concat("MPI error: ", std::string(sy_msg_, sy_len_))); \
    }                                                                                         \
  } while (0)

namespace sy {
namespace {

MPI_Datatype mpi_type(DType d) {
  switch (d) {
    case DType::kF32:
      return MPI_FLOAT;
    case DType::kI32:
      return MPI_INT32_T;
    default:
      return MPI_UINT16_T;  // bf16 / f16 moved as raw 16-bit words (not reduced)
  }
}

// Row counts -> element counts and displacements, checked against int overflow.
void to_elements(const std::vector<int64_t>& rows, int64_t row, std::vector<int>& counts,
                 std::vector<int>& displs) {
  counts.resize(rows.size());
  displs.resize(rows.size());
  int64_t offset = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    SY_CHECK(rows[i] >= 0, "negative count ", rows[i], " for rank ", i);
    const int64_t n = rows[i] * row;
    SY_CHECK(n <= std::numeric_limits<int>::max() && offset <= std::numeric_limits<int>::max(),
             "MPI message of ", n, " elements exceeds the int range");
    counts[i] = static_cast<int>(n);
    displs[i] = static_cast<int>(offset);
    offset += n;
  }
}

int64_t total(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t x : v) s += x;
  return s;
}

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
    SY_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    SY_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  ~MpiCommunicator() override {
    if (owned_) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_reduce_sum(Tensor buf) override {
    SY_CHECK(buf.numel() <= std::numeric_limits<int>::max(), "all_reduce of ", buf.numel());
    SY_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf.data, static_cast<int>(buf.numel()), MPI_FLOAT,
                               MPI_SUM, comm_));
  }

  void reduce_scatter_sum(Tensor out, Tensor in, const std::vector<int64_t>& counts) override {
    check_counts(counts, "reduce_scatter");
    const int64_t row = in.row_numel();
    SY_CHECK(in.dtype == DType::kF32 && out.dtype == DType::kF32, "reduce_scatter: F32 only");
    SY_CHECK(in.size(0) == total(counts) && out.size(0) == counts[rank_] && out.row_numel() == row,
             "reduce_scatter: in ", in.shape_str(), ", out ", out.shape_str(),
             " for counts of rank ", rank_, " = ", counts[rank_]);
    to_elements(counts, row, counts_, displs_);
    SY_MPI_CHECK(MPI_Reduce_scatter(in.data, out.data, counts_.data(), MPI_FLOAT, MPI_SUM, comm_));
  }

  void all_gather(Tensor out, Tensor in, const std::vector<int64_t>& counts) override {
    check_counts(counts, "all_gather");
    const int64_t row = out.row_numel();
    SY_CHECK(in.dtype == out.dtype, "all_gather: dtypes differ");
    SY_CHECK(out.size(0) == total(counts) && in.size(0) == counts[rank_] && in.row_numel() == row,
             "all_gather: in ", in.shape_str(), ", out ", out.shape_str());
    to_elements(counts, row, counts_, displs_);
    SY_MPI_CHECK(MPI_Allgatherv(in.data, counts_[rank_], mpi_type(in.dtype), out.data,
                                counts_.data(), displs_.data(), mpi_type(out.dtype), comm_));
  }

  void all_to_all(Tensor out, const std::vector<int64_t>& recv_counts, Tensor in,
                  const std::vector<int64_t>& send_counts) override {
    check_counts(recv_counts, "all_to_all recv");
    check_counts(send_counts, "all_to_all send");
    SY_CHECK(in.dtype == out.dtype, "all_to_all: dtypes differ");
    const int64_t row = in.row_numel();
    SY_CHECK(in.size(0) >= total(send_counts) && out.size(0) >= total(recv_counts),
             "all_to_all: ", total(send_counts), " rows to send from ", in.shape_str(), ", ",
             total(recv_counts), " to receive into ", out.shape_str());
    SY_CHECK(out.row_numel() == in.row_numel(), "all_to_all: row sizes differ: ", in.shape_str(),
             " and ", out.shape_str());
    to_elements(send_counts, row, counts_, displs_);
    to_elements(recv_counts, row, recv_counts_, recv_displs_);
    SY_MPI_CHECK(MPI_Alltoallv(in.data, counts_.data(), displs_.data(), mpi_type(in.dtype),
                               out.data, recv_counts_.data(), recv_displs_.data(),
                               mpi_type(out.dtype), comm_));
  }

  void broadcast(void* data, size_t bytes, int root) override {
    SY_CHECK(bytes <= static_cast<size_t>(std::numeric_limits<int>::max()), "broadcast of ", bytes,
             " bytes");
    SY_MPI_CHECK(MPI_Bcast(data, static_cast<int>(bytes), MPI_BYTE, root, comm_));
  }

  void broadcast_idle(void* data, size_t bytes, int root, int max_sleep_ms) override {
    SY_CHECK(bytes <= static_cast<size_t>(std::numeric_limits<int>::max()), "broadcast of ", bytes,
             " bytes");
    MPI_Request request;
    SY_MPI_CHECK(MPI_Ibcast(data, static_cast<int>(bytes), MPI_BYTE, root, comm_, &request));
    if (rank_ == root) {
      SY_MPI_CHECK(MPI_Wait(&request, MPI_STATUS_IGNORE));
      return;
    }
    int done = 0;
    int64_t sleep_us = 20;
    for (;;) {
      SY_MPI_CHECK(MPI_Test(&request, &done, MPI_STATUS_IGNORE));
      if (done) return;
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      sleep_us = std::min<int64_t>(sleep_us * 2, int64_t{max_sleep_ms} * 1000);
    }
  }

  void barrier() override { SY_MPI_CHECK(MPI_Barrier(comm_)); }

  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm sub;
    SY_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
    MPI_Comm_set_errhandler(sub, MPI_ERRORS_RETURN);
    return std::make_unique<MpiCommunicator>(sub, true);
  }

 private:
  void check_counts(const std::vector<int64_t>& counts, const char* what) const {
    SY_CHECK(static_cast<int>(counts.size()) == size_, what, ": ", counts.size(), " counts for ",
             size_, " ranks");
  }

  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0;
  int size_ = 1;
  // Scratch reused across calls (resized only when the communicator size changes).
  std::vector<int> counts_, displs_, recv_counts_, recv_displs_;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_world_communicator() {
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false);
}

}  // namespace sy
