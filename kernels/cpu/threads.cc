// The CPU thread pool (see threads.h). Workers spin for a short while on a generation counter
// before they sleep, so that the many short kernels of a decode step do not pay a wake-up each.
#include "kernels/cpu/threads.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels/error.h"

namespace sy::cpu {
namespace {

constexpr int kMaxThreads = 256;
constexpr auto kSpin = std::chrono::microseconds(200);  // before a worker sleeps
// A call's items are dealt in this many chunks per thread, each taken by whichever thread is
// free (an atomic counter): a thread that starts late or is slowed by another process on its
// core takes fewer, and the call ends when the last chunk does, not the slowest fixed half.
constexpr int kChunksPerThread = 4;

thread_local bool t_inside = false;  // this thread is running a range of a parallel_for

class Pool {
 public:
  explicit Pool(int n) : n_(n) {
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { work(i); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (std::thread& t : workers_) t.join();
  }
  int size() const { return n_; }

  void run(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    std::lock_guard<std::mutex> one_call(run_mu_);  // callers on several threads take turns
    const int parts = static_cast<int>(std::min<int64_t>(n_, n));
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_items_ = n;
      parts_ = parts;
      n_chunks_ = std::min<int64_t>(n, static_cast<int64_t>(parts) * kChunksPerThread);
      next_chunk_.store(0);
      error_ = nullptr;
      pending_.store(parts - 1);
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    run_part(0);
    while (pending_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Takes chunks until none is left.
  void run_part(int /*part*/) {
    t_inside = true;
    try {
      for (int64_t c = next_chunk_.fetch_add(1); c < n_chunks_; c = next_chunk_.fetch_add(1))
        (*fn_)(n_items_ * c / n_chunks_, n_items_ * (c + 1) / n_chunks_);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (!error_) error_ = std::current_exception();
    }
    t_inside = false;
  }

  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < spin_until) {
      }
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load() != seen; });
      }
      bool participate = false;
      {
        std::lock_guard<std::mutex> lock(mu_);  // run() writes the call's fields under it
        seen = generation_.load();
        if (stop_) return;
        participate = index < parts_;
      }
      if (participate) {
        run_part(index);
        pending_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  const int n_;
  std::vector<std::thread> workers_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  bool stop_ = false;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_items_ = 0;
  int parts_ = 0;
  int64_t n_chunks_ = 0;
  std::atomic<int64_t> next_chunk_{0};
  std::mutex error_mu_;
  std::exception_ptr error_;
};

std::mutex g_mu;
std::unique_ptr<Pool> g_pool;

}  // namespace

void set_num_threads(int n) {
  SY_CHECK(n >= 1 && n <= kMaxThreads, "threads: ", n, " (1 to ", kMaxThreads, ")");
  std::lock_guard<std::mutex> lock(g_mu);
  g_pool.reset();
  if (n > 1) g_pool = std::make_unique<Pool>(n);
}

int num_threads() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_pool ? g_pool->size() : 1;
}

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  Pool* pool = g_pool.get();
  if (pool == nullptr || t_inside || n == 1) {
    fn(0, n);
    return;
  }
  pool->run(n, fn);
}

}  // namespace sy::cpu
