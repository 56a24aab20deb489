// The MPI communicator under mpiexec -n 1..8: every collective with seeded data that each rank
// checks locally (n_wrong == 0), with unequal and zero counts, on the world and on sub-groups.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "parallel/communicator.h"

namespace sy {
namespace {

// The value rank `src` puts in row `row`, element `i`, of a message for `dst`.
float value(int src, int dst, int64_t row, int64_t i) {
  return static_cast<float>(src * 1000 + dst * 100 + row * 7 + i) * 0.5f;
}

// Total wrong elements over every rank (each rank counts its own).
int64_t sum_over_ranks(Communicator& comm, int64_t n_wrong) {
  float v = static_cast<float>(n_wrong);
  comm.all_reduce_sum(Tensor(&v, DType::kF32, {1}));
  return static_cast<int64_t>(v);
}

class CommunicatorTest : public ::testing::Test {
 protected:
  void SetUp() override { world_ = make_mpi_world_communicator(); }
  std::unique_ptr<Communicator> world_;
};

void check_all_to_all(Communicator& c, int64_t dim) {
  const int W = c.size(), me = c.rank();
  // Unequal counts, including zeros: rank s sends (s + d) % 3 rows to rank d.
  auto count = [&](int s, int d) { return static_cast<int64_t>((s + d) % 3); };
  std::vector<int64_t> send(W), recv(W);
  for (int p = 0; p < W; ++p) {
    send[p] = count(me, p);
    recv[p] = count(p, me);
  }
  const int64_t n_send = std::accumulate(send.begin(), send.end(), int64_t{0});
  const int64_t n_recv = std::accumulate(recv.begin(), recv.end(), int64_t{0});
  std::vector<float> in(std::max<int64_t>(n_send, 1) * dim),
      out(std::max<int64_t>(n_recv, 1) * dim, -1.f);
  int64_t r = 0;
  for (int p = 0; p < W; ++p)
    for (int64_t j = 0; j < send[p]; ++j, ++r)
      for (int64_t i = 0; i < dim; ++i) in[r * dim + i] = value(me, p, j, i);
  c.all_to_all(Tensor(out.data(), DType::kF32, {n_recv, dim}), recv,
               Tensor(in.data(), DType::kF32, {n_send, dim}), send);
  int64_t n_wrong = 0;
  r = 0;
  for (int p = 0; p < W; ++p)
    for (int64_t j = 0; j < recv[p]; ++j, ++r)
      for (int64_t i = 0; i < dim; ++i) n_wrong += out[r * dim + i] != value(p, me, j, i);
  EXPECT_EQ(sum_over_ranks(c, n_wrong), 0);
}

TEST_F(CommunicatorTest, AllToAllUnequalAndZeroCounts) {
  check_all_to_all(*world_, 5);
  check_all_to_all(*world_, 1);
}

TEST_F(CommunicatorTest, AllToAllNothingAnywhere) {
  const int W = world_->size();
  std::vector<int64_t> zero(W, 0);
  float dummy = 0;
  world_->all_to_all(Tensor(&dummy, DType::kF32, {0, 4}), zero, Tensor(&dummy, DType::kF32, {0, 4}),
                     zero);
  SUCCEED();
}

TEST_F(CommunicatorTest, AllReduceSum) {
  const int W = world_->size(), me = world_->rank();
  std::vector<float> buf(13);
  for (int64_t i = 0; i < 13; ++i) buf[i] = value(me, 0, 0, i);
  world_->all_reduce_sum(Tensor(buf.data(), DType::kF32, {13}));
  int64_t n_wrong = 0;
  for (int64_t i = 0; i < 13; ++i) {
    float want = 0;
    for (int s = 0; s < W; ++s) want += value(s, 0, 0, i);
    n_wrong += std::fabs(buf[i] - want) > 1e-3f * std::fabs(want);
  }
  EXPECT_EQ(sum_over_ranks(*world_, n_wrong), 0);
}

TEST_F(CommunicatorTest, ReduceScatterAndAllGatherUnequalCounts) {
  const int W = world_->size(), me = world_->rank();
  const int64_t dim = 3;
  std::vector<int64_t> counts(W);
  for (int r = 0; r < W; ++r) counts[r] = r % 2 == 0 ? 2 : 0;  // odd ranks own nothing
  counts[0] = 1;
  const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  std::vector<float> in(total * dim), mine(std::max<int64_t>(counts[me], 1) * dim);
  for (int64_t j = 0; j < total * dim; ++j) in[j] = value(me, 0, j / dim, j % dim);
  world_->reduce_scatter_sum(Tensor(mine.data(), DType::kF32, {counts[me], dim}),
                             Tensor(in.data(), DType::kF32, {total, dim}), counts);
  const int64_t begin = std::accumulate(counts.begin(), counts.begin() + me, int64_t{0});
  int64_t n_wrong = 0;
  for (int64_t j = 0; j < counts[me] * dim; ++j) {
    float want = 0;
    for (int s = 0; s < W; ++s) want += value(s, 0, begin + j / dim, j % dim);
    n_wrong += std::fabs(mine[j] - want) > 1e-3f * std::fabs(want);
  }
  // All-gather each rank's rows back: every rank then holds the full reduced tensor.
  std::vector<float> all(total * dim);
  world_->all_gather(Tensor(all.data(), DType::kF32, {total, dim}),
                     Tensor(mine.data(), DType::kF32, {counts[me], dim}), counts);
  for (int64_t j = 0; j < total * dim; ++j) {
    float want = 0;
    for (int s = 0; s < W; ++s) want += value(s, 0, j / dim, j % dim);
    n_wrong += std::fabs(all[j] - want) > 1e-3f * std::fabs(want);
  }
  EXPECT_EQ(sum_over_ranks(*world_, n_wrong), 0);
}

TEST_F(CommunicatorTest, BroadcastAndSubGroups) {
  const int W = world_->size(), me = world_->rank();
  int32_t token = me == 0 ? 4242 : -1;
  world_->broadcast(&token, sizeof(token), 0);
  int64_t n_wrong = token != 4242;
  // Split into groups of 2 consecutive ranks; all-to-all inside each group.
  auto group = world_->split(me / 2, me % 2);
  n_wrong += group->rank() != me % 2;
  n_wrong += group->size() != std::min(2, W - (me / 2) * 2);
  check_all_to_all(*group, 4);
  world_->barrier();
  EXPECT_EQ(sum_over_ranks(*world_, n_wrong), 0);
}

TEST_F(CommunicatorTest, BadCountsAreErrors) {
  std::vector<int64_t> wrong_size(world_->size() + 1, 0);
  float dummy = 0;
  EXPECT_THROW(world_->all_gather(Tensor(&dummy, DType::kF32, {0, 1}),
                                  Tensor(&dummy, DType::kF32, {0, 1}), wrong_size),
               Error);
}

}  // namespace
}  // namespace sy
