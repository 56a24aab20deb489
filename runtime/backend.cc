// Backend selection (see backend.h).
#include "runtime/backend.h"

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
}

bool cuda_backend_built() {
#ifdef SY_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

Backend make_backend(const BackendOptions& options, Communicator* host_world, int local_rank,
                     int local_size) {
  options.validate();
  Backend b;
  if (options.device == "cpu") {
    b.ops = make_cpu_ops();
    b.description = "cpu";
    return b;
  }
#ifndef SY_HAVE_CUDA
  (void)host_world;
  (void)local_rank;
  (void)local_size;
  SY_FAIL(
      "--device cuda: this build has no CUDA backend (configure with nvcc available, "
      "-DSWITCHYARD_CUDA=ON)");
#else
  const int n_devices = cuda::device_count();
  // Agree on the outcome first, so that no rank waits in a collective for one that failed.
  float missing = n_devices == 0 ? 1.f : 0.f;
  float shared = local_size > n_devices ? 1.f : 0.f;  // ranks of this node share a GPU
  if (host_world != nullptr && host_world->size() > 1) {
    float flags[2] = {missing, shared};
    host_world->all_reduce_sum(Tensor(flags, DType::kF32, {2}));
    missing = flags[0];
    shared = flags[1];
  }
  SY_CHECK(n_devices > 0, "--device cuda: no CUDA device on this node (driver or GPU missing)");
  SY_CHECK(missing == 0.f, "--device cuda: ", missing, " rank(s) found no CUDA device");
  const int device = local_rank % n_devices;
  b.ops = cuda::make_cuda_ops(device);
  cudaDeviceProp prop{};
  SY_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  b.description = "cuda:" + std::to_string(device) + " " + prop.name;
  if (host_world == nullptr || host_world->size() == 1) {
    if (host_world != nullptr) b.world = make_routed_communicator(*host_world, nullptr, *b.ops);
    return b;
  }
  bool use_nccl = false;
#ifdef SY_HAVE_NCCL
  use_nccl = options.comm == "nccl" || (options.comm == "auto" && shared == 0.f);
  SY_CHECK(!(options.comm == "nccl" && shared > 0.f),
           "--comm nccl: ranks share a GPU on some node (", local_size, " ranks, ", n_devices,
           " GPU(s) here) and NCCL needs one GPU per rank; use --comm mpi or fewer ranks");
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
