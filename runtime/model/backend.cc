// Backend selection (see backend.h).
#include "runtime/model/backend.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu/threads.h"
#include "parallel/routed_communicator.h"

#ifdef SY_HAVE_CUDA
#include "kernels/cuda/device.h"
#include "kernels/cuda/ops.h"
#endif
#ifdef SY_HAVE_NCCL
#include "parallel/nccl_communicator.h"
#endif

namespace sy {

void BackendOptions::validate() const {
  SY_CHECK(device == "cpu" || device == "cuda", "--device: \"", device,
           "\" is not a device; use cpu or cuda");
  SY_CHECK(comm == "auto" || comm == "nccl" || comm == "mpi", "--comm: \"", comm,
           "\" is not a transport; use auto, nccl or mpi");
  SY_CHECK(dtype == "auto" || dtype == "bf16" || dtype == "f32", "--dtype: \"", dtype,
           "\" is not a storage precision; use auto, bf16 or f32");
  const WeightFormat format = parse_weight_format(weights);
  SY_CHECK(device == "cpu" || format == WeightFormat::kAuto || format == WeightFormat::kBF16,
           "--weights ", weights,
           ": the CUDA backend holds weights in bf16 (quantized weights run ",
           "on --device cpu only)");
  SY_CHECK(threads >= 0 && threads <= 256, "--threads ", threads, " (0 to 256; 0: cores / ranks)");
  SY_CHECK(!(device == "cpu" && dtype == "bf16"),
           "--dtype bf16: the CPU backend computes in f32 only; use --device cuda or --dtype f32");
}

bool cuda_backend_built() {
#ifdef SY_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

int default_cpu_threads() {
  const int node = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  int allowed = node;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) allowed = std::max(1, CPU_COUNT(&set));
  if (allowed < node) return std::min(allowed, 256);  // bound to these cores (mpirun, srun)
  // Unbound: the node's cores shared by the ranks the launcher started on it.
  int ranks = 1;
  for (const char* var :
       {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"}) {
    const char* v = std::getenv(var);
    if (v != nullptr && std::atoi(v) > 0) {
      ranks = std::atoi(v);
      break;
    }
  }
  return std::min(256, std::max(1, node / ranks));
}

Backend make_backend(const BackendOptions& options, Communicator* host_world, int local_rank) {
  options.validate();
  Backend b;
  if (options.device == "cpu") {
    const int threads = options.threads > 0 ? options.threads : default_cpu_threads();
    cpu::set_num_threads(threads);
    b.ops = make_cpu_ops();
    b.description = "cpu, " + std::to_string(threads) + (threads == 1 ? " thread" : " threads");
    return b;
  }
#ifndef SY_HAVE_CUDA
  (void)host_world;
  (void)local_rank;
  SY_FAIL(
      "--device cuda: this build has no CUDA backend (configure with nvcc available, "
      "-DSWITCHYARD_CUDA=ON)");
#else
  const int n_devices = cuda::device_count();
  // Agree on the outcome first, so that no rank waits in a collective for one that failed.
  float missing = n_devices == 0 ? 1.f : 0.f;
  if (host_world != nullptr && host_world->size() > 1)
    host_world->all_reduce_sum(Tensor(&missing, DType::kF32, {1}));
  SY_CHECK(n_devices > 0, "--device cuda: no CUDA device on this node (driver or GPU missing)");
  SY_CHECK(missing == 0.f, "--device cuda: ", missing, " rank(s) found no CUDA device");
  const int device = local_rank % n_devices;
  b.ops = cuda::make_cuda_ops(device, options.dtype == "f32" ? DType::kF32 : DType::kBF16);
  cudaDeviceProp prop{};
  SY_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  b.description = "cuda:" + std::to_string(device) + " " + prop.name +
                  (options.dtype == "f32" ? " f32" : " bf16");
  if (host_world == nullptr || host_world->size() == 1) {
    if (host_world != nullptr) b.world = make_routed_communicator(*host_world, nullptr, *b.ops);
    return b;
  }
  // Do ranks share a GPU? Compare (host, GPU UUID) over the job: device numbers alone mislead
  // when a launcher gives each rank its own CUDA_VISIBLE_DEVICES (every rank then sees device 0).
  const int W = host_world->size();
  int32_t mine[6] = {};
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  const uint64_t host_hash = std::hash<std::string>{}(std::string(host));
  std::memcpy(mine, &host_hash, 8);
  std::memcpy(mine + 2, prop.uuid.bytes, 16);
  std::vector<int32_t> all(static_cast<size_t>(6 * W));
  host_world->all_gather(Tensor(all.data(), DType::kI32, {W, 6}), Tensor(mine, DType::kI32, {1, 6}),
                         std::vector<int64_t>(static_cast<size_t>(W), 1));
  bool shared = false;
  for (int r = 0; r < W && !shared; ++r)
    for (int q = r + 1; q < W && !shared; ++q)
      shared = std::equal(all.begin() + 6 * r, all.begin() + 6 * r + 6, all.begin() + 6 * q);
  bool use_nccl = false;
#ifdef SY_HAVE_NCCL
  use_nccl = options.comm == "nccl" || (options.comm == "auto" && !shared);
  SY_CHECK(!(options.comm == "nccl" && shared), "--comm nccl: ranks share a GPU (", n_devices,
           " GPU(s) visible on this node) and NCCL needs one GPU per rank; use --comm mpi or "
           "fewer ranks");
#else
  SY_CHECK(options.comm != "nccl", "--comm nccl: this build has no NCCL");
#endif
  std::unique_ptr<Communicator> device_comm;
#ifdef SY_HAVE_NCCL
  if (use_nccl) device_comm = make_nccl_communicator(*host_world, device, cuda::stream_of(*b.ops));
#endif
  b.description += use_nccl ? " (nccl)" : " (mpi host staging)";
  b.world = make_routed_communicator(*host_world, std::move(device_comm), *b.ops);
  return b;
#endif
}

}  // namespace sy
