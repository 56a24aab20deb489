// The CUDA backend of the ops interface: device memory, one stream, cuBLAS GEMMs and the kernels
// of this folder (see ops.h). Weights, KV cache and GEMM inputs are in the storage dtype (BF16,
// or F32 on request); everything numerically delicate stays fp32 (kernels/ops.h).
#include <cublas_v2.h>

#include <map>
#include <utility>
#include <vector>

#include "kernels/cuda/device.h"
#include "kernels/cuda/ops.h"

#define SY_CUBLAS_CHECK(expr, op)                                              \
  do {                                                                         \
    cublasStatus_t sy_st_ = (expr);                                            \
    if (sy_st_ != CUBLAS_STATUS_SUCCESS)                                       \
      SY_FAIL("cuBLAS error in ", op, ": ", cublasGetStatusName(sy_st_), " (", \
              cublasGetStatusString(sy_st_), ")");                             \
  } while (0)

namespace sy::cuda {
namespace {

cudaDataType_t cuda_type(DType d) {
  switch (d) {
    case DType::kF32:
      return CUDA_R_32F;
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
    default:
      SY_FAIL("matmul: no GEMM for dtype ", dtype_name(d));
  }
}

// The most groups one grouped GEMM takes (experts held by a rank).
constexpr size_t kMaxGroups = 256;

class CudaOps final : public Ops {
 public:
  CudaOps(int device, DType storage) : device_(device), storage_(storage) {
    SY_CHECK(storage == DType::kBF16 || storage == DType::kF32, "CUDA backend: storage dtype ",
             dtype_name(storage), "; BF16 or F32");
    const int n = device_count();
    SY_CHECK(device >= 0 && device < n, "CUDA device ", device, " requested; this node has ", n,
             " CUDA device(s)");
    SY_CUDA_CHECK(cudaSetDevice(device));
    cudaDeviceProp prop{};
    SY_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    sm_count_ = prop.multiProcessorCount;
    sm_major_ = prop.major;
    SY_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    SY_CUBLAS_CHECK(cublasCreate(&cublas_), "cublasCreate");
    SY_CUBLAS_CHECK(cublasSetStream(cublas_, stream_), "cublasSetStream");
    // fp32 GEMMs stay fp32 (no TF32): the F32 path is the precise one.
    SY_CUBLAS_CHECK(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    SY_CUDA_CHECK(cudaMalloc(&pointer_arrays_, 3 * kMaxGroups * sizeof(void*)));
    // cuBLAS may not allocate while a graph is being recorded: give it its workspace now.
    SY_CUDA_CHECK(cudaMalloc(&cublas_workspace_, kCublasWorkspaceBytes));
    SY_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspaceBytes),
                    "cublasSetWorkspace");
  }
  ~CudaOps() override {
    cudaStreamSynchronize(stream_);
    for (auto& [id, exec] : graphs_) cudaGraphExecDestroy(exec);
    for (auto& [key, ptrs] : weight_arrays_) cudaFree(ptrs.first);
    for (void* p : retired_) cudaFree(p);
    cudaFree(cublas_workspace_);
    cudaFree(scatter_scratch_);
    cudaFree(attention_workspace_);
    cudaFree(pointer_arrays_);
    cublasDestroy(cublas_);
    cudaStreamDestroy(stream_);
  }
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  Device device() const override { return Device::kCuda; }
  DType storage_dtype() const override { return storage_; }
  cudaStream_t stream() const { return stream_; }

  void* alloc(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      size_t free_bytes = 0, total_bytes = 0;
      cudaMemGetInfo(&free_bytes, &total_bytes);
      SY_FAIL("out of GPU memory on device ", device_, ": ", bytes >> 20, " MiB requested, ",
              free_bytes >> 20, " MiB free of ", total_bytes >> 20, " MiB (", cudaGetErrorString(e),
              ")");
    }
    return p;
  }
  void free(void* ptr) override { cudaFree(ptr); }
  // Pageable host memory is staged by the driver before the call returns, so `src` may be
  // reused at once; the copy is ordered on the stream.
  void copy_from_host(void* dst, const void* src, size_t bytes) override {
    if (bytes) SY_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    SY_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    synchronize();
  }
  void fill_zero(Tensor t) override {
    if (t.numel() > 0) SY_CUDA_CHECK(cudaMemsetAsync(t.data, 0, t.bytes(), stream_));
  }
  // Waits for the stream; an asynchronous fault of an earlier kernel surfaces here.
  void synchronize() override { wait_for_stream(stream_, "the GPU"); }

  void embedding(Tensor out, Tensor ids, Tensor table, int64_t row_offset) override {
    cuda::embedding(out, ids, table, row_offset, stream_);
  }
  void rmsnorm(Tensor out, Tensor x, Tensor weight, float eps) override {
    cuda::rmsnorm(out, x, weight, eps, stream_);
  }
  void add(Tensor out, Tensor a, Tensor b) override { cuda::add(out, a, b, stream_); }

  void matmul(Tensor out, Tensor x, Tensor w) override {
    const int64_t m = x.size(0);
    const int64_t k = x.size(1);
    const int64_t n = w.size(0);
    check_gemm("matmul", out, x, w, m);
    if (m == 0 || n == 0) return;
    if (k == 0) return fill_zero(out);  // an empty sum
    const float alpha = 1.f;
    const float beta = 0.f;
    // Row-major out[m, n] = x[m, k] · w[n, k]ᵀ is column-major outᵀ[n, m] = wᵀ · xᵀ: op(A) = wᵀ
    // with A the column-major [k, n] view of w.
    SY_CUBLAS_CHECK(
        cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                     static_cast<int>(k), &alpha, w.data, cuda_type(w.dtype), static_cast<int>(k),
                     x.data, cuda_type(x.dtype), static_cast<int>(k), &beta, out.data,
                     cuda_type(out.dtype), static_cast<int>(n), CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT),
        "matmul");
  }

  // One cublasGemmGroupedBatchedEx call for the groups with rows (each group one problem);
  // a loop of matmuls where the toolkit has no grouped GEMM for these dtypes.
  void grouped_matmul(Tensor out, Tensor x, const Tensor* w, const int64_t* offsets,
                      size_t n_groups) override {
    SY_CHECK(n_groups <= kMaxGroups, "grouped_matmul: ", n_groups, " groups (at most ", kMaxGroups,
             ")");
    SY_CHECK(x.ndim == 2 && out.ndim == 2 && x.size(0) == out.size(0), "grouped_matmul: x ",
             x.shape_str(), ", out ", out.shape_str());
    bool& refused = grouped_refused_[out.dtype == DType::kF32 ? 0 : 1];
    if (refused) return Ops::grouped_matmul(out, x, w, offsets, n_groups);
    host_a_.clear();
    host_b_.clear();
    host_c_.clear();
    m_.clear();
    n_.clear();
    k_.clear();
    for (size_t g = 0; g < n_groups; ++g) {
      const int64_t rows = offsets[g + 1] - offsets[g];
      SY_CHECK(rows >= 0 && offsets[g] >= 0 && offsets[g + 1] <= x.size(0),
               "grouped_matmul: group ", g, " rows [", offsets[g], ", ", offsets[g + 1], ")");
      if (rows == 0) continue;
      Tensor xg = x.rows(offsets[g], rows);
      Tensor og = out.rows(offsets[g], rows);
      check_gemm("grouped_matmul", og, xg, w[g], rows);
      host_a_.push_back(w[g].data);
      host_b_.push_back(xg.data);
      host_c_.push_back(og.data);
      n_.push_back(static_cast<int>(rows));
      m_.push_back(static_cast<int>(w[g].size(0)));
      k_.push_back(static_cast<int>(w[g].size(1)));
      last_group_ = g;
    }
    const int n_problems = static_cast<int>(host_a_.size());
    if (n_problems == 0) return;
    if (n_problems == 1) {  // one expert with rows: a plain GEMM
      const size_t g = last_group_;
      matmul(out.rows(offsets[g], offsets[g + 1] - offsets[g]),
             x.rows(offsets[g], offsets[g + 1] - offsets[g]), w[g]);
      return;
    }
    void** dev = static_cast<void**>(pointer_arrays_);
    const size_t bytes = static_cast<size_t>(n_problems) * sizeof(void*);
    copy_from_host(dev, host_a_.data(), bytes);
    copy_from_host(dev + kMaxGroups, host_b_.data(), bytes);
    copy_from_host(dev + 2 * kMaxGroups, host_c_.data(), bytes);
    trans_a_.assign(static_cast<size_t>(n_problems), CUBLAS_OP_T);
    trans_b_.assign(static_cast<size_t>(n_problems), CUBLAS_OP_N);
    alpha_.assign(static_cast<size_t>(n_problems), 1.f);
    beta_.assign(static_cast<size_t>(n_problems), 0.f);
    group_size_.assign(static_cast<size_t>(n_problems), 1);
    // Leading dimensions: lda = k (w rows), ldb = k (x rows), ldc = m (out rows).
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        cublas_, trans_a_.data(), trans_b_.data(), m_.data(), n_.data(), k_.data(), alpha_.data(),
        dev, cuda_type(w[0].dtype), k_.data(), dev + kMaxGroups, cuda_type(x.dtype), k_.data(),
        beta_.data(), dev + 2 * kMaxGroups, cuda_type(out.dtype), m_.data(), n_problems,
        group_size_.data(), CUBLAS_COMPUTE_32F);
    if (st == CUBLAS_STATUS_NOT_SUPPORTED) {
      refused = true;  // this toolkit refuses this output dtype: one GEMM per group from now on
      return Ops::grouped_matmul(out, x, w, offsets, n_groups);
    }
    SY_CUBLAS_CHECK(st, "grouped_matmul");
  }

  void rope(Tensor q, Tensor k, Tensor positions, double theta) override {
    cuda::rope(q, k, positions, theta, stream_);
  }
  void kv_append(Tensor k_cache, Tensor v_cache, Tensor k, Tensor v,
                 const AttentionMeta& meta) override {
    cuda::kv_append(k_cache, v_cache, k, v, meta, stream_);
  }
  void attention(Tensor out, Tensor q, Tensor k_cache, Tensor v_cache,
                 const AttentionMeta& meta) override {
    const int64_t n_tokens = q.size(0), n_heads = q.size(1), head_dim = q.size(2);
    const AttentionPlan plan =
        plan_attention(n_tokens, meta.block_tables.size(0), n_heads, k_cache.size(2), head_dim,
                       meta.block_tables.size(1) * meta.block_size, meta.sliding_window,
                       k_cache.dtype == DType::kBF16, sm_count_, sm_major_);
    const int64_t need = attention_workspace_floats(plan, n_tokens, n_heads, head_dim);
    if (need > attention_workspace_size_) {
      // As the scatter scratch: grows to the largest need, outgrown buffers kept for graphs.
      if (attention_workspace_ != nullptr) retired_.push_back(attention_workspace_);
      attention_workspace_ = nullptr;
      attention_workspace_ = static_cast<float*>(alloc(static_cast<size_t>(need) * 4));
      attention_workspace_size_ = need;
    }
    cuda::attention(out, q, k_cache, v_cache, meta, plan, attention_workspace_,
                    attention_workspace_size_, stream_);
  }
  void moe_gate(Tensor topk_idx, Tensor topk_weights, Tensor logits) override {
    cuda::moe_gate(topk_idx, topk_weights, logits, stream_);
  }
  void gather_rows(Tensor out, Tensor x, Tensor rows) override {
    cuda::gather_rows(out, x, rows, stream_);
  }
  void scatter_add_weighted(Tensor out, Tensor x, Tensor rows, Tensor weights) override {
    const int64_t need = scatter_scratch_size(out.size(0), rows.size(0));
    if (need > scatter_scratch_size_) {
      // Grows to the largest step seen (the first steps of a run). The old buffer stays
      // allocated until the backend goes: a recorded graph may still point at it.
      if (scatter_scratch_ != nullptr) retired_.push_back(scatter_scratch_);
      scatter_scratch_ = nullptr;
      scatter_scratch_ = static_cast<int32_t*>(alloc(static_cast<size_t>(need) * 4));
      scatter_scratch_size_ = need;
    }
    cuda::scatter_add_weighted(out, x, rows, weights, scatter_scratch_, scatter_scratch_size_,
                               stream_);
  }
  void swiglu(Tensor out, Tensor gate, Tensor up) override { cuda::swiglu(out, gate, up, stream_); }

  void moe_route(Tensor sorted_rows, Tensor sorted_weights, Tensor offsets, Tensor topk_idx,
                 Tensor topk_weights, int64_t expert_begin, int64_t expert_end) override {
    cuda::moe_route(sorted_rows, sorted_weights, offsets, topk_idx, topk_weights, expert_begin,
                    expert_end, stream_);
  }

  void count_routed(Tensor counts, Tensor offsets) override {
    cuda::count_routed(counts, offsets, stream_);
  }

  // The grouped kernel reading row ranges from the device. The device array of the groups'
  // weight pointers is made on first use of each weight set (the eager first step of a shape,
  // never while a graph is recorded) and kept.
  void grouped_matmul_offsets(Tensor out, Tensor x, const Tensor* w, Tensor offsets, int64_t first,
                              size_t n_groups) override {
    if (n_groups == 0) return;
    const int64_t n_out = w[0].size(0);
    for (size_t g = 0; g < n_groups; ++g)
      SY_CHECK(w[g].ndim == 2 && w[g].size(0) == n_out && w[g].size(1) == x.size(1) &&
                   w[g].dtype == x.dtype && w[g].device == Device::kCuda,
               "grouped_matmul_offsets: weight ", g, " ", w[g].shape_str(), " for x ",
               x.shape_str());
    // Keyed by every pointer: freed weights' addresses come back in new allocations.
    std::vector<const void*> key(n_groups);
    bool aligned = true;
    for (size_t g = 0; g < n_groups; ++g) {
      key[g] = w[g].data;
      aligned = aligned && reinterpret_cast<uintptr_t>(w[g].data) % 16 == 0;
    }
    auto it = weight_arrays_.find(key);
    if (it == weight_arrays_.end()) {
      void** dev = static_cast<void**>(alloc(n_groups * sizeof(void*)));
      copy_from_host(dev, key.data(), n_groups * sizeof(void*));  // ordered on the stream
      it = weight_arrays_.emplace(key, std::make_pair(dev, aligned)).first;
    }
    cuda::grouped_gemm_offsets(out, x, it->second.first, it->second.second, n_out, offsets, first,
                               n_groups, sm_major_, stream_);
  }

  void sample(Tensor out_ids, Tensor logits, Tensor params) override {
    cuda::sample(out_ids, logits, params, stream_);
  }
  void penalize(Tensor logits, Tensor offsets, Tensor ids, Tensor counts, Tensor params) override {
    cuda::penalize(logits, offsets, ids, counts, params, stream_);
  }
  void bias(Tensor logits, Tensor offsets, Tensor ids, Tensor values) override {
    cuda::bias(logits, offsets, ids, values, stream_);
  }
  void logprobs(Tensor out_logprobs, Tensor out_ids, Tensor logits, Tensor rows,
                Tensor chosen) override {
    cuda::logprobs(out_logprobs, out_ids, logits, rows, chosen, stream_);
  }

  bool supports_graphs() const override { return true; }
  bool has_graph(int64_t id) const override { return graphs_.count(id) > 0; }
  void begin_graph() override {
    SY_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  }
  void end_graph(int64_t id) override {
    cudaGraph_t graph = nullptr;
    SY_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (e != cudaSuccess) SY_FAIL("CUDA graph ", id, " could not be made: ", cudaGetErrorString(e));
    auto it = graphs_.find(id);
    if (it != graphs_.end()) cudaGraphExecDestroy(it->second);
    graphs_[id] = exec;
  }
  void abort_graph() override {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream_, &status) != cudaSuccess ||
        status == cudaStreamCaptureStatusNone)
      return;
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream_, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
  }
  void drop_graph(int64_t id) override {
    auto it = graphs_.find(id);
    if (it == graphs_.end()) return;
    cudaGraphExecDestroy(it->second);
    graphs_.erase(it);
  }
  void make_current() override { SY_CUDA_CHECK(cudaSetDevice(device_)); }
  void launch_graph(int64_t id) override {
    auto it = graphs_.find(id);
    SY_CHECK(it != graphs_.end(), "no CUDA graph ", id);
    SY_CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
  }

 private:
  // Shapes and dtypes of out[m, n] = x[m, k] · w[n, k]ᵀ on this device.
  static void check_gemm(const char* op, const Tensor& out, const Tensor& x, const Tensor& w,
                         int64_t m) {
    SY_CHECK(x.ndim == 2 && w.ndim == 2 && out.ndim == 2, op, ": x ", x.shape_str(), ", w ",
             w.shape_str(), ", out ", out.shape_str());
    SY_CHECK(
        x.size(0) == m && x.size(1) == w.size(1) && out.size(0) == m && out.size(1) == w.size(0),
        op, ": out ", out.shape_str(), " = x ", x.shape_str(), " · w ", w.shape_str(), "ᵀ");
    SY_CHECK(x.dtype == w.dtype, op, ": x is ", dtype_name(x.dtype), ", w is ", dtype_name(w.dtype),
             "; they must match");
    SY_CHECK(out.dtype == DType::kF32 || out.dtype == x.dtype, op, ": out ", dtype_name(out.dtype),
             " for ", dtype_name(x.dtype), " inputs");
    SY_CHECK(out.device == Device::kCuda && x.device == Device::kCuda && w.device == Device::kCuda,
             op, ": operands must be on the GPU");
    SY_CHECK(m <= INT32_MAX && w.size(0) <= INT32_MAX && w.size(1) <= INT32_MAX, op,
             ": dimensions beyond int32");
  }

  int device_;
  DType storage_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  void* pointer_arrays_ = nullptr;            // device [3, kMaxGroups] A, B, C pointers
  bool grouped_refused_[2] = {false, false};  // by output dtype: F32, the storage dtype
  size_t last_group_ = 0;  // the last group with rows in the current grouped_matmul
  int32_t* scatter_scratch_ = nullptr;
  int64_t scatter_scratch_size_ = 0;
  float* attention_workspace_ = nullptr;  // flash-decoding partials
  int64_t attention_workspace_size_ = 0;
  int sm_count_ = 1;
  int sm_major_ = 0;
  std::vector<void*> retired_;  // outgrown scratch buffers, kept for recorded graphs
  static constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
  void* cublas_workspace_ = nullptr;
  // Device arrays of expert weight pointers, by the pointers, and whether all are 16-byte
  // aligned.
  std::map<std::vector<const void*>, std::pair<void**, bool>> weight_arrays_;
  std::map<int64_t, cudaGraphExec_t> graphs_;
  // Host argument arrays of the grouped GEMM, reused.
  std::vector<const void*> host_a_, host_b_;
  std::vector<void*> host_c_;
  std::vector<int> m_, n_, k_, group_size_;
  std::vector<float> alpha_, beta_;
  std::vector<cublasOperation_t> trans_a_, trans_b_;
};

}  // namespace

std::unique_ptr<Ops> make_cuda_ops(int device, DType storage) {
  return std::make_unique<CudaOps>(device, storage);
}

cudaStream_t stream_of(Ops& ops) {
  auto* cuda_ops = dynamic_cast<CudaOps*>(&ops);
  SY_CHECK(cuda_ops != nullptr, "stream_of: not a CUDA backend");
  return cuda_ops->stream();
}

}  // namespace sy::cuda
