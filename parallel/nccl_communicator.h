// The NCCL communicator: the collectives of communicator.h on CUDA device buffers, one GPU per
// rank. Built only with the CUDA backend; code that uses it checks `#ifdef SY_HAVE_NCCL`.
//
// Every collective is enqueued on one CUDA stream. On the communicator's own stream it is waited
// for before the call returns, so callers see finished results in device memory. On the stream
// it is given (the compute stream of the ops backend) it is only enqueued (stream_ordered()): it
// reads the results of the kernels enqueued before it, the kernels enqueued after it read its
// results, nothing waits for the GPU, and a step of kernels and collectives can be recorded as a
// CUDA graph. The host sees the results once the backend waits for its stream (a copy to the
// host); that wait watches every NCCL communicator for asynchronous errors (cuda::wait_for_stream),
// so a collective a failed peer never joins ends the wait with an error. barrier() always waits.
// Counts may differ between ranks and may be zero, as in the MPI communicator:
//   reduce_scatter_sum  equal counts: ncclReduceScatter; otherwise one ncclReduce per
//                       destination rank (root = that rank) in one NCCL group, no padding
//   all_gather          equal counts: ncclAllGather; otherwise one ncclBroadcast per source
//                       rank (root = that rank) in one NCCL group
//   all_to_all          one NCCL group of ncclSend / ncclRecv per peer with rows; the rows a
//                       rank keeps are a device-to-device copy on the same stream
// Rows are moved as bytes (any dtype); the reductions take F32.
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "parallel/communicator.h"

namespace sy {

// Builds an NCCL communicator over the ranks of `bootstrap` (a host communicator, e.g. MPI:
// rank 0's ncclUniqueId travels by its broadcast) on CUDA device `device` of this node, which
// becomes the current device. Collective over `bootstrap`. Every rank checks its device first
// and all ranks throw the same error when any rank lacks one, so none waits in NCCL's set-up.
// The caller picks the device from the node-local rank (MpiEnv::local_rank()).
// With `stream` (not owned) every collective is enqueued on it, after the kernels already
// there: pass the compute stream of the ops backend (cuda::stream_of) so that collectives read
// finished inputs. Communicators split from it share the stream.
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device,
                                                     cudaStream_t stream = nullptr);

// Aborts every NCCL communicator of this process (ncclCommAbort), for the error path of the top
// level before the job ends: this rank's pending NCCL work is cancelled instead of waiting for
// peers. The communicators are unusable afterwards. Never throws.
void abort_nccl_communicators() noexcept;

}  // namespace sy
