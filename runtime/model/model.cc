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

int32_t StepBatch::add_sequence(const int32_t* seq_tokens, int64_t begin, int64_t end,
                                const int32_t* blocks, int64_t n_blocks, int64_t table_width,
                                bool logits) {
  const int32_t row = static_cast<int32_t>(n_seqs++);
  for (int64_t p = begin; p < end; ++p) {
    tokens.push_back(seq_tokens[p]);
    positions.push_back(static_cast<int32_t>(p));
    token_seq.push_back(row);
  }
  block_tables.insert(block_tables.end(), blocks, blocks + n_blocks);
  block_tables.resize(block_tables.size() + static_cast<size_t>(table_width - n_blocks), 0);
  if (logits) logit_rows.push_back(static_cast<int32_t>(tokens.size() - 1));
  return row;
}

const char* ForwardProfile::phase_name(int phase) {
  static const char* names[] = {"attention", "router", "dispatch", "expert", "combine", "other"};
  return names[phase];
}

const char* ForwardProfile::traffic_name(int traffic) {
  static const char* names[] = {"tp_reduce", "dispatch",     "combine",      "residual_gather",
                                "ep_reduce", "embed_reduce", "logits_gather"};
  return names[traffic];
}

MoeCounters Model::take_moe_counters() {
  const int64_t n = config_.num_hidden_layers * config_.num_local_experts;
  std::vector<int32_t> device(static_cast<size_t>(n));
  ops_.copy_to_host(device.data(), routed_counts_.data, routed_counts_.bytes());
  ops_.fill_zero(routed_counts_);
  MoeCounters out = moe_counters_;
  for (int64_t i = 0; i < n; ++i)
    out.expert_tokens[static_cast<size_t>(i)] += device[static_cast<size_t>(i)];
  moe_counters_.reset();
  return out;
}

void MoeCounters::reset() {
  std::fill(expert_tokens.begin(), expert_tokens.end(), 0);
  dispatch_bytes = combine_bytes = 0;
  dispatch_seconds = combine_seconds = 0;
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
  moe_counters_.expert_tokens.assign(
      static_cast<size_t>(config_.num_hidden_layers * config_.num_local_experts), 0);
  if (par_ != nullptr) {
    par_->config.validate(config_.layout_shape());
    world_ = par_->config.world;
    rank_ = par_->config.rank;
    // Host staging (and MPI on the CPU) copies and waits inside collectives: such steps run
    // eagerly. Stream-ordered device communicators (NCCL on the compute stream) record.
    graph_collectives_ = world_ == 1 || (par_->world->stream_ordered() &&
                                         par_->tp->stream_ordered() && par_->ep->stream_ordered());
  }
  Carver sizing(nullptr, ops_.device());
  carve_state(sizing);
  state_storage_ = DeviceBuffer(ops_, sizing.bytes());
  Carver placing(state_storage_.get(), ops_.device());
  carve_state(placing);
  ops_.fill_zero(routed_counts_);
  allocate_kv_cache();
  // Small steps (decode) route on the device when the backend is a GPU; larger ones (prefill)
  // take the host layout and the cuBLAS grouped GEMM, whose row counts come from the host.
  if (ops_.device() != Device::kCpu) device_route_max_rows_ = kDeviceRouteMaxRows;
  reserve_host_scratch();
}

void Model::carve_state(Carver& c) {
  const int64_t N = limits_.max_tokens;
  const int64_t R = limits_.max_logit_rows;
  const int64_t dim = config_.hidden_size;
  const int64_t head_dim = config_.head_dim;
  const int64_t n_heads = weights_.shard.n_heads;
  const int64_t n_kv_heads = weights_.shard.n_kv_heads;
  const int64_t k = config_.num_experts_per_tok;
  const int64_t n_experts = config_.num_local_experts;
  const int64_t hidden_dim = config_.intermediate_size;
  const int64_t vocab = config_.vocab_size;
  const DType S = ops_.storage_dtype();  // GEMM inputs (ops.h)
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
  routed_counts_ = c.take(DType::kI32, {config_.num_hidden_layers * n_experts});
  expert_scratch_.gate = c.take(S, {N * k, hidden_dim});
  expert_scratch_.up = c.take(S, {N * k, hidden_dim});
  ids_ = c.take(DType::kI32, {N});
  positions_ = c.take(DType::kI32, {N});
  token_seq_ = c.take(DType::kI32, {N});
  block_tables_ = c.take(DType::kI32, {limits_.max_seqs, limits_.max_blocks_per_seq});
  logit_rows_ = c.take(DType::kI32, {R});
  logit_x_ = c.take(DType::kF32, {R, dim});
  logit_xn_ = c.take(S, {R, dim});
  logits_ = c.take(DType::kF32, {R, weights_.shard.n_vocab});
  const int64_t parallel_rows = world_ > 1 ? R : 0;
  logits_all_ = c.take(DType::kF32, {parallel_rows * vocab});
  logits_full_ = c.take(DType::kF32, {parallel_rows, vocab});
  logits_perm_ = c.take(DType::kI32, {parallel_rows * world_});
}

void Model::allocate_kv_cache() {
  const DType S = ops_.storage_dtype();
  const int64_t n_layers = config_.num_hidden_layers;
  const std::initializer_list<int64_t> dims = {limits_.n_blocks, limits_.block_size,
                                               weights_.shard.n_kv_heads, config_.head_dim};
  const Tensor shape(nullptr, S, dims, ops_.device());
  const size_t layer_bytes = shape.bytes();
  kv_storage_ = DeviceBuffer(ops_, 2 * static_cast<size_t>(n_layers) * layer_bytes);
  char* kv = static_cast<char*>(kv_storage_.get());
  for (int64_t l = 0; l < n_layers; ++l) {
    k_cache_.emplace_back(kv + (2 * l) * layer_bytes, S, dims, ops_.device());
    v_cache_.emplace_back(kv + (2 * l + 1) * layer_bytes, S, dims, ops_.device());
  }
}

void Model::reserve_host_scratch() {
  const int64_t N = limits_.max_tokens;
  const int64_t R = limits_.max_logit_rows;
  const int64_t k = config_.num_experts_per_tok;
  const int64_t n_experts = config_.num_local_experts;
  graph_seen_.assign(static_cast<size_t>((limits_.max_seqs + 1) * (R + 1)), 0);
  layout_.reserve(N, k, n_experts);
  host_topk_idx_.resize(static_cast<size_t>(N * k));
  host_topk_weights_.resize(static_cast<size_t>(N * k));
  local_offsets_.resize(weights_.shard.experts.size() + 1);
  if (par_ != nullptr) {
    ep_plan_.reserve(par_->ep->size(), n_experts, N * k, weights_.shard.experts.size());
    host_logits_.resize(static_cast<size_t>(R * config_.vocab_size));
    host_blocks_.resize(host_logits_.size());
  }
}

void Model::forward(const StepBatch& batch) {
  run_step(batch);
  step_rows_ = static_cast<int64_t>(batch.logit_rows.size());
  if (world_ > 1 && step_rows_ > 0) logits_gather(step_rows_);
  lap(ForwardProfile::kOther);
}

void Model::forward(const StepBatch& batch, float* logits) {
  forward(batch);
  if (logits != nullptr) copy_logits(logits);
}

Tensor Model::step_logits() {
  const int64_t n = step_rows_;
  const int64_t vocab = config_.vocab_size;
  if (world_ == 1) return logits_.rows(0, n);
  Tensor full = logits_full_.rows(0, n);  // [n, vocab]
  if (n == 0) return full;
  if (vocab % world_ != 0) {  // blocks of unequal widths: interleaved on the host
    copy_logits(host_logits_.data());
    ops_.copy_from_host(full.data, host_logits_.data(), full.bytes());
    return full;
  }
  // Block r of the gather holds rank r's columns of every row, [n, width]: row i of the full
  // logits is, as world_ rows of width columns, rows r * n + i (r = 0 ..). The permutation
  // depends on n alone: uploaded when it changes (decode steps of one batch size reuse it).
  const int64_t width = vocab / world_;
  Tensor perm = logits_perm_.rows(0, n * world_);
  if (perm_rows_ != n) {
    host_perm_.resize(static_cast<size_t>(n * world_));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t r = 0; r < world_; ++r)
        host_perm_[static_cast<size_t>(i * world_ + r)] = static_cast<int32_t>(r * n + i);
    ops_.copy_from_host(perm.data, host_perm_.data(), perm.bytes());
    perm_rows_ = n;
  }
  const Tensor all = logits_all_.rows(0, n * vocab);
  ops_.gather_rows(full.reshape({n * world_, width}), all.reshape({world_ * n, width}), perm);
  return full;
}

void Model::copy_logits(float* out) {
  const int64_t n = step_rows_;
  const int64_t vocab = config_.vocab_size;
  if (n == 0) return;
  if (world_ == 1) {
    ops_.copy_to_host(out, logits_.data, static_cast<size_t>(n * vocab) * sizeof(float));
    return;
  }
  // Vocabulary-parallel: every rank's [n, width_r] block, in rank order, interleaved.
  ops_.copy_to_host(host_blocks_.data(), logits_all_.data,
                    static_cast<size_t>(n * vocab) * sizeof(float));
  const float* block = host_blocks_.data();
  for (int r = 0; r < world_; ++r) {
    const int64_t begin = split_begin(vocab, world_, r);
    const int64_t width = split_count(vocab, world_, r);
    for (int64_t i = 0; i < n; ++i) std::copy_n(block + i * width, width, out + i * vocab + begin);
    block += n * width;
  }
}

void Model::check_batch(const StepBatch& batch) const {
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
}

AttentionMeta Model::upload_inputs(const StepBatch& batch) {
  const int64_t n_tokens = batch.n_tokens();
  const size_t bytes = static_cast<size_t>(n_tokens) * sizeof(int32_t);
  ops_.copy_from_host(ids_.data, batch.tokens.data(), bytes);
  ops_.copy_from_host(positions_.data, batch.positions.data(), bytes);
  ops_.copy_from_host(token_seq_.data, batch.token_seq.data(), bytes);
  ops_.copy_from_host(block_tables_.data, batch.block_tables.data(),
                      batch.block_tables.size() * sizeof(int32_t));
  if (!batch.logit_rows.empty())
    ops_.copy_from_host(logit_rows_.data, batch.logit_rows.data(),
                        batch.logit_rows.size() * sizeof(int32_t));
  AttentionMeta meta;
  meta.positions = positions_.rows(0, n_tokens);
  meta.token_seq = token_seq_.rows(0, n_tokens);
  meta.block_tables = block_tables_.rows(0, batch.n_seqs);
  meta.block_size = limits_.block_size;
  meta.sliding_window = config_.sliding_window;
  return meta;
}

void Model::run_step(const StepBatch& batch) {
  ops_.make_current();
  check_batch(batch);
  const AttentionMeta meta = upload_inputs(batch);
  const int64_t n_tokens = batch.n_tokens();
  const bool all_to_all =
      par_ != nullptr &&
      par_->config.step_exchange(n_tokens * config_.num_experts_per_tok) == MoeExchange::kAllToAll;
  // Tokens this rank owns in the MoE block (all of them on one rank or with the all-gather
  // exchange); the residual stream is replicated again by an all-gather after each layer.
  token_counts(n_tokens, all_to_all ? world_ : 1, token_counts_);
  if (profile_ != nullptr) {
    mark_ = std::chrono::steady_clock::now();
    ++profile_->steps;
    profile_->tokens += n_tokens;
  }
  run_or_replay(batch, all_to_all, [&] { run_layers(batch, meta, all_to_all); });
}

// Every op of the step from the embedding to the logits.
void Model::run_layers(const StepBatch& batch, const AttentionMeta& meta, bool all_to_all) {
  const int64_t n_tokens = batch.n_tokens();
  const uint64_t row_bytes = static_cast<uint64_t>(config_.hidden_size) * sizeof(float);
  Tensor x = x_.rows(0, n_tokens);  // [n_tokens, dim]
  ops_.embedding(x, ids_.rows(0, n_tokens), weights_.embed, weights_.shard.vocab_begin);
  if (world_ > 1) {
    par_->world->all_reduce_sum(x);  // vocabulary-parallel rows
    if (profile_ != nullptr)
      profile_->bytes[ForwardProfile::kEmbed] += 2 * n_tokens * row_bytes * (world_ - 1) / world_;
  }
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    lap(ForwardProfile::kOther);
    if (all_to_all)
      sequence_parallel_layer(l, n_tokens, meta);
    else
      replicated_layer(l, n_tokens, meta);
  }
  logits_compute(static_cast<int64_t>(batch.logit_rows.size()), n_tokens);
}

void Model::replicated_layer(int64_t l, int64_t n_tokens, const AttentionMeta& meta) {
  const LayerWeights& L = weights_.layers[static_cast<size_t>(l)];
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const int tp = par_ != nullptr ? par_->config.tp : 1;
  const uint64_t row_bytes = static_cast<uint64_t>(config_.hidden_size) * sizeof(float);
  Tensor x = x_.rows(0, n_tokens);    // [n_tokens, dim]
  Tensor xn = xn_.rows(0, n_tokens);  // [n_tokens, dim]
  Tensor o = o_.rows(0, n_tokens);    // [n_tokens, dim]
  ops_.rmsnorm(xn, x, L.input_norm, eps);
  attention_block(l, n_tokens, meta);  // o = partial attn(xn)
  if (tp > 1) {
    par_->tp->all_reduce_sum(o);
    if (profile_ != nullptr)
      profile_->bytes[ForwardProfile::kTpReduce] += 2 * n_tokens * row_bytes * (tp - 1) / tp;
  }
  lap(ForwardProfile::kAttention);
  ops_.add(x, x, o);  // residual
  ops_.rmsnorm(xn, x, L.post_norm, eps);
  moe_block(l, o, xn, x, false);  // o = moe(xn)
  ops_.add(x, x, o);              // residual
}

void Model::sequence_parallel_layer(int64_t l, int64_t n_tokens, const AttentionMeta& meta) {
  const LayerWeights& L = weights_.layers[static_cast<size_t>(l)];
  const float eps = static_cast<float>(config_.rms_norm_eps);
  const int tp = par_->config.tp;
  const uint64_t row_bytes = static_cast<uint64_t>(config_.hidden_size) * sizeof(float);
  const int64_t own_begin = split_begin(n_tokens, world_, rank_);
  const int64_t n_own = token_counts_[rank_];
  Tensor x = x_.rows(0, n_tokens);         // [n_tokens, dim]
  Tensor o = o_.rows(0, n_tokens);         // [n_tokens, dim]
  Tensor x_own = x_own_.rows(0, n_own);    // [n_own, dim]
  Tensor xn_own = xn_own_.rows(0, n_own);  // [n_own, dim]
  Tensor y_own = y_own_.rows(0, n_own);    // [n_own, dim]
  ops_.rmsnorm(xn_.rows(0, n_tokens), x, L.input_norm, eps);
  attention_block(l, n_tokens, meta);  // o = partial attn(xn)
  // This rank's tokens, summed over its attention group.
  if (tp > 1) {
    const int first = par_->config.tp_group() * tp;
    tp_counts_.assign(token_counts_.begin() + first, token_counts_.begin() + first + tp);
    int64_t group_rows = 0;
    for (int64_t c : tp_counts_) group_rows += c;
    par_->tp->reduce_scatter_sum(y_own, o.rows(split_begin(n_tokens, world_, first), group_rows),
                                 tp_counts_);  // [n_own, dim]
    if (profile_ != nullptr)
      profile_->bytes[ForwardProfile::kTpReduce] += (group_rows - n_own) * row_bytes;
    ops_.add(x_own, x.rows(own_begin, n_own), y_own);  // residual
  } else {
    ops_.add(x_own, x.rows(own_begin, n_own), o.rows(own_begin, n_own));
  }
  lap(ForwardProfile::kAttention);
  ops_.rmsnorm(xn_own, x_own, L.post_norm, eps);
  moe_block(l, y_own, xn_own, x_own, true);          // y = moe(xn), all-to-all
  ops_.add(x_own, x_own, y_own);                     // residual
  par_->world->all_gather(x, x_own, token_counts_);  // [n_tokens, dim] everywhere
  if (profile_ != nullptr)
    profile_->bytes[ForwardProfile::kResidualGather] += n_own * row_bytes * (world_ - 1);
}

// Pure-decode steps (device routing, so no all-to-all; one rank or stream-ordered collectives;
// no profile) record into a graph that later steps of the same shape replay.
void Model::run_or_replay(const StepBatch& batch, bool all_to_all,
                          const std::function<void()>& step) {
  const int64_t n_tokens = batch.n_tokens();
  const int64_t n_logits = static_cast<int64_t>(batch.logit_rows.size());
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

void Model::logits_gather(int64_t n_logits) {
  const int64_t n_vocab = weights_.shard.n_vocab;
  const int64_t vocab = config_.vocab_size;
  Tensor lg = logits_.rows(0, n_logits);  // [n_logits, n_vocab]
  vocab_counts_.resize(static_cast<size_t>(world_));
  for (int r = 0; r < world_; ++r) vocab_counts_[r] = n_logits * split_count(vocab, world_, r);
  if (profile_ != nullptr)
    profile_->bytes[ForwardProfile::kLogits] += lg.bytes() * static_cast<uint64_t>(world_ - 1);
  Tensor all = logits_all_.rows(0, n_logits * vocab).reshape({n_logits * vocab, 1});
  par_->world->all_gather(all, lg.reshape({n_logits * n_vocab, 1}), vocab_counts_);
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

}  // namespace sy
