// The CUDA emulator's runtime (see emu.h): CUDA threads as fibers, device memory, streams, stream
// capture and graphs, and the CUDA runtime and cuBLAS entry points the backend calls, defined
// with the toolkit's own declarations. One emulated device.
//
// What it holds the backend to, beyond computing the kernels:
//   - device memory is its own mapping, filled with 0xFF bytes (NaN as F32 and BF16) on
//     allocation, ends flush against an inaccessible guard page, and is inaccessible to host code
//     outside kernels, copies and GEMMs (a protection key, where the CPU has them): a host read
//     of a device pointer or an overrun past an allocation's end faults, and the fault is
//     explained on stderr;
//   - copies check that their pointers are device or host memory as their kind says, and that
//     device ranges lie inside one allocation;
//   - a launch with a bad configuration fails as on a GPU (cudaGetLastError);
//   - a block deadlocks (some threads at a barrier that others never reach) is a launch failure,
//     sticky as a GPU fault is, and described on stderr;
//   - while a stream is captured (thread-local mode) the calls a GPU refuses then (allocation,
//     free, synchronous copies, synchronisation, host memory copies, the legacy stream) fail and
//     invalidate the capture; kernels, device copies, memsets and GEMMs are recorded and run at
//     each graph launch, reading their memory then.
// SY_CUDA_EMU_ORDER=reverse runs blocks, and threads between barriers, in reverse order: a result
// that changes with it depends on a race.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tests/cuda_emu/emu.h"

// The runtime's opaque types, defined here.
struct CUstream_st;
struct CUgraph_st;
struct CUgraphExec_st;
struct cublasContext;

namespace sy::emu {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kAlign = 256;  // cudaMalloc's alignment
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = size_t{128} << 10;
constexpr size_t kMaxSharedBytes = size_t{48} << 10;  // without opting in to more

std::recursive_mutex g_mutex;  // all emulated device work, one call at a time
cudaError_t g_sticky = cudaSuccess;
thread_local cudaError_t t_last = cudaSuccess;
int g_device = 0;

// SY_CUDA_EMU_DEVICES=N (default 1) makes a node of N devices, one per rank when a launch gives
// each rank its own (local rank r on device r), which is what the NCCL communicator needs. Each
// process still emulates only the memory and streams it uses.
int n_devices() {
  static const int n = [] {
    const char* v = std::getenv("SY_CUDA_EMU_DEVICES");
    const int d = v != nullptr ? std::atoi(v) : 1;
    return d >= 1 && d <= 64 ? d : 1;
  }();
  return n;
}

void note(const std::string& msg) {
  std::fprintf(stderr, "cuda emulator: %s\n", msg.c_str());
  std::fflush(stderr);
}

cudaError_t fail(cudaError_t e) {
  t_last = e;
  return e;
}

bool reverse_order() {
  static const bool reverse = [] {
    const char* v = std::getenv("SY_CUDA_EMU_ORDER");
    return v != nullptr && std::string(v) == "reverse";
  }();
  return reverse;
}

// ---- device memory -----------------------------------------------------------------------------

struct Allocation {
  char* map = nullptr;  // the mapping: data pages, then one guard page
  size_t map_bytes = 0;
  char* ptr = nullptr;  // what cudaMalloc returned
  size_t bytes = 0;
};
std::map<uintptr_t, Allocation> g_allocs;  // by ptr
int g_access = 0;                          // > 0 while device code or a copy runs
const char* g_kernel = nullptr;            // the kernel running, for fault reports

size_t round_up(size_t v, size_t to) {
  return (v + to - 1) / to * to;
}

// Device memory carries a memory protection key whose access is disabled while host code runs,
// so toggling it costs one instruction (the key register is per thread). Without protection keys
// (pkey_alloc fails: an old CPU or kernel) host access to device memory is not caught.
int device_pkey() {
  static const int key = pkey_alloc(0, PKEY_DISABLE_ACCESS);
  return key;
}

// Device memory is accessible while at least one DeviceAccess lives.
struct DeviceAccess {
  DeviceAccess() {
    if (g_access++ == 0 && device_pkey() >= 0) pkey_set(device_pkey(), 0);
  }
  ~DeviceAccess() {
    if (--g_access == 0 && device_pkey() >= 0) pkey_set(device_pkey(), PKEY_DISABLE_ACCESS);
  }
  DeviceAccess(const DeviceAccess&) = delete;
  DeviceAccess& operator=(const DeviceAccess&) = delete;
};

// The allocation holding [p, p + bytes), or nullptr.
const Allocation* find_alloc(const void* p, size_t bytes) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  auto it = g_allocs.upper_bound(addr);
  if (it == g_allocs.begin()) return nullptr;
  --it;
  const Allocation& a = it->second;
  if (addr < it->first || addr + bytes > it->first + a.bytes) return nullptr;
  return &a;
}
bool is_device(const void* p) {
  return find_alloc(p, 0) != nullptr;
}

void on_segv(int sig, siginfo_t* info, void*) {
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  std::string msg;
  for (auto& [p, a] : g_allocs) {
    const auto map = reinterpret_cast<uintptr_t>(a.map);
    if (addr < map || addr >= map + a.map_bytes) continue;
    char buf[256];
    if (addr >= map + a.map_bytes - kPage)
      std::snprintf(buf, sizeof(buf),
                    "an access %zu bytes past the end of a device allocation of "
                    "%zu bytes",
                    static_cast<size_t>(addr - p - a.bytes), a.bytes);
    else if (addr < p)
      std::snprintf(buf, sizeof(buf), "an access %zu bytes before a device allocation of %zu bytes",
                    static_cast<size_t>(p - addr), a.bytes);
    else
      std::snprintf(buf, sizeof(buf), "host code touching device memory (offset %zu of %zu bytes)",
                    static_cast<size_t>(addr - p), a.bytes);
    msg = buf;
    break;
  }
  if (!msg.empty()) {
    msg = "cuda emulator: fault: " + msg +
          (g_kernel != nullptr ? std::string(" in kernel ") + g_kernel : std::string()) + "\n";
    if (write(2, msg.data(), msg.size()) < 0) {
    }
  }
  signal(sig, SIG_DFL);  // the access repeats and ends the process with the default action
}

void install_fault_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
  });
}

// ---- blocks of fibers --------------------------------------------------------------------------

// A fiber's context switch: saves the callee-saved registers on the current stack, stores the
// stack pointer in *save and continues on `next` (which a previous switch saved, or make_stack
// prepared). Neither the signal mask (as swapcontext does, a system call) nor the floating-point
// control words are switched: kernels never change them, so all fibers share the thread's.
extern "C" void sy_emu_switch(void** save, void* next);
extern "C" void sy_emu_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl sy_emu_switch
  .hidden sy_emu_switch
  .type sy_emu_switch, @function
sy_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sy_emu_switch, .-sy_emu_switch

  .p2align 4
  .globl sy_emu_trampoline
  .hidden sy_emu_trampoline
  .type sy_emu_trampoline, @function
sy_emu_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size sy_emu_trampoline, .-sy_emu_trampoline
)");

// A new fiber's stack below `top` (16-byte aligned), as sy_emu_switch leaves one: the six saved
// registers (r12 = arg, r13 = fn) and the return address, the trampoline, which calls fn(arg)
// with the stack aligned as the ABI wants at a call.
void* make_stack(char* top, void (*fn)(void*), void* arg) {
  auto* sp = reinterpret_cast<uint64_t*>(top - 72);  // 8 mod 16: after the ret, 0 mod 16
  sp[0] = 0;                                         // r15
  sp[1] = 0;                                         // r14
  sp[2] = reinterpret_cast<uint64_t>(fn);            // r13
  sp[3] = reinterpret_cast<uint64_t>(arg);           // r12
  sp[4] = 0;                                         // rbx
  sp[5] = 0;                                         // rbp
  sp[6] = reinterpret_cast<uint64_t>(&sy_emu_trampoline);
  return sp;
}

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  uint3 tid;
  int linear = 0;
  bool done = false;
  int waiting = 0;        // 1: at __syncthreads, 2: at a warp shuffle
  uint64_t wait_gen = 0;  // the generation of the barrier it waits at
};

struct Warp {
  int size = 0;
  int arrived = 0;
  uint64_t gen = 0;
  uint64_t slots[2][32] = {};         // by generation parity: one barrier per shuffle suffices
  uint64_t in_words[2][32 * 6] = {};  // the same for warp_combine
  uint64_t out_words[2][32 * 4] = {};
};

struct Block {
  const std::function<void()>* body = nullptr;
  dim3 grid, block;
  uint3 index;
  int n = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int current = 0;
  int live = 0;           // fibers not done
  bool reverse = false;   // the order in which fibers take turns
  void* sched = nullptr;  // the scheduler's stack pointer while fibers run
  int arrived = 0;
  uint64_t gen = 0;
};
Block* g_block = nullptr;
char* g_stacks = nullptr;

Block& block() {
  if (g_block == nullptr) {
    note("a device built-in (threadIdx, __syncthreads, ...) used outside a kernel");
    std::abort();
  }
  return *g_block;
}

bool runnable(const Block& b, int i) {
  const Fiber& f = b.fibers[static_cast<size_t>(i)];
  if (f.done) return false;
  if (f.waiting == 1) return b.gen != f.wait_gen;
  if (f.waiting == 2) return b.warps[static_cast<size_t>(i / 32)].gen != f.wait_gen;
  return true;
}

// Hands the thread to the next runnable fiber after the current one (in turn order), or back to
// the scheduler when there is none: the block is finished, or deadlocked.
void switch_from(Fiber& f) {
  Block& b = *g_block;
  const int step = b.reverse ? b.n - 1 : 1;
  int next = b.current;
  for (int k = 0; k < b.n; ++k) {
    next = (next + step) % b.n;
    if (runnable(b, next)) {
      b.current = next;
      sy_emu_switch(&f.sp, b.fibers[static_cast<size_t>(next)].sp);
      return;
    }
  }
  sy_emu_switch(&f.sp, b.sched);
}

void fiber_main(void*) {
  Block& b = *g_block;
  (*b.body)();
  Fiber& f = b.fibers[static_cast<size_t>(b.current)];
  f.done = true;
  --b.live;
  switch_from(f);
}

void yield(Fiber& f) {
  switch_from(f);
}

// Runs one block; false (with the reason on stderr) when its threads deadlock.
bool run_block(Block& b, const char* name) {
  for (int i = 0; i < b.n; ++i) {
    Fiber& f = b.fibers[static_cast<size_t>(i)];
    f.linear = i;
    f.tid = uint3{static_cast<unsigned>(i) % b.block.x,
                  static_cast<unsigned>(i) / b.block.x % b.block.y,
                  static_cast<unsigned>(i) / (b.block.x * b.block.y)};
    f.done = false;
    f.waiting = 0;
    // Stack tops staggered by 64 bytes a fiber, so that they do not all share cache sets.
    f.sp = make_stack(g_stacks + static_cast<size_t>(i + 1) * kStackBytes - 64 * (i % 64),
                      fiber_main, nullptr);
  }
  for (int w = 0; w * 32 < b.n; ++w) {
    Warp& warp = b.warps[static_cast<size_t>(w)];
    warp.size = std::min(32, b.n - w * 32);
    warp.arrived = 0;
    warp.gen = 0;
  }
  b.arrived = 0;
  b.gen = 0;
  b.live = b.n;
  b.reverse = reverse_order();
  b.current = b.reverse ? b.n - 1 : 0;
  // Fibers pass the thread among themselves; it comes back here when none can run.
  sy_emu_switch(&b.sched, b.fibers[static_cast<size_t>(b.current)].sp);
  if (b.live == 0) return true;
  int at_sync = 0, at_shfl = 0;
  for (const Fiber& f : b.fibers)
    if (!f.done) (f.waiting == 1 ? at_sync : at_shfl) += 1;
  note(std::string("kernel ") + name + " deadlocked in block (" + std::to_string(b.index.x) + ", " +
       std::to_string(b.index.y) + ", " + std::to_string(b.index.z) + ") of " +
       std::to_string(b.n) + " threads: " + std::to_string(at_sync) + " wait at __syncthreads, " +
       std::to_string(at_shfl) + " at a warp shuffle, " + std::to_string(b.n - b.live) +
       " have exited");
  return false;
}

bool run_kernel(const char* name, dim3 grid, dim3 block_dim, const std::function<void()>& body) {
  if (g_stacks == nullptr) {
    void* m = mmap(nullptr, kStackBytes * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      note("cannot map the fiber stacks");
      std::abort();
    }
    g_stacks = static_cast<char*>(m);
  }
  Block b;
  b.body = &body;
  b.grid = grid;
  b.block = block_dim;
  b.n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  b.fibers.resize(static_cast<size_t>(b.n));
  b.warps.resize(static_cast<size_t>((b.n + 31) / 32));
  DeviceAccess access;
  g_block = &b;
  g_kernel = name;
  const uint64_t n_blocks = uint64_t{grid.x} * grid.y * grid.z;
  bool ok = true;
  for (uint64_t k = 0; k < n_blocks && ok; ++k) {
    const uint64_t i = reverse_order() ? n_blocks - 1 - k : k;
    b.index = uint3{static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                    static_cast<unsigned>(i / (uint64_t{grid.x} * grid.y))};
    ok = run_block(b, name);
  }
  g_block = nullptr;
  g_kernel = nullptr;
  return ok;
}

// ---- streams, capture, graphs ------------------------------------------------------------------

struct Node {
  std::string what;
  std::function<cudaError_t()> run;
};

}  // namespace
}  // namespace sy::emu

struct CUstream_st {
  bool capturing = false;
  bool invalidated = false;
  std::string why;
  std::vector<sy::emu::Node> nodes;
};
struct CUgraph_st {
  std::vector<sy::emu::Node> nodes;
};
struct CUgraphExec_st {
  std::vector<sy::emu::Node> nodes;
};
struct cublasContext {
  cudaStream_t stream = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

namespace sy::emu {
namespace {

std::vector<cudaStream_t> g_streams;              // created and not destroyed
thread_local cudaStream_t t_capturing = nullptr;  // the stream this thread captures

// Invalidates the capture of `stream` because of `what`, a call a GPU refuses during capture.
cudaError_t invalidate(cudaStream_t stream, const char* what) {
  if (!stream->invalidated) {
    stream->invalidated = true;
    stream->why = what;
    note(std::string(what) + " while a stream is captured: the capture is invalidated");
  }
  return fail(cudaErrorStreamCaptureUnsupported);
}

// Whether `what` is refused because this thread captures a stream (thread-local mode).
bool refused_in_capture(const char* what) {
  if (t_capturing == nullptr) return false;
  invalidate(t_capturing, what);
  return true;
}

// Runs `node` now, or records it when `stream` is captured.
cudaError_t enqueue(cudaStream_t stream, Node node) {
  if (g_sticky != cudaSuccess) return fail(g_sticky);
  if (stream != nullptr && stream->capturing) {
    if (stream->invalidated) return fail(cudaErrorStreamCaptureInvalidated);
    stream->nodes.push_back(std::move(node));
    return cudaSuccess;
  }
  if (stream == nullptr && t_capturing != nullptr) {
    refused_in_capture("work on the legacy default stream");
    return fail(cudaErrorStreamCaptureImplicit);
  }
  const cudaError_t e = node.run();
  if (e != cudaSuccess) return fail(e);
  return cudaSuccess;
}

bool known_stream(cudaStream_t s) {
  return s == nullptr || std::find(g_streams.begin(), g_streams.end(), s) != g_streams.end();
}

}  // namespace

// ---- kernels -----------------------------------------------------------------------------------

const uint3& thread_index() {
  Block& b = block();
  return b.fibers[static_cast<size_t>(b.current)].tid;
}
const uint3& block_index() {
  return block().index;
}
const dim3& block_dim() {
  return block().block;
}
const dim3& grid_dim() {
  return block().grid;
}

void sync_block() {
  Block& b = block();
  Fiber& f = b.fibers[static_cast<size_t>(b.current)];
  const uint64_t gen = b.gen;
  if (++b.arrived == b.n) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  f.waiting = 1;
  f.wait_gen = gen;
  while (b.gen == gen) yield(f);
  f.waiting = 0;
}

// The warp of the running fiber, and its lane.
Warp& current_warp(Fiber*& f, int& lane) {
  Block& b = block();
  f = &b.fibers[static_cast<size_t>(b.current)];
  lane = f->linear % 32;
  return b.warps[static_cast<size_t>(f->linear / 32)];
}

// Every lane of `w` arrives; the last one runs `last` before releasing the others. Data for the
// rendezvous lives in buffers indexed by the generation's parity (returned), so one barrier per
// rendezvous suffices: no lane can be two rendezvous ahead of another.
template <typename Last>
int warp_rendezvous(Warp& w, Fiber& f, Last last) {
  const uint64_t gen = w.gen;
  const int buf = static_cast<int>(gen & 1);
  if (++w.arrived == w.size) {
    last(buf);
    w.arrived = 0;
    ++w.gen;
  } else {
    f.waiting = 2;
    f.wait_gen = gen;
    while (w.gen == gen) yield(f);
    f.waiting = 0;
  }
  return buf;
}

uint64_t shfl_xor_bits(uint64_t bits, int lane_mask) {
  Fiber* f = nullptr;
  int lane = 0;
  Warp& w = current_warp(f, lane);
  w.slots[w.gen & 1][lane] = bits;
  const int buf = warp_rendezvous(w, *f, [](int) {});
  int src = lane ^ lane_mask;
  if (src < 0 || src >= w.size) src = lane;
  return w.slots[buf][src];
}

void warp_combine(const uint64_t* in, int n_in, uint64_t* out, int n_out,
                  void (*combine)(const uint64_t* in, uint64_t* out)) {
  Fiber* f = nullptr;
  int lane = 0;
  Warp& w = current_warp(f, lane);
  if (n_in < 1 || n_in > 6 || n_out < 1 || n_out > 4 || w.size != 32) {
    note("warp_combine: a warp-wide instruction needs a full warp, at most 6 words in, 4 out");
    std::abort();
  }
  std::memcpy(w.in_words[w.gen & 1] + lane * n_in, in, static_cast<size_t>(n_in) * 8);
  const int buf = warp_rendezvous(
      w, *f, [&](int last_buf) { combine(w.in_words[last_buf], w.out_words[last_buf]); });
  std::memcpy(out, w.out_words[buf] + lane * n_out, static_cast<size_t>(n_out) * 8);
}

void submit(const char* name, dim3 grid, dim3 block_dim, size_t shared_bytes, cudaStream_t stream,
            std::function<void()> body) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  const uint64_t threads = uint64_t{block_dim.x} * block_dim.y * block_dim.z;
  if (threads == 0 || threads > kMaxThreads || block_dim.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 ||
      shared_bytes > kMaxSharedBytes) {
    note(std::string("kernel ") + name + ": invalid launch configuration");
    fail(cudaErrorInvalidConfiguration);
    return;
  }
  if (!known_stream(stream)) {
    fail(cudaErrorInvalidResourceHandle);
    return;
  }
  auto run = [name, grid, block_dim, body = std::move(body)]() -> cudaError_t {
    if (!run_kernel(name, grid, block_dim, body)) g_sticky = cudaErrorLaunchFailure;
    return g_sticky;
  };
  enqueue(stream, Node{name, std::move(run)});
}

cudaError_t submit_host(const char* what, cudaStream_t stream, std::function<cudaError_t()> body) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (!known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  auto run = [body = std::move(body)]() -> cudaError_t {
    DeviceAccess access;
    return body();
  };
  return enqueue(stream, Node{what, std::move(run)});
}

}  // namespace sy::emu

// ---- the CUDA runtime API ----------------------------------------------------------------------

using namespace sy::emu;  // NOLINT: the entry points below are the C API's

cudaError_t cudaGetDeviceCount(int* count) {
  *count = n_devices();
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= n_devices()) return fail(cudaErrorInvalidDevice);
  g_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = g_device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device < 0 || device >= n_devices()) return fail(cudaErrorInvalidDevice);
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof(prop->name), "CUDA emulator (CPU)");
  // One UUID per device number: ranks on device d of the node look like ranks sharing a GPU.
  char uuid[17] = "sy-cuda-emu-0000";
  for (int i = 0, d = device; i < 4; ++i, d /= 10) uuid[15 - i] = static_cast<char>('0' + d % 10);
  std::memcpy(prop->uuid.bytes, uuid, 16);
  prop->totalGlobalMem = size_t{16} << 30;
  prop->sharedMemPerBlock = kMaxSharedBytes;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = kMaxThreads;
  // As an H100 SXM: launch plans sized by it (attention's splits) are those a GPU gets.
  prop->multiProcessorCount = 132;
  prop->major = 9;
  prop->minor = 0;
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = t_last != cudaSuccess ? t_last : g_sticky;
  t_last = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) {
  return t_last != cudaSuccess ? t_last : g_sticky;
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle:
      return "cudaErrorInvalidResourceHandle";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
    case cudaErrorStreamCaptureUnsupported:
      return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated:
      return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureImplicit:
      return "cudaErrorStreamCaptureImplicit";
    case cudaErrorIllegalState:
      return "cudaErrorIllegalState";
    default:
      return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle:
      return "invalid resource handle";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    case cudaErrorStreamCaptureUnsupported:
      return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated:
      return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureImplicit:
      return "operation would make the legacy stream depend on a capturing blocking stream";
    case cudaErrorIllegalState:
      return "the operation cannot be performed in the present state";
    default:
      return "unknown error";
  }
}

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  install_fault_handler();
  *ptr = nullptr;
  if (g_sticky != cudaSuccess) return fail(g_sticky);
  if (refused_in_capture("cudaMalloc")) return t_last;
  const size_t data = round_up(std::max<size_t>(bytes, 1), kPage);
  void* m = mmap(nullptr, data + kPage, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return fail(cudaErrorMemoryAllocation);
  Allocation a;
  a.map = static_cast<char*>(m);
  a.map_bytes = data + kPage;
  a.bytes = bytes;
  a.ptr = a.map + data - round_up(std::max<size_t>(bytes, 1), kAlign);
  std::memset(a.map, 0xFF, data);  // as uninitialised as it gets: NaN for F32 and BF16
  mprotect(a.map + data, kPage, PROT_NONE);
  if (device_pkey() >= 0) pkey_mprotect(a.map, data, PROT_READ | PROT_WRITE, device_pkey());
  g_allocs[reinterpret_cast<uintptr_t>(a.ptr)] = a;
  *ptr = a.ptr;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (ptr == nullptr) return cudaSuccess;
  if (refused_in_capture("cudaFree")) return t_last;
  auto it = g_allocs.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == g_allocs.end()) {
    note("cudaFree of a pointer cudaMalloc did not return");
    return fail(cudaErrorInvalidValue);
  }
  munmap(it->second.map, it->second.map_bytes);
  g_allocs.erase(it);
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  size_t used = 0;
  for (auto& [p, a] : g_allocs) used += a.bytes;
  *total_bytes = size_t{16} << 30;
  *free_bytes = *total_bytes > used ? *total_bytes - used : 0;
  return cudaSuccess;
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* ptr) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  *attr = cudaPointerAttributes{};
  if (is_device(ptr)) {
    attr->type = cudaMemoryTypeDevice;
    attr->device = g_device;
    attr->devicePointer = const_cast<void*>(ptr);
  } else {
    attr->type = cudaMemoryTypeUnregistered;
    attr->hostPointer = const_cast<void*>(ptr);
  }
  return cudaSuccess;
}

namespace {

// Checks a copy's pointers against its kind; the reason on stderr when they disagree.
bool copy_ok(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind == cudaMemcpyDefault || kind == cudaMemcpyHostToHost) return true;
  auto check = [&](const void* p, bool dev, const char* which) {
    if (dev && find_alloc(p, bytes) == nullptr) {
      note(std::string("cudaMemcpy: the ") + which + " range of " + std::to_string(bytes) +
           " bytes is not inside one device allocation");
      return false;
    }
    if (!dev && is_device(p)) {
      note(std::string("cudaMemcpy: the ") + which + " is device memory but the kind says host");
      return false;
    }
    return true;
  };
  return check(dst, dst_dev, "destination") && check(src, src_dev, "source");
}

}  // namespace

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (!known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  if (bytes == 0) return cudaSuccess;
  if (!copy_ok(dst, src, bytes, kind)) return fail(cudaErrorInvalidValue);
  // A recorded copy would read or write host memory at every replay, long after this call.
  if (stream != nullptr && stream->capturing && kind != cudaMemcpyDeviceToDevice)
    return invalidate(stream, "a copy to or from host memory");
  return enqueue(stream, Node{"memcpy", [dst, src, bytes]() {
                                DeviceAccess access;
                                std::memmove(dst, src, bytes);
                                return cudaSuccess;
                              }});
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (refused_in_capture("cudaMemcpy (synchronous)")) return t_last;
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (!known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  if (bytes == 0) return cudaSuccess;
  if (find_alloc(ptr, bytes) == nullptr) {
    note("cudaMemset: the range of " + std::to_string(bytes) +
         " bytes is not inside one device allocation");
    return fail(cudaErrorInvalidValue);
  }
  return enqueue(stream, Node{"memset", [ptr, value, bytes]() {
                                DeviceAccess access;
                                std::memset(ptr, value, bytes);
                                return cudaSuccess;
                              }});
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  *stream = new CUstream_st;
  g_streams.push_back(*stream);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  auto it = std::find(g_streams.begin(), g_streams.end(), stream);
  if (it == g_streams.end()) return fail(cudaErrorInvalidResourceHandle);
  if (t_capturing == stream) t_capturing = nullptr;
  g_streams.erase(it);
  delete stream;
  return cudaSuccess;
}

// Work runs when it is enqueued, so waiting only reports errors.
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (!known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  if (refused_in_capture("cudaStreamSynchronize")) return t_last;
  return g_sticky;
}

cudaError_t cudaDeviceSynchronize(void) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (refused_in_capture("cudaDeviceSynchronize")) return t_last;
  return g_sticky;
}

cudaError_t cudaStreamQuery(cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (!known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  if (refused_in_capture("cudaStreamQuery")) return t_last;
  return g_sticky;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (stream == nullptr || !known_stream(stream)) {
    note("cudaStreamBeginCapture: the legacy stream cannot be captured");
    return fail(cudaErrorStreamCaptureUnsupported);
  }
  if (stream->capturing || t_capturing != nullptr) return fail(cudaErrorIllegalState);
  stream->capturing = true;
  stream->invalidated = false;
  stream->why.clear();
  stream->nodes.clear();
  t_capturing = stream;
  return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  *graph = nullptr;
  if (stream == nullptr || !known_stream(stream) || !stream->capturing)
    return fail(cudaErrorIllegalState);
  stream->capturing = false;
  if (t_capturing == stream) t_capturing = nullptr;
  if (stream->invalidated) {
    stream->nodes.clear();
    return fail(cudaErrorStreamCaptureInvalidated);
  }
  *graph = new CUgraph_st{std::move(stream->nodes)};
  stream->nodes.clear();
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (!known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  *status = stream != nullptr && stream->capturing
                ? (stream->invalidated ? cudaStreamCaptureStatusInvalidated
                                       : cudaStreamCaptureStatusActive)
                : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (graph == nullptr) return fail(cudaErrorInvalidValue);
  *exec = new CUgraphExec_st{graph->nodes};
  return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (exec == nullptr) return fail(cudaErrorInvalidValue);
  if (!known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  if (stream != nullptr && stream->capturing) return fail(cudaErrorStreamCaptureUnsupported);
  if (g_sticky != cudaSuccess) return fail(g_sticky);
  for (const Node& node : exec->nodes) {
    const cudaError_t e = node.run();
    if (e != cudaSuccess) return fail(e);
  }
  return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}

// ---- cuBLAS ------------------------------------------------------------------------------------

namespace {

float load(const void* p, cudaDataType_t t, size_t i) {
  switch (t) {
    case CUDA_R_32F:
      return static_cast<const float*>(p)[i];
    case CUDA_R_16BF:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return __half2float(static_cast<const __half*>(p)[i]);
  }
}

void store(void* p, cudaDataType_t t, size_t i, float v) {
  switch (t) {
    case CUDA_R_32F:
      static_cast<float*>(p)[i] = v;
      break;
    case CUDA_R_16BF:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
  }
}

bool supported(cudaDataType_t a, cudaDataType_t b, cudaDataType_t c, cublasComputeType_t compute) {
  auto known = [](cudaDataType_t t) {
    return t == CUDA_R_32F || t == CUDA_R_16BF || t == CUDA_R_16F;
  };
  return known(a) && a == b && known(c) && (c == CUDA_R_32F || c == a) &&
         (compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC);
}

struct Gemm {
  cublasOperation_t ta, tb;
  int m, n, k;
  float alpha, beta;
  const void* a;
  cudaDataType_t at;
  int lda;
  const void* b;
  cudaDataType_t bt;
  int ldb;
  void* c;
  cudaDataType_t ct;
  int ldc;

  bool valid() const {
    return m >= 0 && n >= 0 && k >= 0 && lda >= std::max(1, ta == CUBLAS_OP_N ? m : k) &&
           ldb >= std::max(1, tb == CUBLAS_OP_N ? k : n) && ldc >= std::max(1, m) &&
           (ta == CUBLAS_OP_N || ta == CUBLAS_OP_T) && (tb == CUBLAS_OP_N || tb == CUBLAS_OP_T);
  }

  // Column-major C = alpha op(A) op(B) + beta C, fp32 accumulation in eight interleaved partial
  // sums (as a vectorised kernel would); C is not read when beta is 0.
  void run() const {
    std::vector<float> ar(static_cast<size_t>(m) * k), bc(static_cast<size_t>(n) * k);
    for (int i = 0; i < m; ++i)
      for (int p = 0; p < k; ++p)
        ar[static_cast<size_t>(i) * k + p] =
            load(a, at,
                 ta == CUBLAS_OP_N ? static_cast<size_t>(p) * lda + i
                                   : static_cast<size_t>(i) * lda + p);
    for (int j = 0; j < n; ++j)
      for (int p = 0; p < k; ++p)
        bc[static_cast<size_t>(j) * k + p] =
            load(b, bt,
                 tb == CUBLAS_OP_N ? static_cast<size_t>(j) * ldb + p
                                   : static_cast<size_t>(p) * ldb + j);
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        const float* x = &ar[static_cast<size_t>(i) * k];
        const float* y = &bc[static_cast<size_t>(j) * k];
        float part[8] = {};
        int p = 0;
        for (; p + 8 <= k; p += 8)
          for (int q = 0; q < 8; ++q) part[q] += x[p + q] * y[p + q];
        for (; p < k; ++p) part[p % 8] += x[p] * y[p];
        const float dot = ((part[0] + part[1]) + (part[2] + part[3])) +
                          ((part[4] + part[5]) + (part[6] + part[7]));
        const size_t ci = static_cast<size_t>(j) * ldc + i;
        store(c, ct, ci, beta == 0.f ? alpha * dot : alpha * dot + beta * load(c, ct, ci));
      }
  }
};

std::vector<cublasHandle_t> g_handles;
bool known_handle(cublasHandle_t h) {
  return std::find(g_handles.begin(), g_handles.end(), h) != g_handles.end();
}

cublasStatus_t enqueue_gemms(cublasHandle_t handle, std::function<void()> work) {
  const cudaError_t e = enqueue(handle->stream, Node{"cublas gemm", [work = std::move(work)]() {
                                                       DeviceAccess access;
                                                       work();
                                                       return cudaSuccess;
                                                     }});
  return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // namespace

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  *handle = new cublasContext;
  g_handles.push_back(*handle);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  auto it = std::find(g_handles.begin(), g_handles.end(), handle);
  if (it == g_handles.end()) return CUBLAS_STATUS_NOT_INITIALIZED;
  g_handles.erase(it);
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (!known_handle(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!known_stream(stream)) return CUBLAS_STATUS_INVALID_VALUE;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void* workspace, size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (!known_handle(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bytes > 0 && find_alloc(workspace, bytes) == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  handle->workspace = workspace;
  handle->workspace_bytes = bytes;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  return known_handle(handle) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    default:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
  }
}

const char* cublasGetStatusString(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "the library was not initialized";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "an invalid value was used as an argument";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "the functionality requested is not supported";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "the GPU program failed to execute";
    default:
      return "an internal operation failed";
  }
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
                            cublasOperation_t transb, int m, int n, int k, const void* alpha,
                            const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C,
                            cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                            cublasGemmAlgo_t) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (!known_handle(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!supported(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
  const Gemm g{transa,
               transb,
               m,
               n,
               k,
               *static_cast<const float*>(alpha),
               *static_cast<const float*>(beta),
               A,
               Atype,
               lda,
               B,
               Btype,
               ldb,
               C,
               Ctype,
               ldc};
  if (!g.valid()) return CUBLAS_STATUS_INVALID_VALUE;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  // Operands are device memory: checked as the GEMM reads them (guard pages), like a GPU would.
  return enqueue_gemms(handle, [g]() { g.run(); });
}

// The pointer arrays are device memory, read when the GEMMs run (at every replay of a graph); the
// sizes, leading dimensions and scalars are host arrays, read now.
cublasStatus_t cublasGemmGroupedBatchedEx(
    cublasHandle_t handle, const cublasOperation_t transa_array[],
    const cublasOperation_t transb_array[], const int m_array[], const int n_array[],
    const int k_array[], const void* alpha_array, const void* const Aarray[], cudaDataType_t Atype,
    const int lda_array[], const void* const Barray[], cudaDataType_t Btype, const int ldb_array[],
    const void* beta_array, void* const Carray[], cudaDataType_t Ctype, const int ldc_array[],
    int group_count, const int group_size[], cublasComputeType_t computeType) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (!known_handle(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!supported(Atype, Btype, Ctype, computeType)) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
  std::vector<std::pair<Gemm, int>> groups;  // a template problem and its count
  int total = 0;
  for (int gi = 0; gi < group_count; ++gi) {
    const Gemm g{transa_array[gi],
                 transb_array[gi],
                 m_array[gi],
                 n_array[gi],
                 k_array[gi],
                 static_cast<const float*>(alpha_array)[gi],
                 static_cast<const float*>(beta_array)[gi],
                 nullptr,
                 Atype,
                 lda_array[gi],
                 nullptr,
                 Btype,
                 ldb_array[gi],
                 nullptr,
                 Ctype,
                 ldc_array[gi]};
    if (!g.valid() || group_size[gi] < 0) return CUBLAS_STATUS_INVALID_VALUE;
    groups.emplace_back(g, group_size[gi]);
    total += group_size[gi];
  }
  if (total == 0) return CUBLAS_STATUS_SUCCESS;
  if (find_alloc(Aarray, sizeof(void*) * total) == nullptr ||
      find_alloc(Barray, sizeof(void*) * total) == nullptr ||
      find_alloc(Carray, sizeof(void*) * total) == nullptr) {
    note("cublasGemmGroupedBatchedEx: the pointer arrays must be device memory");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  return enqueue_gemms(handle, [groups, Aarray, Barray, Carray]() {
    int p = 0;
    for (const auto& [tmpl, count] : groups)
      for (int i = 0; i < count; ++i, ++p) {
        Gemm g = tmpl;
        g.a = Aarray[p];
        g.b = Barray[p];
        g.c = Carray[p];
        if (g.m > 0 && g.n > 0) g.run();
      }
  });
}
