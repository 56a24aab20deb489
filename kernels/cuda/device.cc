// CUDA device discovery (see device.h).
#include "kernels/cuda/device.h"

namespace sy::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

}  // namespace sy::cuda
