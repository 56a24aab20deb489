// A step's sampling (see sampling.h).
#include "runtime/engine/sampling.h"

#include <algorithm>
#include <cmath>

namespace sy {

namespace {

template <typename T>
void append(std::vector<T>& to, const std::vector<T>& from) {
  to.insert(to.end(), from.begin(), from.end());
}

}  // namespace

void SamplePayload::build(const std::vector<SampleRequest>& rows, int64_t vocab_size) {
  const size_t n = rows.size();
  params.assign(n * Ops::kSampleParams, 0.f);  // greedy
  penalty_params.assign(n * Ops::kPenaltyParams, 0.f);
  bias_offsets.assign(1, 0);
  bias_ids.clear();
  bias_values.clear();
  penalty_offsets.assign(1, 0);
  penalty_ids.clear();
  penalty_counts.clear();
  forced.resize(n);
  logprob_rows.clear();
  top = 0;
  for (size_t i = 0; i < n; ++i) {
    const SampleRequest& r = rows[i];
    float* penalty = penalty_params.data() + i * Ops::kPenaltyParams;
    penalty[0] = 1.f;  // {1, 0, 0}: none
    if (Sampler* s = r.sampler) {
      s->device_params(params.data() + i * Ops::kSampleParams);
      s->penalty_params(penalty);
      if (s->penalised()) {
        SY_CHECK(r.context != nullptr, "sampling: a penalised row without its context");
        const PenaltyContext& pc = s->penalty_context(*r.context);
        append(penalty_ids, pc.ids);
        append(penalty_counts, pc.counts);
      }
      const BiasList& bias = s->bias_list(r.n_generated);
      append(bias_ids, bias.ids);
      append(bias_values, bias.values);
    }
    penalty_offsets.push_back(static_cast<int32_t>(penalty_ids.size()));
    bias_offsets.push_back(static_cast<int32_t>(bias_ids.size()));
    forced[i] = r.forced;
    if (r.logprobs > 0) {
      logprob_rows.push_back(static_cast<int32_t>(i));
      top = std::max(top, std::min(r.logprobs, vocab_size));
    }
  }
}

StepSampler::StepSampler(const Model& model)
    : ops_(model.ops()),
      vocab_(model.config().vocab_size),
      max_rows_(model.limits().max_logit_rows) {
  const ModelLimits& limits = model.limits();
  const int64_t seq_rows = std::min(limits.max_logit_rows, limits.max_seqs);
  penalty_capacity_ = seq_rows * std::min(vocab_, limits.max_blocks_per_seq * limits.block_size);
  bias_capacity_ = seq_rows * std::min(vocab_, kMaxBiasesPerRow);
  const int64_t R = max_rows_;
  auto carve = [&](Carver& c) {
    params_ = c.take(DType::kF32, {R, Ops::kSampleParams});
    ids_ = c.take(DType::kI32, {R});
    bias_offsets_ = c.take(DType::kI32, {R + 1});
    bias_ids_ = c.take(DType::kI32, {bias_capacity_});
    bias_values_ = c.take(DType::kF32, {bias_capacity_});
    penalty_offsets_ = c.take(DType::kI32, {R + 1});
    penalty_ids_ = c.take(DType::kI32, {penalty_capacity_});
    penalty_counts_ = c.take(DType::kI32, {penalty_capacity_});
    penalty_params_ = c.take(DType::kF32, {R * Ops::kPenaltyParams});
    logprob_rows_ = c.take(DType::kI32, {R});
    logprob_raw_ = c.take(DType::kF32, {R, vocab_});
    logprob_out_ = c.take(DType::kF32, {R * (1 + kMaxTopLogprobs)});
    logprob_ids_ = c.take(DType::kI32, {R * kMaxTopLogprobs});
  };
  Carver sizing(nullptr, ops_.device());
  carve(sizing);
  storage_ = DeviceBuffer(ops_, sizing.bytes());
  Carver placing(storage_.get(), ops_.device());
  carve(placing);
  host_logprobs_.resize(static_cast<size_t>(R * (1 + kMaxTopLogprobs)));
  host_logprob_ids_.resize(static_cast<size_t>(R * kMaxTopLogprobs));
  logprob_slot_.reserve(static_cast<size_t>(R));
  tokens_.reserve(static_cast<size_t>(R));
}

void StepSampler::sample(Model& model, const std::vector<SampleRequest>& rows, int32_t* ids) {
  payload_.build(rows, vocab_);
  run(model, payload_, ids);
}

void StepSampler::check(const SamplePayload& p) const {
  const int64_t n = p.n_rows();
  SY_CHECK(n <= max_rows_, "sampling: ", n, " rows; the limit is ", max_rows_);
  SY_CHECK(static_cast<int64_t>(p.params.size()) == n * Ops::kSampleParams &&
               static_cast<int64_t>(p.penalty_params.size()) == n * Ops::kPenaltyParams &&
               static_cast<int64_t>(p.bias_offsets.size()) == n + 1 &&
               static_cast<int64_t>(p.penalty_offsets.size()) == n + 1,
           "sampling: a payload of ", n, " rows with arrays of other sizes");
  SY_CHECK(p.bias_offsets[0] == 0 && p.penalty_offsets[0] == 0,
           "sampling: bias and penalty offsets must start at 0");
  SY_CHECK(
      p.bias_ids.size() == p.bias_values.size() && p.penalty_ids.size() == p.penalty_counts.size(),
      "sampling: ids and values (or counts) of different sizes");
  for (int64_t i = 0; i < n; ++i) {
    const int32_t b0 = p.bias_offsets[i], b1 = p.bias_offsets[i + 1];
    SY_CHECK(b0 <= b1 && b1 - b0 <= kMaxBiasesPerRow, "sampling: ", b1 - b0, " biases in row ", i,
             " (0 to ", kMaxBiasesPerRow, ")");
    for (int32_t j = b0; j < b1; ++j)
      SY_CHECK(p.bias_ids[j] >= 0 && p.bias_ids[j] < vocab_, "sampling: bias of token ",
               p.bias_ids[j], " in row ", i);
    SY_CHECK(p.penalty_offsets[i] <= p.penalty_offsets[i + 1],
             "sampling: penalty offsets decrease at row ", i);
    const float* q = p.penalty_params.data() + i * Ops::kPenaltyParams;
    SY_CHECK(std::isfinite(q[0]) && q[0] > 0.f, "sampling: repetition penalty ", q[0], " of row ",
             i, " must be positive");
    SY_CHECK(std::isfinite(q[1]) && std::isfinite(q[2]), "sampling: presence penalty ", q[1],
             " and frequency penalty ", q[2], " of row ", i, " must be finite");
    SY_CHECK(p.forced[i] >= -1 && p.forced[i] < vocab_, "sampling: forced token ", p.forced[i],
             " outside the vocabulary of ", vocab_);
  }
  SY_CHECK(p.bias_offsets[n] == static_cast<int32_t>(p.bias_ids.size()) &&
               p.penalty_offsets[n] == static_cast<int32_t>(p.penalty_ids.size()),
           "sampling: offsets that do not end at the ids' count");
  SY_CHECK(static_cast<int64_t>(p.bias_ids.size()) <= bias_capacity_,
           "sampling: ", p.bias_ids.size(), " biases; the limit is ", bias_capacity_);
  SY_CHECK(static_cast<int64_t>(p.penalty_ids.size()) <= penalty_capacity_,
           "sampling: ", p.penalty_ids.size(), " penalty ids; the limit is ", penalty_capacity_);
  const int64_t top_limit = std::min(kMaxTopLogprobs, vocab_);
  SY_CHECK(p.logprob_rows.empty() ? p.top == 0 : (p.top >= 1 && p.top <= top_limit),
           "sampling: top ", p.top, " logprobs outside [1, ", top_limit, "]");
  for (size_t j = 0; j < p.logprob_rows.size(); ++j)
    SY_CHECK(p.logprob_rows[j] >= 0 && p.logprob_rows[j] < n &&
                 (j == 0 || p.logprob_rows[j] > p.logprob_rows[j - 1]),
             "sampling: logprobs of logit row ", p.logprob_rows[j], " of ", n, " (rows increase)");
}

void StepSampler::run(Model& model, const SamplePayload& p, int32_t* ids) {
  check(p);
  const int64_t n = p.n_rows();
  const int64_t n_lp = static_cast<int64_t>(p.logprob_rows.size());
  Tensor logits = model.step_logits();  // [n, vocab]
  SY_CHECK(logits.size(0) == n, "sampling: ", n, " rows for a step of ", logits.size(0),
           " logit rows");
  top_ = p.top;
  logprob_slot_.assign(static_cast<size_t>(n), -1);
  if (n == 0) return;
  // The rows asked for logprobs, kept before any bias or penalty: the model's own distribution.
  Tensor lp_rows = logprob_rows_.rows(0, n_lp);
  Tensor lp_raw = logprob_raw_.rows(0, n_lp);
  if (n_lp > 0) {
    ops_.copy_from_host(lp_rows.data, p.logprob_rows.data(), lp_rows.bytes());
    ops_.gather_rows(lp_raw, logits, lp_rows);
  }
  if (!p.bias_ids.empty()) apply_biases(p, logits);
  if (!p.penalty_ids.empty()) apply_penalties(p, logits);
  Tensor params = params_.rows(0, n);
  ops_.copy_from_host(params.data, p.params.data(), params.bytes());
  Tensor sampled = ids_.rows(0, n);
  ops_.sample(sampled, logits, params);
  overwrite_forced(p, sampled);
  if (n_lp > 0) {
    const Tensor out(logprob_out_.data, DType::kF32, {n_lp, top_ + 1}, ops_.device());
    const Tensor out_ids(logprob_ids_.data, DType::kI32, {n_lp, top_}, ops_.device());
    ops_.logprobs(out, out_ids, lp_raw, lp_rows, sampled);
    ops_.copy_to_host(host_logprobs_.data(), out.data, out.bytes());
    ops_.copy_to_host(host_logprob_ids_.data(), out_ids.data, out_ids.bytes());
    for (int64_t j = 0; j < n_lp; ++j) logprob_slot_[p.logprob_rows[j]] = j;
  }
  ops_.copy_to_host(ids, sampled.data, static_cast<size_t>(n) * sizeof(int32_t));
  tokens_.assign(ids, ids + n);
}

// The first host.size() entries of `buffer`, holding `host` (uploaded).
template <typename T>
Tensor StepSampler::upload(Tensor buffer, const std::vector<T>& host) {
  Tensor t = buffer.rows(0, static_cast<int64_t>(host.size()));
  ops_.copy_from_host(t.data, host.data(), t.bytes());
  return t;
}

void StepSampler::apply_biases(const SamplePayload& p, Tensor logits) {
  ops_.bias(logits, upload(bias_offsets_, p.bias_offsets), upload(bias_ids_, p.bias_ids),
            upload(bias_values_, p.bias_values));
}

void StepSampler::apply_penalties(const SamplePayload& p, Tensor logits) {
  ops_.penalize(
      logits, upload(penalty_offsets_, p.penalty_offsets), upload(penalty_ids_, p.penalty_ids),
      upload(penalty_counts_, p.penalty_counts),
      upload(penalty_params_, p.penalty_params).reshape({p.n_rows(), Ops::kPenaltyParams}));
}

// Forced rows take their given token: one copy per run of consecutive forced rows.
void StepSampler::overwrite_forced(const SamplePayload& p, Tensor sampled) {
  const int64_t n = p.n_rows();
  for (int64_t i = 0; i < n;) {
    if (p.forced[i] < 0) {
      ++i;
      continue;
    }
    int64_t e = i + 1;
    while (e < n && p.forced[e] >= 0) ++e;
    ops_.copy_from_host(sampled.rows(i, e - i).data, p.forced.data() + i,
                        static_cast<size_t>(e - i) * sizeof(int32_t));
    i = e;
  }
}

TokenLogprobs StepSampler::logprobs(int64_t row, int64_t top) const {
  SY_CHECK(row >= 0 && row < static_cast<int64_t>(logprob_slot_.size()) &&
               logprob_slot_[row] >= 0 && top >= 1 && top <= top_,
           "sampling: no top ", top, " logprobs of row ", row);
  const int64_t slot = logprob_slot_[row];
  const float* lp = host_logprobs_.data() + slot * (1 + top_);
  const int32_t* top_ids = host_logprob_ids_.data() + slot * top_;
  TokenLogprobs t;
  t.token_id = tokens_[static_cast<size_t>(row)];
  t.logprob = lp[0];
  for (int64_t k = 0; k < top; ++k) t.top.push_back({top_ids[k], lp[1 + k]});
  return t;
}

}  // namespace sy
