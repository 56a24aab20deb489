// `switchyard bench all-to-all`: the MoE dispatch exchange, measured in the manner of nccl-tests.
//
// Each rank routes `tokens` tokens to `top_k` distinct experts drawn uniformly (seeded), the
// experts placed contiguously over the ranks as in the model (parallel/layout.h), and sends one
// row of `hidden` elements per (token, expert) pair to the expert's rank: tokens * top_k rows in
// destination-rank order, as ep_dispatch does, so the counts per peer are unequal in general.
// Every rank derives the routing of every rank and the payload of every row, so it knows what it
// must receive and checks it locally: correctness costs no extra communication.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "launch/commands.h"
#include "parallel/communicator.h"
#include "parallel/layout.h"
#include "parallel/mpi_env.h"
#ifdef SY_HAVE_NCCL
#include <cuda_runtime.h>

#include "kernels/cuda/device.h"
#include "parallel/nccl_communicator.h"
#endif

namespace sy::launch {
namespace {

// splitmix64's finaliser: routing and payload are pure functions of their indices through it.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// rows[s * W + d]: rows rank s sends to rank d when every rank routes `n_tokens` tokens, each to
// `top_k` distinct experts drawn uniformly; owner[e] is the rank of expert e.
std::vector<int64_t> route(const BenchAllToAllArgs& a, int W, int64_t n_tokens,
                           const std::vector<int>& owner) {
  std::vector<int64_t> rows(static_cast<size_t>(W) * W, 0);
  std::vector<int64_t> chosen(static_cast<size_t>(a.top_k));
  for (int s = 0; s < W; ++s) {
    for (int64_t t = 0; t < n_tokens; ++t) {
      uint64_t state = mix(mix(mix(a.seed) + static_cast<uint64_t>(s)) + static_cast<uint64_t>(t));
      for (int j = 0; j < a.top_k; ++j) {
        int64_t e = 0;
        do {
          state = mix(state);
          e = static_cast<int64_t>(state % static_cast<uint64_t>(a.n_experts));
        } while (std::find(chosen.begin(), chosen.begin() + j, e) != chosen.begin() + j);
        chosen[j] = e;
        ++rows[static_cast<size_t>(s) * W + owner[e]];
      }
    }
  }
  return rows;
}

// The payload: element i of row `row` of the message from rank `src` to rank `dst` is the low
// bits of word(row_key(src, dst, row), i), 32 for f32 rows, 16 for bf16 rows. Rows are
// compared bit for bit, so any bit pattern (NaN included) is a valid payload.
uint64_t row_key(uint64_t seed, int src, int dst, int64_t row) {
  return mix(
      mix(mix(seed ^ 0x5eed) + static_cast<uint64_t>(src) * 65536u + static_cast<uint64_t>(dst)) +
      static_cast<uint64_t>(row));
}
uint32_t word(uint64_t key, int64_t i) {
  return static_cast<uint32_t>(mix(key + static_cast<uint64_t>(i)));
}

// Fills `send` with rank `me`'s rows: rows_to[d] rows for each rank d, in rank order.
template <typename Word>
void fill_send(Word* send, const std::vector<int64_t>& rows_to, int me, int64_t hidden,
               uint64_t seed) {
  int64_t r = 0;
  for (size_t d = 0; d < rows_to.size(); ++d)
    for (int64_t j = 0; j < rows_to[d]; ++j, ++r) {
      const uint64_t key = row_key(seed, me, static_cast<int>(d), j);
      for (int64_t i = 0; i < hidden; ++i) send[r * hidden + i] = static_cast<Word>(word(key, i));
    }
}

// Elements of `recv` (rows_from[s] rows from each rank s, in rank order) that differ from what
// rank `me` derives locally.
template <typename Word>
int64_t count_wrong(const Word* recv, const std::vector<int64_t>& rows_from, int me, int64_t hidden,
                    uint64_t seed) {
  int64_t n_wrong = 0, r = 0;
  for (size_t s = 0; s < rows_from.size(); ++s)
    for (int64_t j = 0; j < rows_from[s]; ++j, ++r) {
      const uint64_t key = row_key(seed, static_cast<int>(s), me, j);
      for (int64_t i = 0; i < hidden; ++i)
        n_wrong += recv[r * hidden + i] != static_cast<Word>(word(key, i));
    }
  return n_wrong;
}

// One buffer of the exchange: host memory, and for NCCL a device buffer of the same size that
// the exchange uses (the host copy is filled and checked).
class ExchangeBuffer {
 public:
  ExchangeBuffer(size_t bytes, bool on_device) : host_((bytes + 3) / 4 + 1), bytes_(bytes) {
#ifdef SY_HAVE_NCCL
    if (on_device) SY_CUDA_CHECK(cudaMalloc(&device_, std::max<size_t>(bytes, 1)));
#else
    SY_CHECK(!on_device, "no device buffers without the CUDA backend");
#endif
  }
  ~ExchangeBuffer() {
#ifdef SY_HAVE_NCCL
    if (device_ != nullptr) cudaFree(device_);
#endif
  }
  ExchangeBuffer(const ExchangeBuffer&) = delete;
  ExchangeBuffer& operator=(const ExchangeBuffer&) = delete;

  void* host() {
    return host_.data();
  }
  Tensor view(DType dtype, int64_t rows, int64_t hidden) {
    if (device_ != nullptr) return Tensor(device_, dtype, {rows, hidden}, Device::kCuda);
    return Tensor(host_.data(), dtype, {rows, hidden});
  }
  // Host -> device (the first `bytes`); nothing for host-only buffers.
  void to_device(size_t bytes) {
    SY_CHECK(bytes <= bytes_, "copy of ", bytes, " bytes into a buffer of ", bytes_);
#ifdef SY_HAVE_NCCL
    if (device_ != nullptr)
      SY_CUDA_CHECK(cudaMemcpy(device_, host_.data(), bytes, cudaMemcpyHostToDevice));
#endif
  }
  void to_host(size_t bytes) {
    SY_CHECK(bytes <= bytes_, "copy of ", bytes, " bytes from a buffer of ", bytes_);
#ifdef SY_HAVE_NCCL
    if (device_ != nullptr)
      SY_CUDA_CHECK(cudaMemcpy(host_.data(), device_, bytes, cudaMemcpyDeviceToHost));
#endif
  }

 private:
  std::vector<uint32_t> host_;
  size_t bytes_;
  void* device_ = nullptr;
};

// One rank's measurement of one size, gathered on every rank as 6 int32 words.
struct RankResult {
  double time_us;   // mean time of one timed exchange on this rank
  int64_t bytes;    // bytes this rank sends per exchange (its own rows included)
  int64_t n_wrong;  // received elements that differ from the locally derived payload
};
static_assert(sizeof(RankResult) == 24, "RankResult is gathered as 6 int32 words");

// One row of the table: the ranks' results combined.
struct Row {
  int64_t bytes;    // mean over ranks of the bytes each sends per exchange
  int64_t tokens;   // tokens per rank
  double time_us;   // max over ranks of the mean exchange time
  double algbw;     // GB/s: bytes / time
  double busbw;     // GB/s: algbw * (W - 1) / W
  int64_t n_wrong;  // sum over ranks
};

std::unique_ptr<Communicator> open_nccl(Communicator& control, int local_rank) {
#ifdef SY_HAVE_NCCL
  SY_CHECK(cuda::device_count() > 0,
           "--backend nccl: no CUDA device on this node; use --backend mpi");
  return make_nccl_communicator(control, local_rank);  // one device per rank, checked by all
#else
  SY_FAIL(
      "--backend nccl: this switchyard was built without NCCL (no CUDA toolkit with NCCL at "
      "build time); use --backend mpi");
#endif
}

void validate(const BenchAllToAllArgs& a) {
  SY_CHECK(a.hidden >= 1, "--hidden ", a.hidden, " must be >= 1");
  SY_CHECK(a.n_experts >= 1, "--experts ", a.n_experts, " must be >= 1");
  SY_CHECK(a.top_k >= 1 && a.top_k <= a.n_experts, "--top-k ", a.top_k, " must be in [1, ",
           a.n_experts, "] (--experts)");
  SY_CHECK(a.min_tokens >= 1, "--min-tokens ", a.min_tokens, " must be >= 1");
  SY_CHECK(a.max_tokens >= a.min_tokens, "--max-tokens ", a.max_tokens, " must be >= --min-tokens ",
           a.min_tokens);
  SY_CHECK(a.iters >= 1, "--iters ", a.iters, " must be >= 1");
  SY_CHECK(a.warmup >= 0, "--warmup ", a.warmup, " must be >= 0");
}

// The sweep of one rank. `comm` carries the exchange; `control` (host buffers) gathers results.
class AllToAllBench {
 public:
  AllToAllBench(const BenchAllToAllArgs& a, Communicator& comm, Communicator& control, DType dtype,
                bool on_device)
      : a_(a), comm_(comm), control_(control), dtype_(dtype), W_(comm.size()), me_(comm.rank()) {
    row_bytes_ = a.hidden * static_cast<int64_t>(dtype_size(dtype));
    for (int64_t e = 0; e < a.n_experts; ++e) owner_.push_back(owner_of_expert(a.n_experts, W_, e));
    for (int64_t n = a.min_tokens; n <= a.max_tokens; n *= 2) sizes_.push_back(n);
    // Buffers sized once for the largest size: every rank sends tokens * top_k rows; what it
    // receives depends on the routing.
    int64_t max_recv = 0;
    for (int64_t n : sizes_) {
      routes_.push_back(route(a, W_, n, owner_));
      int64_t n_recv = 0;
      for (int s = 0; s < W_; ++s) n_recv += routes_.back()[static_cast<size_t>(s) * W_ + me_];
      max_recv = std::max(max_recv, n_recv);
    }
    const int64_t max_send = a.max_tokens * a.top_k;
    send_ = std::make_unique<ExchangeBuffer>(static_cast<size_t>(max_send * row_bytes_), on_device);
    recv_ = std::make_unique<ExchangeBuffer>(static_cast<size_t>(max_recv * row_bytes_), on_device);
  }

  const std::vector<int64_t>& sizes() const { return sizes_; }

  // Measures size `k` on every rank and combines the ranks' results (collective).
  Row measure(size_t k) {
    const std::vector<int64_t>& rows = routes_[k];
    std::vector<int64_t> send_counts(W_), recv_counts(W_);
    for (int p = 0; p < W_; ++p) {
      send_counts[p] = rows[static_cast<size_t>(me_) * W_ + p];
      recv_counts[p] = rows[static_cast<size_t>(p) * W_ + me_];
    }
    int64_t n_send = 0, n_recv = 0;
    for (int p = 0; p < W_; ++p) {
      n_send += send_counts[p];
      n_recv += recv_counts[p];
    }
    const size_t send_bytes = static_cast<size_t>(n_send * row_bytes_);
    const size_t recv_bytes = static_cast<size_t>(n_recv * row_bytes_);
    if (dtype_ == DType::kF32)
      fill_send(static_cast<uint32_t*>(send_->host()), send_counts, me_, a_.hidden, a_.seed);
    else
      fill_send(static_cast<uint16_t*>(send_->host()), send_counts, me_, a_.hidden, a_.seed);
    send_->to_device(send_bytes);
    std::memset(recv_->host(), 0xff, recv_bytes);  // what arrives must overwrite this
    recv_->to_device(recv_bytes);
    const Tensor in = send_->view(dtype_, n_send, a_.hidden);
    const Tensor out = recv_->view(dtype_, n_recv, a_.hidden);

    for (int i = 0; i < a_.warmup; ++i) comm_.all_to_all(out, recv_counts, in, send_counts);
    comm_.barrier();
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < a_.iters; ++i) comm_.all_to_all(out, recv_counts, in, send_counts);
    const auto stop = std::chrono::steady_clock::now();

    recv_->to_host(recv_bytes);
    RankResult mine;
    mine.time_us = std::chrono::duration<double, std::micro>(stop - start).count() / a_.iters;
    mine.bytes = static_cast<int64_t>(send_bytes);
    mine.n_wrong = dtype_ == DType::kF32 ? count_wrong(static_cast<const uint32_t*>(recv_->host()),
                                                       recv_counts, me_, a_.hidden, a_.seed)
                                         : count_wrong(static_cast<const uint16_t*>(recv_->host()),
                                                       recv_counts, me_, a_.hidden, a_.seed);
    std::vector<RankResult> all(static_cast<size_t>(W_));
    control_.all_gather(Tensor(all.data(), DType::kI32, {W_, 6}),
                        Tensor(&mine, DType::kI32, {1, 6}),
                        std::vector<int64_t>(static_cast<size_t>(W_), 1));

    Row row{};
    row.tokens = sizes_[k];
    double bytes = 0;
    for (const RankResult& r : all) {
      bytes += static_cast<double>(r.bytes);
      row.time_us = std::max(row.time_us, r.time_us);
      row.n_wrong += r.n_wrong;
    }
    bytes /= W_;
    row.bytes = static_cast<int64_t>(bytes + 0.5);
    row.algbw = row.time_us > 0 ? bytes / row.time_us * 1e-3 : 0.0;  // bytes/us -> GB/s
    row.busbw = row.algbw * (W_ - 1) / W_;
    return row;
  }

 private:
  const BenchAllToAllArgs& a_;
  Communicator& comm_;
  Communicator& control_;
  DType dtype_;
  int W_;
  int me_;
  int64_t row_bytes_ = 0;
  std::vector<int> owner_;                    // [n_experts] rank of each expert
  std::vector<int64_t> sizes_;                // tokens per rank of each size
  std::vector<std::vector<int64_t>> routes_;  // per size: [W * W] rows from rank s to rank d
  std::unique_ptr<ExchangeBuffer> send_;      // [max_tokens * top_k, hidden]
  std::unique_ptr<ExchangeBuffer> recv_;      // [max rows received over the sizes, hidden]
};

constexpr const char* kColumns =
    "#         bytes    tokens  dtype       time_us    algbw_GB/s    busbw_GB/s    #wrong\n"
    "#           (B)   (/rank)                 (us)        (GB/s)        (GB/s)\n";

void print_row(const Row& r, const char* dtype) {
  std::printf("%15lld %9lld %6s %13.1f %13.3f %13.3f %9lld\n", static_cast<long long>(r.bytes),
              static_cast<long long>(r.tokens), dtype, r.time_us, r.algbw, r.busbw,
              static_cast<long long>(r.n_wrong));
  std::fflush(stdout);
}

// What rank 0 prints and writes: the header, a row per size, the footer and the --json file,
// opened at the start so that a bad path fails before the sweep.
class Report {
 public:
  Report(const BenchAllToAllArgs& a, int world, const std::string& backend,
         const std::string& dtype)
      : dtype_(dtype) {
    if (!a.json.empty()) {
      json_path_ = a.json;
      json_file_.open(a.json);
      SY_CHECK(json_file_.good(), "cannot write --json ", a.json);
    }
    doc_ = {{"benchmark", "all-to-all"},
            {"world", world},
            {"backend", backend},
            {"hidden", a.hidden},
            {"top_k", a.top_k},
            {"experts", a.n_experts},
            {"dtype", dtype},
            {"iters", a.iters},
            {"warmup", a.warmup},
            {"seed", a.seed},
            {"rows", nlohmann::ordered_json::array()}};
    std::printf("# switchyard bench all-to-all: MoE dispatch, one row per (token, expert) pair\n");
    std::printf("# world %d rank(s), backend %s%s, hidden %lld, top-k %d, experts %lld, dtype %s\n",
                world, backend.c_str(), backend == "self" ? " (no MPI launcher: local copies)" : "",
                static_cast<long long>(a.hidden), a.top_k, static_cast<long long>(a.n_experts),
                dtype.c_str());
    std::printf("# iters %d, warmup %d, seed %llu\n#\n%s", a.iters, a.warmup,
                static_cast<unsigned long long>(a.seed), kColumns);
    std::fflush(stdout);
  }

  void add(const Row& r) {
    print_row(r, dtype_.c_str());
    doc_["rows"].push_back({{"bytes", r.bytes},
                            {"tokens", r.tokens},
                            {"dtype", dtype_},
                            {"time_us", r.time_us},
                            {"algbw_gbps", r.algbw},
                            {"busbw_gbps", r.busbw},
                            {"n_wrong", r.n_wrong}});
    sum_busbw_ += r.busbw;
    n_wrong_ += r.n_wrong;
  }

  void finish() {
    const size_t n_rows = doc_["rows"].size();
    const double avg_busbw = n_rows > 0 ? sum_busbw_ / static_cast<double>(n_rows) : 0.0;
    std::printf("# avg bus bandwidth: %.3f GB/s\n", avg_busbw);
    if (n_wrong_ == 0)
      std::printf("# all correct\n");
    else
      std::printf("# WRONG: %lld\n", static_cast<long long>(n_wrong_));
    std::fflush(stdout);
    if (json_file_.is_open()) {
      doc_["avg_busbw_gbps"] = avg_busbw;
      doc_["n_wrong"] = n_wrong_;
      json_file_ << doc_.dump(2) << "\n";
      json_file_.close();
      SY_CHECK(json_file_.good(), "cannot write --json ", json_path_);
    }
  }

 private:
  std::string dtype_;
  std::string json_path_;
  std::ofstream json_file_;
  nlohmann::ordered_json doc_;
  double sum_busbw_ = 0;
  int64_t n_wrong_ = 0;
};

}  // namespace

int run_bench_all_to_all(const BenchAllToAllArgs& a) {
  validate(a);
  // Under an MPI launcher the world is every rank of the job; alone, a world of one rank.
  std::unique_ptr<MpiEnv> env;
  std::unique_ptr<Communicator> control;
  if (launched_by_mpi()) {
    env = std::make_unique<MpiEnv>(nullptr, nullptr);
    control = make_mpi_world_communicator();
  } else {
    control = make_self_communicator();
  }
  const int W = control->size();
  SY_CHECK(a.n_experts >= W, "--experts ", a.n_experts, " is fewer than the ", W,
           " ranks: some rank would hold none");
  const bool nccl = a.backend == "nccl";
  std::unique_ptr<Communicator> nccl_comm;
  if (nccl) nccl_comm = open_nccl(*control, env != nullptr ? env->local_rank() : 0);
  Communicator& comm = nccl ? *nccl_comm : *control;
  const std::string backend = nccl ? "nccl" : env != nullptr ? "mpi" : "self";
  const std::string dtype = a.dtype != "auto" ? a.dtype : nccl ? "bf16" : "f32";

  AllToAllBench bench(a, comm, *control, dtype == "bf16" ? DType::kBF16 : DType::kF32, nccl);
  std::unique_ptr<Report> report;
  if (control->rank() == 0) report = std::make_unique<Report>(a, W, backend, dtype);
  int64_t n_wrong = 0;
  for (size_t k = 0; k < bench.sizes().size(); ++k) {
    const Row r = bench.measure(k);  // collective: the ranks' results combined on every rank
    n_wrong += r.n_wrong;
    if (report != nullptr) report->add(r);
  }
  if (report != nullptr) report->finish();
  // Every rank waits for rank 0's file; a failed write ends the job from rank 0.
  control->barrier();
  return n_wrong == 0 ? 0 : 1;
}

}  // namespace sy::launch
