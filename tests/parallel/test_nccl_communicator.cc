// The NCCL communicator under mpiexec -n 1..2, one GPU per rank (and on the CUDA emulator's
// NCCL under -n 1..4, as mpi.emu.*): the cases of test_communicator.cc on device buffers (seeded
// data, each rank checks locally, n_wrong == 0), with unequal and zero counts, the equal-count
// fast paths, bf16 rows and sub-groups; stream-ordered collectives chained without waits and
// recorded into a CUDA graph; an asynchronous error ending a wait. Skips on every rank when some
// rank of the job has no GPU of its own (NCCL refuses two ranks on one).
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string>

#include "kernels/cuda/device.h"
#include "parallel/communicator.h"
#include "parallel/nccl_communicator.h"

namespace sy {
namespace {

// The value rank `src` puts in row `row`, element `i`, of a message for `dst`.
float value(int src, int dst, int64_t row, int64_t i) {
  return static_cast<float>(src * 1000 + dst * 100 + row * 7 + i) * 0.5f;
}

// Device memory for `n` elements of `dtype`, with host copies in and out.
class DeviceBuffer {
 public:
  DeviceBuffer(int64_t n, DType dtype) : bytes_(static_cast<size_t>(n) * dtype_size(dtype)) {
    SY_CUDA_CHECK(cudaMalloc(&data_, std::max<size_t>(bytes_, 1)));
  }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <typename T>
  void upload(const std::vector<T>& host) {
    SY_CUDA_CHECK(cudaMemcpy(data_, host.data(), std::min(bytes_, host.size() * sizeof(T)),
                             cudaMemcpyHostToDevice));
  }
  template <typename T>
  void download(std::vector<T>& host) const {
    SY_CUDA_CHECK(cudaMemcpy(host.data(), data_, std::min(bytes_, host.size() * sizeof(T)),
                             cudaMemcpyDeviceToHost));
  }
  Tensor view(DType dtype, int64_t rows, int64_t dim) const {
    return Tensor(data_, dtype, {rows, dim}, Device::kCuda);
  }
  void* data() const { return data_; }

 private:
  size_t bytes_;
  void* data_ = nullptr;
};

// A stream of the test's own, for a stream-ordered communicator (destroyed after it).
struct TestStream {
  TestStream() { SY_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)); }
  ~TestStream() { cudaStreamDestroy(stream); }
  TestStream(const TestStream&) = delete;
  TestStream& operator=(const TestStream&) = delete;
  cudaStream_t stream = nullptr;
};

// Ranks of this job on this node, and this rank among them.
void node_ranks(int* local_rank, int* local_size) {
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, local_rank);
  MPI_Comm_size(node, local_size);
  MPI_Comm_free(&node);
}

class NcclCommunicatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mpi_ = make_mpi_world_communicator();
    int local_rank = 0, local_size = 1;
    node_ranks(&local_rank, &local_size);
    const int n_devices = cuda::device_count();
    // Every rank decides together: one rank skipping alone would leave the others waiting.
    float n_short = n_devices < local_size ? 1.f : 0.f;
    mpi_->all_reduce_sum(Tensor(&n_short, DType::kF32, {1}));
    if (n_short > 0)
      GTEST_SKIP() << "no CUDA device for each rank: this node has " << n_devices
                   << " CUDA device(s) for " << local_size
                   << " rank(s), and NCCL needs one device per rank";
    device_ = local_rank;
    nccl_ = make_nccl_communicator(*mpi_, local_rank);
  }
  int nccl_device() const { return device_; }

  // Total wrong elements over every rank (each rank counts its own), summed through MPI.
  int64_t sum_over_ranks(int64_t n_wrong) {
    float v = static_cast<float>(n_wrong);
    mpi_->all_reduce_sum(Tensor(&v, DType::kF32, {1}));
    return static_cast<int64_t>(v);
  }

  std::unique_ptr<Communicator> mpi_;
  std::unique_ptr<Communicator> nccl_;
  int device_ = 0;
};

// Unequal counts, including zeros: rank s sends (s + d + shift) % 3 rows to rank d.
int64_t check_all_to_all(Communicator& c, int64_t dim, int shift) {
  const int W = c.size(), me = c.rank();
  auto count = [&](int s, int d) { return static_cast<int64_t>((s + d + shift) % 3); };
  std::vector<int64_t> send(W), recv(W);
  for (int p = 0; p < W; ++p) {
    send[p] = count(me, p);
    recv[p] = count(p, me);
  }
  const int64_t n_send = std::accumulate(send.begin(), send.end(), int64_t{0});
  const int64_t n_recv = std::accumulate(recv.begin(), recv.end(), int64_t{0});
  std::vector<float> in(n_send * dim), out(n_recv * dim, -1.f);
  int64_t r = 0;
  for (int p = 0; p < W; ++p)
    for (int64_t j = 0; j < send[p]; ++j, ++r)
      for (int64_t i = 0; i < dim; ++i) in[r * dim + i] = value(me, p, j, i);
  DeviceBuffer d_in(n_send * dim, DType::kF32), d_out(n_recv * dim, DType::kF32);
  d_in.upload(in);
  d_out.upload(out);
  c.all_to_all(d_out.view(DType::kF32, n_recv, dim), recv, d_in.view(DType::kF32, n_send, dim),
               send);
  d_out.download(out);
  int64_t n_wrong = 0;
  r = 0;
  for (int p = 0; p < W; ++p)
    for (int64_t j = 0; j < recv[p]; ++j, ++r)
      for (int64_t i = 0; i < dim; ++i) n_wrong += out[r * dim + i] != value(p, me, j, i);
  return n_wrong;
}

TEST_F(NcclCommunicatorTest, AllToAllUnequalAndZeroCounts) {
  int64_t n_wrong = 0;
  for (int shift = 0; shift < 3; ++shift) {
    n_wrong += check_all_to_all(*nccl_, 5, shift);
    n_wrong += check_all_to_all(*nccl_, 1, shift);
    n_wrong += check_all_to_all(*nccl_, 733, shift);
  }
  EXPECT_EQ(sum_over_ranks(n_wrong), 0);
}

TEST_F(NcclCommunicatorTest, AllToAllBf16Rows) {
  const int W = nccl_->size(), me = nccl_->rank();
  const int64_t dim = 19;
  // Rank s sends s + d + 1 rows to rank d; the 16-bit words must arrive unchanged.
  std::vector<int64_t> send(W), recv(W);
  for (int p = 0; p < W; ++p) {
    send[p] = me + p + 1;
    recv[p] = p + me + 1;
  }
  const int64_t n_send = std::accumulate(send.begin(), send.end(), int64_t{0});
  const int64_t n_recv = std::accumulate(recv.begin(), recv.end(), int64_t{0});
  auto word = [](int s, int d, int64_t j, int64_t i) {
    return f32_to_bf16(value(s, d, j, i) / 64.f);
  };
  std::vector<uint16_t> in(n_send * dim), out(n_recv * dim, 0xffff);
  int64_t r = 0;
  for (int p = 0; p < W; ++p)
    for (int64_t j = 0; j < send[p]; ++j, ++r)
      for (int64_t i = 0; i < dim; ++i) in[r * dim + i] = word(me, p, j, i);
  DeviceBuffer d_in(n_send * dim, DType::kBF16), d_out(n_recv * dim, DType::kBF16);
  d_in.upload(in);
  nccl_->all_to_all(d_out.view(DType::kBF16, n_recv, dim), recv,
                    d_in.view(DType::kBF16, n_send, dim), send);
  d_out.download(out);
  int64_t n_wrong = 0;
  r = 0;
  for (int p = 0; p < W; ++p)
    for (int64_t j = 0; j < recv[p]; ++j, ++r)
      for (int64_t i = 0; i < dim; ++i) n_wrong += out[r * dim + i] != word(p, me, j, i);
  EXPECT_EQ(sum_over_ranks(n_wrong), 0);
}

TEST_F(NcclCommunicatorTest, AllToAllNothingAnywhere) {
  const int W = nccl_->size();
  std::vector<int64_t> zero(W, 0);
  DeviceBuffer dummy(0, DType::kF32);
  nccl_->all_to_all(dummy.view(DType::kF32, 0, 4), zero, dummy.view(DType::kF32, 0, 4), zero);
  SUCCEED();
}

TEST_F(NcclCommunicatorTest, AllReduceSum) {
  const int W = nccl_->size(), me = nccl_->rank();
  int64_t n_wrong = 0;
  for (int64_t n : {1, 13, 4099}) {
    std::vector<float> buf(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = value(me, 0, 0, i);
    DeviceBuffer d(n, DType::kF32);
    d.upload(buf);
    nccl_->all_reduce_sum(Tensor(d.data(), DType::kF32, {n}, Device::kCuda));
    d.download(buf);
    for (int64_t i = 0; i < n; ++i) {
      float want = 0;
      for (int s = 0; s < W; ++s) want += value(s, 0, 0, i);
      n_wrong += std::fabs(buf[i] - want) > 1e-3f * std::fabs(want);
    }
  }
  EXPECT_EQ(sum_over_ranks(n_wrong), 0);
}

// Reduce-scatter with `counts`, then all-gather the result back: every rank holds the sum.
int64_t check_reduce_scatter_all_gather(Communicator& c, const std::vector<int64_t>& counts,
                                        int64_t dim) {
  const int W = c.size(), me = c.rank();
  const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  std::vector<float> in(total * dim), mine(counts[me] * dim);
  for (int64_t j = 0; j < total * dim; ++j) in[j] = value(me, 0, j / dim, j % dim);
  DeviceBuffer d_in(total * dim, DType::kF32), d_mine(counts[me] * dim, DType::kF32);
  d_in.upload(in);
  c.reduce_scatter_sum(d_mine.view(DType::kF32, counts[me], dim),
                       d_in.view(DType::kF32, total, dim), counts);
  d_mine.download(mine);
  const int64_t begin = std::accumulate(counts.begin(), counts.begin() + me, int64_t{0});
  int64_t n_wrong = 0;
  for (int64_t j = 0; j < counts[me] * dim; ++j) {
    float want = 0;
    for (int s = 0; s < W; ++s) want += value(s, 0, begin + j / dim, j % dim);
    n_wrong += std::fabs(mine[j] - want) > 1e-3f * std::fabs(want);
  }
  std::vector<float> all(total * dim, -1.f);
  DeviceBuffer d_all(total * dim, DType::kF32);
  c.all_gather(d_all.view(DType::kF32, total, dim), d_mine.view(DType::kF32, counts[me], dim),
               counts);
  d_all.download(all);
  for (int64_t j = 0; j < total * dim; ++j) {
    float want = 0;
    for (int s = 0; s < W; ++s) want += value(s, 0, j / dim, j % dim);
    n_wrong += std::fabs(all[j] - want) > 1e-3f * std::fabs(want);
  }
  return n_wrong;
}

TEST_F(NcclCommunicatorTest, ReduceScatterAndAllGatherUnequalCounts) {
  const int W = nccl_->size();
  std::vector<int64_t> counts(W);
  for (int r = 0; r < W; ++r) counts[r] = r % 2 == 0 ? 2 : 0;  // odd ranks own nothing
  counts[0] = 1;
  int64_t n_wrong = check_reduce_scatter_all_gather(*nccl_, counts, 3);
  for (int r = 0; r < W; ++r) counts[r] = 3 + r * 4;  // all unequal
  n_wrong += check_reduce_scatter_all_gather(*nccl_, counts, 7);
  EXPECT_EQ(sum_over_ranks(n_wrong), 0);
}

TEST_F(NcclCommunicatorTest, ReduceScatterAndAllGatherEqualCounts) {
  const int W = nccl_->size();
  int64_t n_wrong = check_reduce_scatter_all_gather(*nccl_, std::vector<int64_t>(W, 5), 19);
  n_wrong += check_reduce_scatter_all_gather(*nccl_, std::vector<int64_t>(W, 0), 3);
  EXPECT_EQ(sum_over_ranks(n_wrong), 0);
}

TEST_F(NcclCommunicatorTest, BroadcastAndSubGroups) {
  const int W = nccl_->size(), me = nccl_->rank();
  std::vector<int32_t> token(3, me == 0 ? 4242 : -1);
  DeviceBuffer d(3, DType::kI32);
  d.upload(token);
  nccl_->broadcast(d.data(), 3 * sizeof(int32_t), 0);
  d.download(token);
  int64_t n_wrong = 0;
  for (int32_t t : token) n_wrong += t != 4242;
  // Split into groups of 2 consecutive ranks; all-to-all inside each group.
  auto group = nccl_->split(me / 2, me % 2);
  n_wrong += group->rank() != me % 2;
  n_wrong += group->size() != std::min(2, W - (me / 2) * 2);
  n_wrong += check_all_to_all(*group, 4, 0);
  // Reversed order inside one group of everyone.
  auto reversed = nccl_->split(0, W - 1 - me);
  n_wrong += reversed->rank() != W - 1 - me;
  n_wrong += check_all_to_all(*reversed, 2, 1);
  nccl_->barrier();
  EXPECT_EQ(sum_over_ranks(n_wrong), 0);
}

// A communicator on a given stream only enqueues: collectives chained without a wait read each
// other's results in stream order, and the host sees them after one wait for the stream.
TEST_F(NcclCommunicatorTest, StreamOrderedCollectivesChainWithoutWaiting) {
  const int W = nccl_->size(), me = nccl_->rank();
  const TestStream own;
  cudaStream_t stream = own.stream;
  int64_t n_wrong = 0;
  {
    auto ordered = make_nccl_communicator(*mpi_, nccl_device(), stream);
    EXPECT_TRUE(ordered->stream_ordered());
    EXPECT_FALSE(nccl_->stream_ordered());
    const int64_t n = 37;
    std::vector<float> mine(n);
    for (int64_t i = 0; i < n; ++i) mine[i] = value(me, 0, 0, i);
    DeviceBuffer d_mine(n, DType::kF32), d_all(n * W, DType::kF32);
    SY_CUDA_CHECK(cudaMemcpyAsync(d_mine.data(), mine.data(), n * sizeof(float),
                                  cudaMemcpyHostToDevice, stream));
    // sum = all-reduce(mine); all = all-gather(sum) on every rank: W copies of the sum.
    ordered->all_reduce_sum(d_mine.view(DType::kF32, 1, n));
    ordered->all_gather(d_all.view(DType::kF32, W, n), d_mine.view(DType::kF32, 1, n),
                        std::vector<int64_t>(static_cast<size_t>(W), 1));
    std::vector<float> all(n * W, -1.f);
    SY_CUDA_CHECK(cudaMemcpyAsync(all.data(), d_all.data(), all.size() * sizeof(float),
                                  cudaMemcpyDeviceToHost, stream));
    cuda::wait_for_stream(stream, "the test's collectives");
    for (int64_t j = 0; j < n * W; ++j) {
      float want = 0;
      for (int s = 0; s < W; ++s) want += value(s, 0, 0, j % n);
      n_wrong += std::fabs(all[j] - want) > 1e-3f * std::fabs(want);
    }
  }
  EXPECT_EQ(sum_over_ranks(n_wrong), 0);
}

// Stream-ordered collectives record into a CUDA graph: each launch runs them again. An in-place
// all-reduce launched twice leaves W times the sum.
TEST_F(NcclCommunicatorTest, StreamOrderedCollectivesRecordIntoGraphs) {
  const int W = nccl_->size(), me = nccl_->rank();
  const TestStream own;
  cudaStream_t stream = own.stream;
  int64_t n_wrong = 0;
  {
    auto ordered = make_nccl_communicator(*mpi_, nccl_device(), stream);
    const int64_t n = 5;
    std::vector<float> buf(n);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(me + 1 + i);
    DeviceBuffer d(n, DType::kF32);
    d.upload(buf);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    SY_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    ordered->all_reduce_sum(d.view(DType::kF32, 1, n));
    SY_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    SY_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    d.download(buf);  // recording runs nothing
    for (int64_t i = 0; i < n; ++i) n_wrong += buf[i] != static_cast<float>(me + 1 + i);
    SY_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    SY_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    cuda::wait_for_stream(stream, "the graph");
    d.download(buf);
    for (int64_t i = 0; i < n; ++i) {
      float sum = 0;
      for (int s = 0; s < W; ++s) sum += static_cast<float>(s + 1 + i);
      n_wrong += buf[i] != static_cast<float>(W) * sum;
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  EXPECT_EQ(sum_over_ranks(n_wrong), 0);
}

// A peer that fails mid-collective: NCCL reports an asynchronous error, and the next wait for the
// stream ends with it (instead of waiting forever), naming it; the communicator is then aborted.
// Needs an NCCL that fails on request: the emulated one, with SY_CUDA_EMU_NCCL_FAIL_AFTER.
TEST_F(NcclCommunicatorTest, AsyncErrorEndsTheWait) {
  if (std::getenv("SY_CUDA_EMU_NCCL_FAIL_AFTER") == nullptr)
    GTEST_SKIP() << "needs the emulated NCCL with SY_CUDA_EMU_NCCL_FAIL_AFTER";
  const TestStream own;
  cudaStream_t stream = own.stream;
  {
    auto ordered = make_nccl_communicator(*mpi_, nccl_device(), stream);
    DeviceBuffer d(4, DType::kF32);
    ordered->all_reduce_sum(d.view(DType::kF32, 1, 4));  // enqueued: no wait, no error yet
    try {
      cuda::wait_for_stream(stream, "the test's collective");
      ADD_FAILURE() << "the wait ended without an error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("asynchronous NCCL error"), std::string::npos)
          << e.what();
    }
    EXPECT_THROW(ordered->all_reduce_sum(d.view(DType::kF32, 1, 4)), Error);  // aborted
  }
}

// A call that fails inside an NCCL group (unequal all-gather counts: one broadcast per rank)
// aborts the communicator and closes the group: NCCL's group depth is per thread, and a group
// left open would swallow every later call of the thread. A new communicator then works.
TEST_F(NcclCommunicatorTest, ACallFailingInAGroupAbortsAndClosesIt) {
  if (std::getenv("SY_CUDA_EMU_NCCL_FAIL_AFTER") != nullptr || cuda::device_count() == 0 ||
      nccl_->size() < 2)
    GTEST_SKIP() << "needs the emulated NCCL, without failures of its own, on 2 ranks or more";
  const int W = nccl_->size(), me = nccl_->rank();
  std::vector<int64_t> counts(W);
  for (int r = 0; r < W; ++r) counts[r] = 1 + r;
  const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  DeviceBuffer in(counts[me] * 2, DType::kF32), out(total * 2, DType::kF32);
  setenv("SY_CUDA_EMU_NCCL_REFUSE_IN_GROUP", "1", 1);
  try {
    nccl_->all_gather(out.view(DType::kF32, total, 2), in.view(DType::kF32, counts[me], 2), counts);
    ADD_FAILURE() << "the refused call did not fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("refused"), std::string::npos) << e.what();
  }
  unsetenv("SY_CUDA_EMU_NCCL_REFUSE_IN_GROUP");
  EXPECT_THROW(nccl_->all_reduce_sum(in.view(DType::kF32, counts[me], 2)), Error);  // aborted
  auto fresh = make_nccl_communicator(*mpi_, nccl_device());
  std::vector<float> ones(4, 1.f);
  DeviceBuffer d(4, DType::kF32);
  d.upload(ones);
  fresh->all_reduce_sum(d.view(DType::kF32, 1, 4));
  d.download(ones);
  int64_t n_wrong = 0;
  for (float v : ones) n_wrong += v != static_cast<float>(W);
  EXPECT_EQ(sum_over_ranks(n_wrong), 0);
}

TEST_F(NcclCommunicatorTest, BadArgumentsAreErrors) {
  std::vector<int64_t> wrong_size(nccl_->size() + 1, 0);
  DeviceBuffer dummy(1, DType::kF32);
  EXPECT_THROW(
      nccl_->all_gather(dummy.view(DType::kF32, 0, 1), dummy.view(DType::kF32, 0, 1), wrong_size),
      Error);
  // Host buffers are refused with an error, not handed to NCCL.
  float host = 1.f;
  EXPECT_THROW(nccl_->all_reduce_sum(Tensor(&host, DType::kF32, {1})), Error);
  EXPECT_THROW(nccl_->broadcast(&host, sizeof(host), 0), Error);
}

}  // namespace
}  // namespace sy
