// The communicator interface: the collectives one layer needs, over host (MPI) or device (NCCL)
// buffers. Every rank of the communicator must call every collective, in the same order, also
// with zero counts; counts are in rows of the tensor's row size (Tensor::row_numel()).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/tensor.h"

namespace sy {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // True when collectives on device tensors are only enqueued on the ops backend's stream, in
  // order with its kernels, and return without waiting for the device or copying through the
  // host: a step of kernels and such collectives can then be recorded as a CUDA graph.
  virtual bool stream_ordered() const { return false; }

  // buf = sum over ranks of buf, in place. F32.
  virtual void all_reduce_sum(Tensor buf) = 0;
  // in: [sum(counts), row] on every rank; out: [counts[rank], row] = sum over ranks of this
  // rank's rows of `in`. F32.
  virtual void reduce_scatter_sum(Tensor out, Tensor in, const std::vector<int64_t>& counts) = 0;
  // in: [counts[rank], row]; out: [sum(counts), row] = every rank's `in`, in rank order.
  virtual void all_gather(Tensor out, Tensor in, const std::vector<int64_t>& counts) = 0;
  // Rows in[send_offsets...] go to each peer: send_counts[p] rows to rank p, taken in rank order
  // from `in`; recv_counts[p] rows arrive from rank p, stored in rank order in `out`.
  virtual void all_to_all(Tensor out, const std::vector<int64_t>& recv_counts, Tensor in,
                          const std::vector<int64_t>& send_counts) = 0;
  // Copies `bytes` bytes at `data` from `root` to every rank.
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  // Like broadcast on host memory, but a waiting rank sleeps between polls (growing from tens of
  // microseconds to `max_sleep_ms`), so a rank idling for the next step plan does not keep a
  // core busy.
  virtual void broadcast_idle(void* data, size_t bytes, int root, int max_sleep_ms) = 0;
  virtual void barrier() = 0;
  // Ranks with the same `color` form a new communicator, ordered by `key`.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;
};

// The MPI communicator over MPI_COMM_WORLD (host buffers). MPI must be initialised.
std::unique_ptr<Communicator> make_mpi_world_communicator();
// A world of one rank without MPI (host buffers): collectives are local copies. For a process
// started without an MPI launcher.
std::unique_ptr<Communicator> make_self_communicator();

}  // namespace sy
