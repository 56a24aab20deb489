// The CUDA emulator has no NCCL: one emulated device per process, so ranks share it and use MPI
// with host staging (--comm mpi, which --comm auto picks). These stand in for
// parallel/nccl_communicator.cc in the emulator's binaries.
#include "kernels/error.h"
#include "parallel/nccl_communicator.h"

namespace sy {

std::unique_ptr<Communicator> make_nccl_communicator(Communicator&, int, cudaStream_t) {
  SY_FAIL("NCCL: the CUDA emulator has none; use --comm mpi");
}

void abort_nccl_communicators() noexcept {}

}  // namespace sy
