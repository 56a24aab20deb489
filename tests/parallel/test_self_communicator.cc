// The one-rank communicator (no MPI): every collective copies or keeps its rows, counts and
// shapes are checked as in the MPI communicator.
#include <gtest/gtest.h>

#include <numeric>

#include "parallel/communicator.h"

namespace sy {
namespace {

TEST(SelfCommunicator, CollectivesOnOneRank) {
  auto c = make_self_communicator();
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  std::vector<float> in(3 * 5), out(3 * 5, -1.f);
  std::iota(in.begin(), in.end(), 1.f);
  c->all_to_all(Tensor(out.data(), DType::kF32, {3, 5}), {3},
                Tensor(in.data(), DType::kF32, {3, 5}), {3});
  EXPECT_EQ(out, in);
  std::fill(out.begin(), out.end(), -1.f);
  c->reduce_scatter_sum(Tensor(out.data(), DType::kF32, {3, 5}),
                        Tensor(in.data(), DType::kF32, {3, 5}), {3});
  EXPECT_EQ(out, in);
  std::fill(out.begin(), out.end(), -1.f);
  c->all_gather(Tensor(out.data(), DType::kF32, {3, 5}), Tensor(in.data(), DType::kF32, {3, 5}),
                {3});
  EXPECT_EQ(out, in);
  std::vector<float> sum = in;
  c->all_reduce_sum(Tensor(sum.data(), DType::kF32, {15}));
  EXPECT_EQ(sum, in);
  int32_t token = 7;
  c->broadcast(&token, sizeof(token), 0);
  EXPECT_EQ(token, 7);
  c->barrier();
  auto sub = c->split(3, 0);
  EXPECT_EQ(sub->size(), 1);
  float dummy = 0;
  c->all_to_all(Tensor(&dummy, DType::kF32, {0, 4}), {0}, Tensor(&dummy, DType::kF32, {0, 4}), {0});
}

TEST(SelfCommunicator, BadArgumentsAreErrors) {
  auto c = make_self_communicator();
  float x[4] = {};
  EXPECT_THROW(
      c->all_gather(Tensor(x, DType::kF32, {2, 2}), Tensor(x, DType::kF32, {2, 2}), {1, 1}), Error);
  EXPECT_THROW(
      c->all_to_all(Tensor(x, DType::kF32, {1, 2}), {1}, Tensor(x, DType::kF32, {2, 2}), {2}),
      Error);
  EXPECT_THROW(c->all_reduce_sum(Tensor(x, DType::kF32, {4}, Device::kCuda)), Error);
  EXPECT_THROW(c->broadcast(x, sizeof(x), 1), Error);
}

}  // namespace
}  // namespace sy
