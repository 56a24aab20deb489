// The compute backend of one rank: `--device cpu|cuda`, its storage precision
// (`--dtype auto|bf16|f32`) and, for GPU ranks in a job of several, how device tensors travel
// between ranks (`--comm auto|nccl|mpi`).
#pragma once

#include <memory>
#include <string>

#include "kernels/ops.h"
#include "parallel/communicator.h"
#include "runtime/model/weights.h"

namespace sy {

struct BackendOptions {
  std::string device = "cpu";  // cpu | cuda
  std::string comm = "auto";   // auto | nccl | mpi (GPU ranks of a parallel job)
  // Storage precision of weights, KV cache and GEMM inputs: auto (cpu: f32, cuda: bf16), bf16
  // (cuda only) or f32. The CPU backend computes in f32 only.
  std::string dtype = "auto";
  // The dtype of the linear weights (weights.h's WeightFormat by name): auto, f32, bf16, f16,
  // q8_0, q4_0, q4_k; quantized ones on the CPU only.
  std::string weights = "auto";
  // Threads of a CPU rank (kernels/cpu/threads.h); 0: default_cpu_threads().
  int threads = 0;

  void validate() const;
  WeightFormat weight_format() const { return parse_weight_format(weights); }
};

// A CPU rank's threads when --threads is 0: the cores it is bound to when the launcher bound it
// to fewer than the node's (mpirun and srun bind by default), else the node's cores divided by
// the ranks started on it (OMPI_COMM_WORLD_LOCAL_SIZE, MPI_LOCALNRANKS, SLURM_NTASKS_PER_NODE).
int default_cpu_threads();

// Where this rank runs.
struct Backend {
  std::unique_ptr<Ops> ops;
  // The world communicator for the model (over `host_world`'s ranks): null for CPU ranks (the
  // host world is used as is); for GPU ranks a routed communicator (parallel/
  // routed_communicator.h) whose device tensors go through NCCL or MPI host staging.
  std::unique_ptr<Communicator> world;
  std::string description;  // "cpu", "cuda:0 NVIDIA H100 (nccl)", ...
};

// Builds this rank's backend. `host_world` (null for a lone process) is the job's MPI
// communicator; `local_rank` places the rank on its node: GPU ranks use device
// local_rank % (visible devices), so one rank per GPU, or each rank with its own
// CUDA_VISIBLE_DEVICES. With comm "auto", NCCL is used when it is built and no two ranks share a
// GPU (compared by host and GPU UUID), host staging otherwise; every rank makes the same choice.
// A collective over `host_world` when given.
Backend make_backend(const BackendOptions& options, Communicator* host_world, int local_rank);

// True when this build has the CUDA backend.
bool cuda_backend_built();

}  // namespace sy
