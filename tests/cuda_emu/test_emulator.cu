// The CUDA emulator's own checks (label cpu): the semantics the backend's kernels rely on, and
// that each mistake the emulator claims to catch is caught. Compiled like the backend's kernels
// (cu_to_cc.cmake, device.h), so it runs only on the emulator.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

// Sum of 0..n-1 with a shared-memory tree and a warp shuffle butterfly.
__global__ void block_sum_kernel(int* out) {
  __shared__ int partial[32];
  int v = static_cast<int>(threadIdx.x);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += partial[w];
    out[blockIdx.x] = s;
  }
}

// Thread 0 leaves before the barrier the others wait at.
__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void write_kernel(float* p, int64_t i) {
  p[i] = 1.f;
}

__global__ void increment_kernel(int* p) {
  *p += 1;
}

std::vector<int> download(const int* d, size_t n) {
  std::vector<int> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), d, n * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

TEST(CudaEmulator, BarriersAndShufflesComputeABlockSum) {
  int* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, 3 * sizeof(int)), cudaSuccess);
  block_sum_kernel<<<3, 256>>>(d);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(download(d, 3), std::vector<int>(3, 255 * 256 / 2));
  cudaFree(d);
}

TEST(CudaEmulator, BadLaunchConfigurationFailsTheLaunch) {
  int* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, sizeof(int)), cudaSuccess);
  block_sum_kernel<<<1, 2048>>>(d);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // not sticky
  cudaFree(d);
}

TEST(CudaEmulator, BlockWaitingForAnExitedThreadIsAStickyLaunchFailure) {
  EXPECT_EXIT(
      {
        int* d = nullptr;
        if (cudaMalloc(&d, 64 * sizeof(int)) != cudaSuccess) _exit(1);
        early_exit_kernel<<<1, 64>>>(d);
        const bool failed = cudaGetLastError() == cudaErrorLaunchFailure;
        const bool sticky = cudaDeviceSynchronize() == cudaErrorLaunchFailure;
        _exit(failed && sticky ? 3 : 2);
      },
      testing::ExitedWithCode(3),
      "deadlocked in block \\(0, 0, 0\\) of 64 threads: 63 wait at "
      "__syncthreads, 0 at a warp shuffle, 1 have exited");
}

TEST(CudaEmulator, KernelWritingPastAnAllocationFaults) {
  EXPECT_DEATH(
      {
        float* d = nullptr;
        if (cudaMalloc(&d, 64 * sizeof(float)) != cudaSuccess) _exit(1);
        write_kernel<<<1, 32>>>(d, 64);
      },
      "past the end of a device allocation of 256 bytes in kernel write_kernel");
}

TEST(CudaEmulator, HostCodeReadingDeviceMemoryFaults) {
  const int key = pkey_alloc(0, 0);
  if (key < 0) GTEST_SKIP() << "no memory protection keys on this CPU: host reads are not caught";
  pkey_free(key);
  EXPECT_DEATH(
      {
        float* d = nullptr;
        if (cudaMalloc(&d, 64 * sizeof(float)) != cudaSuccess) _exit(1);
        const volatile float* p = d;
        std::printf("%f\n", p[3]);
      },
      "host code touching device memory \\(offset 12 of 256 bytes\\)");
}

TEST(CudaEmulator, NewMemoryIsNotZero) {
  float* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, sizeof(float)), cudaSuccess);
  float h = 0;
  ASSERT_EQ(cudaMemcpy(&h, d, sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(std::isnan(h));
  cudaFree(d);
}

TEST(CudaEmulator, CopiesCheckTheirKindAndBounds) {
  int* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, 4 * sizeof(int)), cudaSuccess);
  int h[8] = {};
  EXPECT_EQ(cudaMemcpy(d, h, 8 * sizeof(int), cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemcpy(h, d, sizeof(int), cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  EXPECT_EQ(cudaMemcpy(d, h, 4 * sizeof(int), cudaMemcpyHostToDevice), cudaSuccess);
  cudaGetLastError();
  cudaFree(d);
}

TEST(CudaEmulator, CaptureRefusesAllocationAndHostCopiesAndReplaysKernels) {
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  int* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, sizeof(int)), cudaSuccess);
  ASSERT_EQ(cudaMemsetAsync(d, 0, sizeof(int), s), cudaSuccess);

  // Kernels are recorded, not run, and run at each launch of the graph.
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  increment_kernel<<<1, 1, 0, s>>>(d);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
  EXPECT_EQ(download(d, 1)[0], 0);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int i = 0; i < 3; ++i) ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
  EXPECT_EQ(download(d, 1)[0], 3);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);

  // What a GPU refuses during capture invalidates it.
  int h = 0;
  int* more = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  EXPECT_EQ(cudaMalloc(&more, 4), cudaErrorStreamCaptureUnsupported);
  EXPECT_EQ(cudaStreamEndCapture(s, &graph), cudaErrorStreamCaptureInvalidated);
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  EXPECT_EQ(cudaMemcpyAsync(d, &h, sizeof(int), cudaMemcpyHostToDevice, s),
            cudaErrorStreamCaptureUnsupported);
  EXPECT_EQ(cudaStreamEndCapture(s, &graph), cudaErrorStreamCaptureInvalidated);
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(s), cudaErrorStreamCaptureUnsupported);
  EXPECT_EQ(cudaStreamEndCapture(s, &graph), cudaErrorStreamCaptureInvalidated);
  cudaGetLastError();
  cudaFree(d);
  cudaStreamDestroy(s);
}

}  // namespace
