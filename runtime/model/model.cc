// The Mixtral forward pass (see model.h).
#include "runtime/model/model.h"

#include <algorithm>
#include <atomic>
#include <cmath>

namespace sy {

std::atomic<int64_t> Model::next_serial_{1};

// The auto exchange's decode steps route on the device, so they record as graphs on GPUs.
static_assert(kAutoMaxRoutedRows <= Model::kDeviceRouteMaxRows);

void ModelLimits::validate() const {
  SY_CHECK(max_tokens > 0, "limits: max_tokens must be positive, got ", max_tokens);
  SY_CHECK(max_seqs > 0 && max_seqs <= max_tokens, "limits: max_seqs ", max_seqs,
           " must be in [1, max_tokens]");
  SY_CHECK(block_size > 0, "limits: block_size must be positive, got ", block_size);
  SY_CHECK(max_blocks_per_seq > 0, "limits: max_blocks_per_seq must be positive");
  SY_CHECK(n_blocks > 0, "limits: n_blocks must be positive, got ", n_blocks);
  SY_CHECK(max_logit_rows > 0 && max_logit_rows <= max_tokens, "limits: max_logit_rows ",
           max_logit_rows, " must be in [1, max_tokens]");
}

void StepBatch::clear() {
  tokens.clear();
  positions.clear();
  token_seq.clear();
  block_tables.clear();
  logit_rows.clear();
  n_seqs = 0;
}

namespace {

// Carves 64-byte-aligned tensors out of one allocation.
class Carver {
 public:
  explicit Carver(void* base, Device device) : base_(static_cast<char*>(base)), device_(device) {}
  Tensor take(DType dtype, std::initializer_list<int64_t> dims) {
    Tensor t(base_ == nullptr ? nullptr : base_ + offset_, dtype, dims, device_);
    offset_ += (t.bytes() + 63) / 64 * 64;
    return t;
  }
  size_t bytes() const { return offset_; }

 private:
  char* base_;
  Device device_;
  size_t offset_ = 0;
};

}  // namespace

const char* ForwardProfile::phase_name(int phase) {
  static const char* names[] = {"attention", "router", "dispatch", "expert", "combine", "other"};
  return names[phase];
}

const char* ForwardProfile::traffic_name(int traffic) {
  static const char* names[] = {"tp_reduce", "dispatch",     "combine",      "residual_gather",
                                "ep_reduce", "embed_reduce", "logits_gather"};
  return names[traffic];
}

void ForwardProfile::reset() {
  std::fill(std::begin(seconds), std::end(seconds), 0.0);
  std::fill(std::begin(bytes), std::end(bytes), 0);
  std::fill(expert_tokens.begin(), expert_tokens.end(), 0);
  steps = 0;
  tokens = 0;
}

void Model::set_profile(ForwardProfile* profile) {
  profile_ = profile;
  if (profile_ != nullptr)
    profile_->expert_tokens.assign(
        static_cast<size_t>(config_.num_hidden_layers * config_.num_local_experts), 0);
}

void Model::lap(ForwardProfile::Phase phase) {
  if (profile_ == nullptr) return;
  ops_.synchronize();
  const auto now = std::chrono::steady_clock::now();
  profile_->seconds[phase] += std::chrono::duration<double>(now - mark_).count();
  mark_ = now;
}

WeightShard shard_for(const ModelConfig& c, const ParallelContext* parallel) {
  if (parallel == nullptr) return WeightShard::full(c);
  const ParallelConfig& p = parallel->config;
  WeightShard s;
  s.n_heads = c.num_attention_heads / p.tp;
  s.head_begin = p.tp_rank() * s.n_heads;
  s.n_kv_heads = c.num_key_value_heads / p.tp;
  s.kv_head_begin = p.tp_rank() * s.n_kv_heads;
  s.experts = experts_of(c.num_local_experts, p.ep_size(), p.ep_rank());
  s.vocab_begin = split_begin(c.vocab_size, p.world, p.rank);
  s.n_vocab = split_count(c.vocab_size, p.world, p.rank);
  return s;
}

Model::Model(const ModelConfig& config, Weights weights, Ops& ops, const ModelLimits& limits,
             const ParallelContext* parallel)
    : config_(config),
      weights_(std::move(weights)),
      ops_(ops),
      limits_(limits),
      par_(parallel),
      serial_(next_serial_++) {
  limits_.validate();
  if (par_ != nullptr) {
    par_->config.validate(config_.layout_shape());
    world_ = par_->config.world;
    rank_ = par_->config.rank;
    // Host staging (and MPI on the CPU) copies and waits inside collectives: such steps run
    // eagerly. Stream-ordered device communicators (NCCL on the compute stream) record.
    graph_collectives_ = world_ == 1 || (par_->world->stream_ordered() &&
                                         par_->tp->stream_ordered() && par_->ep->stream_ordered());
  }
  const int64_t N = limits_.max_tokens;
  const int64_t dim = config_.hidden_size;
  const int64_t head_dim = config_.head_dim;
  const int64_t n_heads = weights_.shard.n_heads;
  const int64_t n_kv_heads = weights_.shard.n_kv_heads;
  const int64_t k = config_.num_experts_per_tok;
  const int64_t n_experts = config_.num_local_experts;
  const int64_t hidden_dim = config_.intermediate_size;
  const int64_t n_vocab = weights_.shard.n_vocab;
  const int64_t R = limits_.max_logit_rows;

  // Two passes over the same carving: the first sizes the allocation, the second places views.
  const DType S = ops_.storage_dtype();  // GEMM inputs (ops.h)
  auto carve = [&](Carver& c) {
    x_ = c.take(DType::kF32, {N, dim});
    xn_ = c.take(S, {N, dim});
    q_ = c.take(DType::kF32, {N, n_heads, head_dim});
    k_ = c.take(DType::kF32, {N, n_kv_heads, head_dim});
    v_ = c.take(DType::kF32, {N, n_kv_heads, head_dim});
    attn_ = c.take(S, {N, n_heads, head_dim});
    o_ = c.take(DType::kF32, {N, dim});
    router_logits_ = c.take(DType::kF32, {N, n_experts});
    router_in_ = c.take(DType::kF32, {S == DType::kF32 ? 0 : N, dim});
    topk_idx_ = c.take(DType::kI32, {N, k});
    topk_weights_ = c.take(DType::kF32, {N, k});
    x_own_ = c.take(DType::kF32, {N, dim});
    xn_own_ = c.take(S, {N, dim});
    y_own_ = c.take(DType::kF32, {N, dim});
    moe_send_ = c.take(S, {N * k, dim});
    moe_recv_ = c.take(S, {N * k, dim});
    moe_in_ = c.take(S, {N * k, dim});
    moe_out_ = c.take(S, {N * k, dim});
    sorted_rows_ = c.take(DType::kI32, {N * k});
    sorted_weights_ = c.take(DType::kF32, {N * k});
    perm_ = c.take(DType::kI32, {N * k});
    expert_offsets_ = c.take(DType::kI32, {n_experts + 1});
    expert_scratch_.gate = c.take(S, {N * k, hidden_dim});
    expert_scratch_.up = c.take(S, {N * k, hidden_dim});
    ids_ = c.take(DType::kI32, {N});
    positions_ = c.take(DType::kI32, {N});
    token_seq_ = c.take(DType::kI32, {N});
    block_tables_ = c.take(DType::kI32, {limits_.max_seqs, limits_.max_blocks_per_seq});
    logit_rows_ = c.take(DType::kI32, {R});
    logit_x_ = c.take(DType::kF32, {R, dim});
    logit_xn_ = c.take(S, {R, dim});
    logits_ = c.take(DType::kF32, {R, n_vocab});
    sample_params_ = c.take(DType::kF32, {R, Ops::kSampleParams});
    sample_ids_ = c.take(DType::kI32, {R});
    penalty_offsets_ = c.take(DType::kI32, {R + 1});
    penalty_params_ = c.take(DType::kF32, {R, Ops::kPenaltyParams});
    penalty_ids_ = c.take(DType::kI32, {penalty_capacity()});
    penalty_counts_ = c.take(DType::kI32, {penalty_capacity()});
    bias_offsets_ = c.take(DType::kI32, {R + 1});
    bias_ids_ = c.take(DType::kI32, {bias_capacity()});
    bias_values_ = c.take(DType::kF32, {bias_capacity()});
    const int64_t LP = logprob_capacity();
    logprob_rows_ = c.take(DType::kI32, {LP});
    logprob_raw_ = c.take(DType::kF32, {LP, config_.vocab_size});
    logprob_out_ = c.take(DType::kF32, {LP * (1 + kMaxTopLogprobs)});
    logprob_ids_ = c.take(DType::kI32, {LP * kMaxTopLogprobs});
    logits_all_ = c.take(DType::kF32, {world_ > 1 ? R * config_.vocab_size : 0});
    const bool interleave = world_ > 1 && forward_sample_supported();
    logits_full_ = c.take(DType::kF32, {interleave ? R : 0, config_.vocab_size});
    logits_perm_ = c.take(DType::kI32, {interleave ? R * world_ : 0});
  };
  Carver sizing(nullptr, ops_.device());
  carve(sizing);
  state_storage_ = DeviceBuffer(ops_, sizing.bytes());
  Carver placing(state_storage_.get(), ops_.device());
  carve(placing);

  const int64_t n_layers = config_.num_hidden_layers;
  const int64_t per_layer = limits_.n_blocks * limits_.block_size * n_kv_heads * head_dim;
  const size_t layer_bytes = static_cast<size_t>(per_layer) * dtype_size(S);
  kv_storage_ = DeviceBuffer(ops_, 2 * static_cast<size_t>(n_layers) * layer_bytes);
  char* kv = static_cast<char*>(kv_storage_.get());
  for (int64_t l = 0; l < n_layers; ++l) {
    k_cache_.emplace_back(
        kv + (2 * l) * layer_bytes, S,
        std::initializer_list<int64_t>{limits_.n_blocks, limits_.block_size, n_kv_heads, head_dim},
        ops_.device());
    v_cache_.emplace_back(
        kv + (2 * l + 1) * layer_bytes, S,
        std::initializer_list<int64_t>{limits_.n_blocks, limits_.block_size, n_kv_heads, head_dim},
        ops_.device());
  }

  // Small steps (decode) route on the device when the backend is a GPU; larger ones (prefill)
  // take the host layout and the cuBLAS grouped GEMM, whose row counts come from the host.
  if (ops_.device() != Device::kCpu) device_route_max_rows_ = kDeviceRouteMaxRows;
  graph_seen_.assign(static_cast<size_t>((limits_.max_seqs + 1) * (R + 1)), 0);
  layout_.reserve(N, k, n_experts);
  host_topk_idx_.resize(static_cast<size_t>(N * k));
  host_topk_weights_.resize(static_cast<size_t>(N * k));
  local_offsets_.resize(weights_.shard.experts.size() + 1);
  if (par_ != nullptr) {
    ep_plan_.reserve(par_->ep->size(), n_experts, N * k, weights_.shard.experts.size());
    host_logits_.resize(static_cast<size_t>(R * config_.vocab_size));
  }
}

void Model::forward(const StepBatch& batch, float* logits) {
  run_step(batch);
  logits_fetch(static_cast<int64_t>(batch.logit_rows.size()), logits);
  lap(ForwardProfile::kOther);
}

void Model::forward_sample(const StepBatch& batch, const float* params, int32_t* ids,
                           const SamplePenalties* penalties, SampleLogprobs* logprobs,
                           const SampleBiases* biases) {
  SY_CHECK(forward_sample_supported(), "forward_sample: a vocabulary of ", config_.vocab_size,
           " does not split evenly over ", world_, " ranks");
  const int64_t n_logits = static_cast<int64_t>(batch.logit_rows.size());
  const int64_t n_lp = logprobs != nullptr ? static_cast<int64_t>(logprobs->rows.size()) : 0;
  if (logprobs != nullptr) {
    SY_CHECK(n_lp <= logprob_capacity(), "forward_sample: logprobs of ", n_lp,
             " rows; the limit is ", logprob_capacity());
    SY_CHECK(logprobs->top >= 1 &&
                 logprobs->top <= std::min<int64_t>(kMaxTopLogprobs, config_.vocab_size),
             "forward_sample: top ", logprobs->top, " logprobs outside [1, ",
             std::min<int64_t>(kMaxTopLogprobs, config_.vocab_size), "]");
    SY_CHECK(n_lp == 0 || (logprobs->logprobs != nullptr && logprobs->ids != nullptr),
             "forward_sample: logprobs asked with no buffers");
    for (int32_t r : logprobs->rows)
      SY_CHECK(r >= 0 && r < n_logits, "forward_sample: logprobs of logit row ", r, " of ",
               n_logits);
    SY_CHECK(logprobs->forced.empty() || logprobs->forced.size() == logprobs->rows.size(),
             "forward_sample: ", logprobs->forced.size(), " forced tokens for ", n_lp, " rows");
    for (int32_t t : logprobs->forced)
      SY_CHECK(t >= -1 && t < config_.vocab_size, "forward_sample: forced token ", t,
               " outside the vocabulary of ", config_.vocab_size);
  }
  int64_t n_penalty_ids = 0;
  if (penalties != nullptr) {
    const int32_t* off = penalties->offsets;
    SY_CHECK(off != nullptr && penalties->params != nullptr && off[0] == 0,
             "forward_sample: penalty offsets must start at 0");
    for (int64_t i = 0; i < n_logits; ++i) {
      SY_CHECK(off[i] <= off[i + 1], "forward_sample: penalty offsets decrease at row ", i);
      const float* p = penalties->params + i * Ops::kPenaltyParams;
      SY_CHECK(std::isfinite(p[0]) && p[0] > 0.f, "forward_sample: repetition penalty ", p[0],
               " of row ", i, " must be positive");
      SY_CHECK(std::isfinite(p[1]) && std::isfinite(p[2]), "forward_sample: presence penalty ",
               p[1], " and frequency penalty ", p[2], " of row ", i, " must be finite");
    }
    n_penalty_ids = off[n_logits];
    SY_CHECK(n_penalty_ids <= penalty_capacity(), "forward_sample: ", n_penalty_ids,
             " penalty ids; the limit is ", penalty_capacity());
    SY_CHECK(n_penalty_ids == 0 || (penalties->ids != nullptr && penalties->counts != nullptr),
             "forward_sample: no penalty ids or counts");
  }
  int64_t n_bias_ids = 0;
  if (biases != nullptr) {
    const int32_t* off = biases->offsets;
    SY_CHECK(off != nullptr && off[0] == 0, "forward_sample: bias offsets must start at 0");
    for (int64_t i = 0; i < n_logits; ++i) {
      SY_CHECK(off[i] <= off[i + 1] && off[i + 1] - off[i] <= kMaxBiasesPerRow,
               "forward_sample: ", off[i + 1] - off[i], " biases in row ", i, " (0 to ",
               kMaxBiasesPerRow, ")");
      for (int32_t j = off[i]; j < off[i + 1]; ++j)
        SY_CHECK(biases->ids[j] >= 0 && biases->ids[j] < config_.vocab_size,
                 "forward_sample: bias of token ", biases->ids[j], " in row ", i);
    }
    n_bias_ids = off[n_logits];
    SY_CHECK(n_bias_ids <= bias_capacity(), "forward_sample: ", n_bias_ids,
             " biases; the limit is ", bias_capacity());
  }
  run_step(batch);
  if (n_logits > 0) {
    Tensor lg = logits_.rows(0, n_logits);  // [n_logits, vocab] on one rank
    if (world_ > 1) {
      // Block r of the gather holds rank r's columns of every row, [n_logits, width]: row i of
      // the full logits is, as world_ rows of width columns, rows r * n_logits + i (r = 0 ..).
      const Tensor all = logits_gather(n_logits);
      const int64_t width = config_.vocab_size / world_;
      // The permutation depends on n_logits alone: uploaded when it changes (decode steps of
      // one batch size reuse it).
      Tensor perm = logits_perm_.rows(0, n_logits * world_);
      if (perm_rows_ != n_logits) {
        host_perm_.resize(static_cast<size_t>(n_logits * world_));
        for (int64_t i = 0; i < n_logits; ++i)
          for (int64_t r = 0; r < world_; ++r)
            host_perm_[static_cast<size_t>(i * world_ + r)] =
                static_cast<int32_t>(r * n_logits + i);
        ops_.copy_from_host(perm.data, host_perm_.data(), perm.bytes());
        perm_rows_ = n_logits;
      }
      lg = logits_full_.rows(0, n_logits);
      ops_.gather_rows(lg.reshape({n_logits * world_, width}),
                       all.reshape({world_ * n_logits, width}), perm);
    }
    // The rows asked for logprobs, kept before any penalty: the model's own distribution.
    Tensor lp_rows = logprob_rows_.rows(0, n_lp);
    Tensor lp_raw = logprob_raw_.rows(0, n_lp);
    if (n_lp > 0) {
      ops_.copy_from_host(lp_rows.data, logprobs->rows.data(), lp_rows.bytes());
      ops_.gather_rows(lp_raw, lg, lp_rows);
    }
    if (n_bias_ids > 0) {
      Tensor off = bias_offsets_.rows(0, n_logits + 1);
      Tensor bid = bias_ids_.rows(0, n_bias_ids);
      Tensor val = bias_values_.rows(0, n_bias_ids);
      ops_.copy_from_host(off.data, biases->offsets, off.bytes());
      ops_.copy_from_host(bid.data, biases->ids, bid.bytes());
      ops_.copy_from_host(val.data, biases->values, val.bytes());
      ops_.bias(lg, off, bid, val);
    }
    if (n_penalty_ids > 0) {
      Tensor off = penalty_offsets_.rows(0, n_logits + 1);
      Tensor par = penalty_params_.rows(0, n_logits);
      Tensor pid = penalty_ids_.rows(0, n_penalty_ids);
      Tensor cnt = penalty_counts_.rows(0, n_penalty_ids);
      ops_.copy_from_host(off.data, penalties->offsets, off.bytes());
      ops_.copy_from_host(par.data, penalties->params, par.bytes());
      ops_.copy_from_host(pid.data, penalties->ids, pid.bytes());
      ops_.copy_from_host(cnt.data, penalties->counts, cnt.bytes());
      ops_.penalize(lg, off, pid, cnt, par);
    }
    Tensor p = sample_params_.rows(0, n_logits);
    ops_.copy_from_host(p.data, params, p.bytes());
    Tensor sampled = sample_ids_.rows(0, n_logits);
    ops_.sample(sampled, lg, p);
    // Forced rows take their given token: one copy per run of consecutive rows.
    if (n_lp > 0 && !logprobs->forced.empty()) {
      const std::vector<int32_t>& f = logprobs->forced;
      const std::vector<int32_t>& r = logprobs->rows;
      for (int64_t j = 0; j < n_lp;) {
        if (f[j] < 0) {
          ++j;
          continue;
        }
        int64_t e = j + 1;
        while (e < n_lp && f[e] >= 0 && r[e] == r[e - 1] + 1) ++e;
        ops_.copy_from_host(sampled.rows(r[j], e - j).data, f.data() + j,
                            static_cast<size_t>(e - j) * sizeof(int32_t));
        j = e;
      }
    }
    if (n_lp > 0) {
      const int64_t top = logprobs->top;
      const Tensor out(logprob_out_.data, DType::kF32, {n_lp, top + 1}, ops_.device());
      const Tensor out_ids(logprob_ids_.data, DType::kI32, {n_lp, top}, ops_.device());
      ops_.logprobs(out, out_ids, lp_raw, lp_rows, sampled);
      ops_.copy_to_host(logprobs->logprobs, out.data, out.bytes());
      ops_.copy_to_host(logprobs->ids, out_ids.data, out_ids.bytes());
    }
    ops_.copy_to_host(ids, sampled.data, static_cast<size_t>(n_logits) * sizeof(int32_t));
  }
  lap(ForwardProfile::kOther);
}

int64_t Model::penalty_capacity() const {
  const int64_t rows = std::min(limits_.max_logit_rows, limits_.max_seqs);
  return rows * std::min(config_.vocab_size, limits_.max_blocks_per_seq * limits_.block_size);
}

int64_t Model::bias_capacity() const {
  const int64_t rows = std::min(limits_.max_logit_rows, limits_.max_seqs);
  return rows * std::min(config_.vocab_size, kMaxBiasesPerRow);
}

bool Model::forward_sample_supported() const {
  return world_ == 1 || config_.vocab_size % world_ == 0;
}

void Model::run_step(const StepBatch& batch) {
  ops_.make_current();
  const int64_t n_tokens = batch.n_tokens();
  const int64_t n_logits = static_cast<int64_t>(batch.logit_rows.size());
  SY_CHECK(n_tokens > 0 && n_tokens <= limits_.max_tokens, "step of ", n_tokens,
           " tokens; the limit is ", limits_.max_tokens);
  SY_CHECK(static_cast<int64_t>(batch.positions.size()) == n_tokens &&
               static_cast<int64_t>(batch.token_seq.size()) == n_tokens,
           "step batch: positions/token_seq sizes differ from tokens");
  SY_CHECK(batch.n_seqs > 0 && batch.n_seqs <= limits_.max_seqs, "step of ", batch.n_seqs,
           " sequences; the limit is ", limits_.max_seqs);
  SY_CHECK(
      static_cast<int64_t>(batch.block_tables.size()) == batch.n_seqs * limits_.max_blocks_per_seq,
      "step batch: block_tables holds ", batch.block_tables.size(), " entries, expected ",
      batch.n_seqs * limits_.max_blocks_per_seq);
  SY_CHECK(n_logits <= limits_.max_logit_rows, "step asks for ", n_logits,
           " logit rows; the limit is ", limits_.max_logit_rows);
  for (int64_t t = 0; t < n_tokens; ++t) {
    SY_CHECK(batch.tokens[t] >= 0 && batch.tokens[t] < config_.vocab_size, "token id ",
             batch.tokens[t], " outside the vocabulary of ", config_.vocab_size);
    SY_CHECK(batch.positions[t] >= 0 && batch.positions[t] < config_.max_position_embeddings,
             "position ", batch.positions[t], " outside the context of ",
             config_.max_position_embeddings);
    SY_CHECK(batch.token_seq[t] >= 0 && batch.token_seq[t] < batch.n_seqs, "token_seq ",
             batch.token_seq[t], " outside ", batch.n_seqs, " sequences");
  }
  for (int32_t b : batch.block_tables)
    SY_CHECK(b >= 0 && b < limits_.n_blocks, "block id ", b, " outside the cache of ",
             limits_.n_blocks, " blocks");
  for (int32_t r : batch.logit_rows)
    SY_CHECK(r >= 0 && r < n_tokens, "logit row ", r, " outside the step's ", n_tokens, " tokens");

  // Step inputs to the device.
  ops_.copy_from_host(ids_.data, batch.tokens.data(), static_cast<size_t>(n_tokens) * 4);
  ops_.copy_from_host(positions_.data, batch.positions.data(), static_cast<size_t>(n_tokens) * 4);
  ops_.copy_from_host(token_seq_.data, batch.token_seq.data(), static_cast<size_t>(n_tokens) * 4);
  ops_.copy_from_host(block_tables_.data, batch.block_tables.data(), batch.block_tables.size() * 4);
  AttentionMeta meta;
  meta.positions = positions_.rows(0, n_tokens);
  meta.token_seq = token_seq_.rows(0, n_tokens);
  meta.block_tables = block_tables_.rows(0, batch.n_seqs);
  meta.block_size = limits_.block_size;
  meta.sliding_window = config_.sliding_window;

  const float eps = static_cast<float>(config_.rms_norm_eps);
  const bool all_to_all =
      par_ != nullptr &&
      par_->config.step_exchange(n_tokens * config_.num_experts_per_tok) == MoeExchange::kAllToAll;
  // Tokens this rank owns in the MoE block (all of them on one rank or with the all-gather
  // exchange); the residual stream is replicated again by an all-gather after each layer.
  token_counts(n_tokens, all_to_all ? world_ : 1, token_counts_);
  const int64_t own_begin = all_to_all ? split_begin(n_tokens, world_, rank_) : 0;
  const int64_t n_own = all_to_all ? token_counts_[rank_] : n_tokens;

  const uint64_t row_bytes = static_cast<uint64_t>(config_.hidden_size) * sizeof(float);
  if (profile_ != nullptr) {
    mark_ = std::chrono::steady_clock::now();
    ++profile_->steps;
    profile_->tokens += n_tokens;
  }
  if (n_logits > 0)
    ops_.copy_from_host(logit_rows_.data, batch.logit_rows.data(),
                        static_cast<size_t>(n_logits) * 4);

  // Every op of the step from here to the logits: run at once, or recorded into a graph that
  // later pure-decode steps of the same shape replay (device routing, so no all-to-all; one rank
  // or stream-ordered collectives; no profile).
  auto step = [&] {
    Tensor x = x_.rows(0, n_tokens);  // [n_tokens, dim]
    ops_.embedding(x, ids_.rows(0, n_tokens), weights_.embed, weights_.shard.vocab_begin);
    if (world_ > 1) {
      par_->world->all_reduce_sum(x);  // vocabulary-parallel rows
      if (profile_ != nullptr)
        profile_->bytes[ForwardProfile::kEmbed] += 2 * n_tokens * row_bytes * (world_ - 1) / world_;
    }
    const int tp = par_ != nullptr ? par_->config.tp : 1;
    for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
      const LayerWeights& L = weights_.layers[static_cast<size_t>(l)];
      Tensor xn = xn_.rows(0, n_tokens);  // [n_tokens, dim]
      Tensor o = o_.rows(0, n_tokens);    // [n_tokens, dim]
      lap(ForwardProfile::kOther);
      ops_.rmsnorm(xn, x, L.input_norm, eps);  // [n_tokens, dim]
      attention_block(l, n_tokens, meta);      // o = partial attn(xn)
      if (!all_to_all) {
        if (tp > 1) {
          par_->tp->all_reduce_sum(o);
          if (profile_ != nullptr)
            profile_->bytes[ForwardProfile::kTpReduce] += 2 * n_tokens * row_bytes * (tp - 1) / tp;
        }
        lap(ForwardProfile::kAttention);
        ops_.add(x, x, o);                      // residual
        ops_.rmsnorm(xn, x, L.post_norm, eps);  // [n_tokens, dim]
        moe_block(l, o, xn, x, false);          // o = moe(xn)
        ops_.add(x, x, o);                      // residual
        continue;
      }
      // Sequence parallel: this rank's tokens, summed over its attention group.
      Tensor x_own = x_own_.rows(0, n_own);    // [n_own, dim]
      Tensor xn_own = xn_own_.rows(0, n_own);  // [n_own, dim]
      Tensor y_own = y_own_.rows(0, n_own);    // [n_own, dim]
      if (tp > 1) {
        const int first = par_->config.tp_group() * tp;
        tp_counts_.assign(token_counts_.begin() + first, token_counts_.begin() + first + tp);
        int64_t group_rows = 0;
        for (int64_t c : tp_counts_) group_rows += c;
        par_->tp->reduce_scatter_sum(y_own,
                                     o.rows(split_begin(n_tokens, world_, first), group_rows),
                                     tp_counts_);  // [n_own, dim]
        if (profile_ != nullptr)
          profile_->bytes[ForwardProfile::kTpReduce] += (group_rows - n_own) * row_bytes;
        ops_.add(x_own, x.rows(own_begin, n_own), y_own);  // residual
      } else {
        ops_.add(x_own, x.rows(own_begin, n_own), o.rows(own_begin, n_own));
      }
      lap(ForwardProfile::kAttention);
      ops_.rmsnorm(xn_own, x_own, L.post_norm, eps);     // [n_own, dim]
      moe_block(l, y_own, xn_own, x_own, true);          // y = moe(xn), all-to-all
      ops_.add(x_own, x_own, y_own);                     // residual
      par_->world->all_gather(x, x_own, token_counts_);  // [n_tokens, dim] everywhere
      if (profile_ != nullptr)
        profile_->bytes[ForwardProfile::kResidualGather] += n_own * row_bytes * (world_ - 1);
    }
    logits_compute(n_logits, n_tokens);
  };

  const int64_t k = config_.num_experts_per_tok;
  const bool graph = ops_.supports_graphs() && graph_collectives_ && profile_ == nullptr &&
                     routing_trace_ == nullptr && n_tokens == batch.n_seqs &&
                     routes_on_device(n_tokens * k, all_to_all);
  const int64_t shape = n_tokens * (limits_.max_logit_rows + 1) + n_logits;
  const int64_t key = (serial_ << 40) | shape;  // graphs of the backend are shared by models
  if (graph && ops_.has_graph(key)) {
    ops_.launch_graph(key);
    ++graph_steps_;
  } else if (graph && graph_seen_[static_cast<size_t>(shape)]) {
    // The second step of this shape: the first one ran eagerly, so every lazily sized buffer
    // of the backend already has its size, and nothing in the step allocates.
    ops_.begin_graph();
    try {
      step();
    } catch (...) {
      ops_.abort_graph();
      throw;
    }
    ops_.end_graph(key);
    recorded_.push_back(key);
    ops_.launch_graph(key);
    ++graph_steps_;
  } else {
    step();
    if (graph) graph_seen_[static_cast<size_t>(shape)] = 1;
  }
}

// With experts split over ranks (all-gather exchange), each rank holds the sum over its own
// experts: the expert group adds them up.
void Model::reduce_expert_partials(Tensor out) {
  if (par_ == nullptr || par_->ep->size() == 1) return;
  const int E = par_->ep->size();
  par_->ep->all_reduce_sum(out);
  if (profile_ != nullptr)
    profile_->bytes[ForwardProfile::kEpReduce] += 2 * out.bytes() * (E - 1) / E;
}

Model::~Model() {
  for (int64_t key : recorded_) ops_.drop_graph(key);
}

bool Model::routes_on_device(int64_t n_rows, bool all_to_all) const {
  return device_route_max_rows_ > 0 && !all_to_all && n_rows <= device_route_max_rows_;
}

void Model::set_device_routing(int64_t max_rows) {
  device_route_max_rows_ = max_rows;
}

void Model::logits_compute(int64_t n_logits, int64_t n_tokens) {
  if (n_logits == 0) return;
  const float eps = static_cast<float>(config_.rms_norm_eps);
  Tensor lx = logit_x_.rows(0, n_logits);    // [n_logits, dim]
  Tensor lxn = logit_xn_.rows(0, n_logits);  // [n_logits, dim] storage dtype
  Tensor lg = logits_.rows(0, n_logits);     // [n_logits, n_vocab]
  ops_.gather_rows(lx, x_.rows(0, n_tokens), logit_rows_.rows(0, n_logits));
  ops_.rmsnorm(lxn, lx, weights_.norm, eps);
  ops_.matmul(lg, lxn, weights_.lm_head);
}

Tensor Model::logits_gather(int64_t n_logits) {
  const int64_t n_vocab = weights_.shard.n_vocab;
  const int64_t vocab = config_.vocab_size;
  Tensor lg = logits_.rows(0, n_logits);  // [n_logits, n_vocab]
  vocab_counts_.resize(static_cast<size_t>(world_));
  for (int r = 0; r < world_; ++r) vocab_counts_[r] = n_logits * split_count(vocab, world_, r);
  if (profile_ != nullptr)
    profile_->bytes[ForwardProfile::kLogits] += lg.bytes() * static_cast<uint64_t>(world_ - 1);
  Tensor all = logits_all_.rows(0, n_logits * vocab).reshape({n_logits * vocab, 1});
  par_->world->all_gather(all, lg.reshape({n_logits * n_vocab, 1}), vocab_counts_);
  return all;
}

void Model::logits_fetch(int64_t n_logits, float* logits) {
  const int64_t n_vocab = weights_.shard.n_vocab;
  const int64_t vocab = config_.vocab_size;
  if (n_logits == 0) return;
  if (world_ == 1) {
    if (logits != nullptr)
      ops_.copy_to_host(logits, logits_.data,
                        static_cast<size_t>(n_logits * n_vocab) * sizeof(float));
    return;
  }
  // Vocabulary-parallel: gather every rank's [n_logits, n_vocab_r] block, then interleave.
  const Tensor all = logits_gather(n_logits);
  if (logits == nullptr) return;
  ops_.copy_to_host(host_logits_.data(), all.data, all.bytes());
  const float* block = host_logits_.data();
  for (int r = 0; r < world_; ++r) {
    const int64_t begin = split_begin(vocab, world_, r);
    const int64_t width = split_count(vocab, world_, r);
    for (int64_t i = 0; i < n_logits; ++i)
      std::copy_n(block + i * width, width, logits + i * vocab + begin);
    block += n_logits * width;
  }
}

void Model::attention_block(int64_t layer, int64_t n_tokens, const AttentionMeta& meta) {
  const LayerWeights& L = weights_.layers[static_cast<size_t>(layer)];
  const int64_t n_heads = weights_.shard.n_heads;
  const int64_t n_kv_heads = weights_.shard.n_kv_heads;
  const int64_t head_dim = config_.head_dim;
  Tensor xn = xn_.rows(0, n_tokens);      // [n_tokens, dim]
  Tensor q = q_.rows(0, n_tokens);        // [n_tokens, n_heads, head_dim]
  Tensor k = k_.rows(0, n_tokens);        // [n_tokens, n_kv_heads, head_dim]
  Tensor v = v_.rows(0, n_tokens);        // [n_tokens, n_kv_heads, head_dim]
  Tensor attn = attn_.rows(0, n_tokens);  // [n_tokens, n_heads, head_dim]
  ops_.matmul(q.reshape({n_tokens, n_heads * head_dim}), xn, L.wq);
  ops_.matmul(k.reshape({n_tokens, n_kv_heads * head_dim}), xn, L.wk);
  ops_.matmul(v.reshape({n_tokens, n_kv_heads * head_dim}), xn, L.wv);
  ops_.rope(q, k, meta.positions, config_.rope_theta);
  ops_.kv_append(k_cache_[layer], v_cache_[layer], k, v, meta);
  ops_.attention(attn, q, k_cache_[layer], v_cache_[layer], meta);
  ops_.matmul(o_.rows(0, n_tokens), attn.reshape({n_tokens, n_heads * head_dim}), L.wo);
}

void Model::moe_block(int64_t layer, Tensor out, Tensor xn, Tensor x, bool all_to_all) {
  const LayerWeights& L = weights_.layers[static_cast<size_t>(layer)];
  const int64_t n_tokens = xn.size(0);
  const int64_t k = config_.num_experts_per_tok;
  const int64_t n_experts = config_.num_local_experts;
  const int64_t n_rows = n_tokens * k;
  const std::vector<int64_t>& experts = weights_.shard.experts;
  Tensor router_logits = router_logits_.rows(0, n_tokens);  // [n_tokens, n_experts]
  Tensor topk_idx = topk_idx_.rows(0, n_tokens);            // [n_tokens, k]
  Tensor topk_weights = topk_weights_.rows(0, n_tokens);    // [n_tokens, k]
  // The router in fp32: its weights are F32, and so is its input (a second norm of x when the
  // experts take a rounded one), so that rounding does not decide between near-tied experts.
  Tensor router_in = xn;
  if (xn.dtype != DType::kF32) {
    router_in = router_in_.rows(0, n_tokens);
    ops_.rmsnorm(router_in, x, L.post_norm, static_cast<float>(config_.rms_norm_eps));
  }
  ops_.matmul(router_logits, router_in, L.gate);
  ops_.moe_gate(topk_idx, topk_weights, router_logits);
  if (routing_trace_ != nullptr) {
    const size_t at = routing_trace_->size();
    routing_trace_->resize(at + static_cast<size_t>(n_tokens * k));
    ops_.copy_to_host(routing_trace_->data() + at, topk_idx.data, topk_idx.bytes());
  }
  if (routes_on_device(n_rows, all_to_all)) return moe_block_on_device(layer, out, xn);
  ops_.copy_to_host(host_topk_idx_.data(), topk_idx.data, topk_idx.bytes());
  ops_.copy_to_host(host_topk_weights_.data(), topk_weights.data, topk_weights.bytes());
  moe_layout(layout_, host_topk_idx_.data(), host_topk_weights_.data(), n_tokens, k, n_experts);
  ops_.copy_from_host(sorted_rows_.data, layout_.sorted_rows.data(),
                      static_cast<size_t>(n_rows) * 4);
  ops_.copy_from_host(sorted_weights_.data, layout_.sorted_weights.data(),
                      static_cast<size_t>(n_rows) * 4);
  Tensor rows = sorted_rows_.rows(0, n_rows);        // [n_rows]
  Tensor weights = sorted_weights_.rows(0, n_rows);  // [n_rows]
  ops_.fill_zero(out);

  // Routed pairs of the tokens this rank owns (with the all-gather exchange every rank sees every
  // token, so rank 0 alone counts them).
  if (profile_ != nullptr && (all_to_all || rank_ == 0))
    for (int64_t e = 0; e < n_experts; ++e)
      profile_->expert_tokens[layer * n_experts + e] += layout_.n_tokens_per_expert[e];
  const uint64_t row_bytes =
      static_cast<uint64_t>(config_.hidden_size) * dtype_size(ops_.storage_dtype());
  if (all_to_all) {
    // layout -> dispatch -> expert FFN -> combine, over this rank's expert group.
    Communicator& ep = *par_->ep;
    ep_layout(ep_plan_, layout_, ep, experts);
    lap(ForwardProfile::kRouter);
    if (profile_ != nullptr) {
      const int me = ep.rank();
      int64_t remote = 0;
      for (int p = 0; p < ep.size(); ++p)
        if (p != me) remote += ep_plan_.send_counts[p];
      profile_->bytes[ForwardProfile::kDispatchBytes] += remote * row_bytes;
      int64_t back = 0;
      for (int p = 0; p < ep.size(); ++p)
        if (p != me) back += ep_plan_.recv_counts[p];
      profile_->bytes[ForwardProfile::kCombineBytes] += back * row_bytes;
    }
    const int64_t n_recv = ep_plan_.n_recv;
    Tensor send = moe_send_.rows(0, n_rows);  // [n_rows, dim] expert order
    Tensor recv = moe_recv_.rows(0, n_recv);  // [n_recv, dim] by source
    Tensor in = moe_in_.rows(0, n_recv);      // [n_recv, dim] by expert
    Tensor y = moe_out_.rows(0, n_recv);      // [n_recv, dim] by expert
    ops_.gather_rows(send, xn, rows);
    ep_dispatch(ep, recv, send, ep_plan_);
    Tensor perm = perm_.rows(0, n_recv);  // [n_recv]
    ops_.copy_from_host(perm.data, ep_plan_.expert_order.data(), perm.bytes());
    ops_.gather_rows(in, recv, perm);
    lap(ForwardProfile::kDispatch);
    expert_ffn(ops_, y, in, L, ep_plan_.local_offsets.data(), expert_scratch_);
    lap(ForwardProfile::kExpert);
    ops_.copy_from_host(perm.data, ep_plan_.source_order.data(), perm.bytes());
    ops_.gather_rows(recv, y, perm);                      // back in received order
    ep_combine(ep, send, recv, ep_plan_);                 // [n_rows, dim] expert order
    ops_.scatter_add_weighted(out, send, rows, weights);  // combine
    lap(ForwardProfile::kCombine);
    return;
  }
  lap(ForwardProfile::kRouter);
  // Local experts only: their rows are contiguous in expert order (experts are placed in ranges).
  const int64_t first = layout_.expert_offsets[experts.front()];
  const int64_t n_local_rows = layout_.expert_offsets[experts.back() + 1] - first;
  for (size_t i = 0; i <= experts.size(); ++i)
    local_offsets_[i] = (i < experts.size() ? layout_.expert_offsets[experts[i]]
                                            : layout_.expert_offsets[experts.back() + 1]) -
                        first;
  Tensor local_rows = rows.rows(first, n_local_rows);  // [n_local_rows]
  Tensor in = moe_in_.rows(0, n_local_rows);           // [n_local_rows, dim]
  Tensor y = moe_out_.rows(0, n_local_rows);           // [n_local_rows, dim]
  ops_.gather_rows(in, xn, local_rows);                // dispatch (local)
  lap(ForwardProfile::kDispatch);
  expert_ffn(ops_, y, in, L, local_offsets_.data(), expert_scratch_);
  lap(ForwardProfile::kExpert);
  ops_.scatter_add_weighted(out, y, local_rows, weights.rows(first, n_local_rows));  // combine
  reduce_expert_partials(out);
  lap(ForwardProfile::kCombine);
}

// The MoE block with the layout made on the device (Ops::moe_route) and the experts' row ranges
// read from device memory: no copy to the host, so the step can be a graph. Every routed row is
// gathered (rows of other ranks' experts as zeros) and the grouped GEMMs compute only the rows of
// this rank's experts; the combine skips the others (row -1).
void Model::moe_block_on_device(int64_t layer, Tensor out, Tensor xn) {
  const LayerWeights& L = weights_.layers[static_cast<size_t>(layer)];
  const int64_t n_tokens = xn.size(0);
  const int64_t n_rows = n_tokens * config_.num_experts_per_tok;
  const int64_t n_experts = config_.num_local_experts;
  const std::vector<int64_t>& experts = weights_.shard.experts;
  Tensor rows = sorted_rows_.rows(0, n_rows);        // [n_rows] token, or -1
  Tensor weights = sorted_weights_.rows(0, n_rows);  // [n_rows]
  ops_.moe_route(rows, weights, expert_offsets_, topk_idx_.rows(0, n_tokens),
                 topk_weights_.rows(0, n_tokens), experts.front(), experts.back() + 1);
  if (profile_ != nullptr && rank_ == 0) {
    std::vector<int32_t> offsets(static_cast<size_t>(n_experts + 1));
    ops_.copy_to_host(offsets.data(), expert_offsets_.data, expert_offsets_.bytes());
    for (int64_t e = 0; e < n_experts; ++e)
      profile_->expert_tokens[layer * n_experts + e] += offsets[e + 1] - offsets[e];
  }
  lap(ForwardProfile::kRouter);
  Tensor in = moe_in_.rows(0, n_rows);  // [n_rows, dim] expert order
  Tensor y = moe_out_.rows(0, n_rows);  // [n_rows, dim]
  ops_.gather_rows(in, xn, rows);       // dispatch (local)
  lap(ForwardProfile::kDispatch);
  Tensor gate = expert_scratch_.gate.rows(0, n_rows);  // [n_rows, hidden_dim]
  Tensor up = expert_scratch_.up.rows(0, n_rows);      // [n_rows, hidden_dim]
  const size_t n_local = experts.size();
  ops_.grouped_matmul_offsets(gate, in, L.w1.data(), expert_offsets_, experts.front(), n_local);
  ops_.grouped_matmul_offsets(up, in, L.w3.data(), expert_offsets_, experts.front(), n_local);
  ops_.swiglu(gate, gate, up);  // also on rows of other experts: their values are never used
  ops_.grouped_matmul_offsets(y, gate, L.w2.data(), expert_offsets_, experts.front(), n_local);
  lap(ForwardProfile::kExpert);
  ops_.fill_zero(out);
  ops_.scatter_add_weighted(out, y, rows, weights);  // combine
  reduce_expert_partials(out);
  lap(ForwardProfile::kCombine);
}

}  // namespace sy
