// Communicators for ranks whose tensors live on a GPU.
//
// A routed communicator sends every collective on host tensors (and the host broadcasts of step
// plans) through a host communicator (MPI), and every collective on device tensors either
// through a device communicator (NCCL, one GPU per rank) or, when there is none, through the
// host communicator with host staging: the device rows are copied to host memory by the ops
// backend, exchanged over MPI, and copied back. Staging lets several ranks share one GPU, which
// NCCL refuses, so multi-rank runs work (slowly) on a single GPU.
#pragma once

#include <memory>

#include "kernels/ops.h"
#include "parallel/communicator.h"

namespace sy {

// `host` (not owned) must outlive the result; `device` may be null (host staging through
// `ops`, not owned). Both must span the same ranks in the same order.
std::unique_ptr<Communicator> make_routed_communicator(Communicator& host,
                                                       std::unique_ptr<Communicator> device,
                                                       Ops& ops);

}  // namespace sy
