// CUDA device discovery (see device.h).
#include "kernels/cuda/device.h"

#include <atomic>
#include <thread>

namespace sy::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

namespace {
std::atomic<void (*)()> g_wait_check{nullptr};
}  // namespace

void set_wait_check(void (*check)()) {
  g_wait_check.store(check);
}

void wait_for_stream(cudaStream_t stream, const char* what) {
  void (*check)() = g_wait_check.load();
  cudaError_t e = cudaSuccess;
  if (check == nullptr) {
    e = cudaStreamSynchronize(stream);
  } else {
    // Checked before each query, so that an error a communicator reports is seen even when the
    // stream has finished (its results may be wrong).
    for (;;) {
      check();
      e = cudaStreamQuery(stream);
      if (e != cudaErrorNotReady) break;
      std::this_thread::yield();
    }
  }
  if (e != cudaSuccess) SY_FAIL("CUDA error while waiting for ", what, ": ", cudaGetErrorString(e));
}

}  // namespace sy::cuda
