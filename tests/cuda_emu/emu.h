// The CUDA emulator: runs the CUDA backend (kernels/cuda/) on the CPU, for machines without a GPU.
//
// The kernels are compiled as host C++ (kernels/cuda/*.cu rewritten by cu_to_cc.cmake, with
// device.h as a forced include) and the CUDA runtime and cuBLAS calls of the backend are served by
// runtime.cc with the toolkit's own declarations. Each CUDA thread runs as a fiber with its own
// stack, so __syncthreads and warp shuffles are real barriers: a block whose threads wait at
// different barriers, or at one that some of them have left, is reported as a deadlock instead of
// silently computing something. See docs/testing.md for what it checks and what it cannot.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace sy::emu {

// Built-in variables of the fiber that is running.
const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();

// __syncthreads: waits until every thread of the block arrives.
void sync_block();
// __shfl_xor_sync for 8-byte payloads: every lane of the warp must arrive.
uint64_t shfl_xor_bits(uint64_t bits, int lane_mask);
// A warp-wide instruction (mma.sync): every lane of a full warp arrives with `n_in` words
// (at most 6); once all have, `combine` runs once over all of them (in[lane * n_in + i]) and
// writes every lane's `n_out` words (at most 4; out[lane * n_out + i]); each lane gets its own.
void warp_combine(const uint64_t* in, int n_in, uint64_t* out, int n_out,
                  void (*combine)(const uint64_t* in, uint64_t* out));

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of 8 bytes at most");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl_xor_bits(bits, lane_mask);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

// Enqueues a kernel on `stream`: run now, or recorded when the stream is being captured. A bad
// configuration sets the error that cudaGetLastError returns, as a failed launch does.
void submit(const char* name, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
            std::function<void()> body);

// Enqueues host work on `stream` (an emulated library call: the NCCL collectives of nccl.cc):
// run now, or recorded when the stream is being captured and run at each graph launch. Device
// memory is accessible to `body` while it runs. Returns the enqueue's error, or `body`'s when it
// ran at once.
cudaError_t submit_host(const char* what, cudaStream_t stream, std::function<cudaError_t()> body);

// `kernel<<<grid, block, shared, stream>>>(args...)` becomes
// `launcher("kernel", kernel, grid, block, shared, stream)(args...)`: the arguments are converted
// to the kernel's parameter types and copied, as a launch copies them.
template <typename... P>
struct Launcher {
  const char* name;
  void (*kernel)(P...);
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  cudaStream_t stream;

  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel argument count");
    std::tuple<std::decay_t<P>...> args(static_cast<P>(std::forward<A>(a))...);
    auto* k = kernel;
    submit(name, grid, block, shared_bytes, stream, [k, args]() { std::apply(k, args); });
  }
};

template <typename... P>
Launcher<P...> launcher(const char* name, void (*kernel)(P...), dim3 grid, dim3 block,
                        size_t shared_bytes = 0, cudaStream_t stream = nullptr) {
  return Launcher<P...>{name, kernel, grid, block, shared_bytes, stream};
}

}  // namespace sy::emu
