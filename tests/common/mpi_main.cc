// main() of the MPI test binaries (label mpi): initialises MPI, lets only rank 0 print, and
// fails the job when any rank fails.
#include <gtest/gtest.h>
#include <mpi.h>

#include "parallel/mpi_env.h"

int main(int argc, char** argv) {
  sy::MpiEnv env(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (!env.is_root()) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (env.is_root() && any_failed && !failed) std::printf("a test failed on another rank\n");
  return any_failed;
}
