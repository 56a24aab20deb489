// Default implementations of the ops interface (see ops.h).
#include "kernels/ops.h"

#include "kernels/cpu/ops.h"

#include <vector>

namespace sy {

void Ops::grouped_matmul(Tensor out, Tensor x, const Tensor* w, const int64_t* offsets,
                         size_t n_groups) {
  SY_CHECK(x.ndim == 2 && out.ndim == 2 && x.size(0) == out.size(0), "grouped_matmul: x ",
           x.shape_str(), ", out ", out.shape_str());
  SY_CHECK(offsets[0] >= 0 && offsets[n_groups] <= x.size(0), "grouped_matmul: rows [", offsets[0],
           ", ", offsets[n_groups], ") outside ", x.size(0));
  for (size_t g = 0; g < n_groups; ++g) {
    const int64_t n = offsets[g + 1] - offsets[g];
    SY_CHECK(n >= 0, "grouped_matmul: offsets decrease at group ", g);
    if (n > 0) matmul(out.rows(offsets[g], n), x.rows(offsets[g], n), w[g]);
  }
}

void check_moe_route(const Tensor& sorted_rows, const Tensor& sorted_weights, const Tensor& offsets,
                     const Tensor& topk_idx, const Tensor& topk_weights, int64_t expert_begin,
                     int64_t expert_end) {
  const int64_t n_tokens = topk_idx.size(0);
  const int64_t k = topk_idx.size(1);
  const int64_t n_rows = n_tokens * k;
  const int64_t n_experts = offsets.size(0) - 1;
  check_tensor(topk_idx, "moe_route.topk_idx", DType::kI32, {n_tokens, k});
  check_tensor(topk_weights, "moe_route.topk_weights", DType::kF32, {n_tokens, k});
  check_tensor(sorted_rows, "moe_route.sorted_rows", DType::kI32, {n_rows});
  check_tensor(sorted_weights, "moe_route.sorted_weights", DType::kF32, {n_rows});
  check_tensor(offsets, "moe_route.offsets", DType::kI32, {n_experts + 1});
  SY_CHECK(n_experts >= 1 && n_experts <= 4096 && 0 <= expert_begin && expert_begin <= expert_end &&
               expert_end <= n_experts,
           "moe_route: experts [", expert_begin, ", ", expert_end, ") of ", n_experts);
}

void check_sample(const Tensor& out_ids, const Tensor& logits, const Tensor& params) {
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  check_tensor(logits, "sample.logits", DType::kF32, {n, vocab});
  check_tensor(params, "sample.params", DType::kF32, {n, Ops::kSampleParams});
  check_tensor(out_ids, "sample.out_ids", DType::kI32, {n});
  SY_CHECK(vocab > 0 && vocab < (int64_t{1} << 31), "sample: vocabulary of ", vocab);
}

void check_penalize(const Tensor& logits, const Tensor& offsets, const Tensor& ids,
                    const Tensor& counts, const Tensor& params) {
  const int64_t n = logits.size(0);
  check_tensor(logits, "penalize.logits", DType::kF32, {n, -1});
  check_tensor(offsets, "penalize.offsets", DType::kI32, {n + 1});
  check_tensor(ids, "penalize.ids", DType::kI32, {-1});
  check_tensor(counts, "penalize.counts", DType::kI32, {ids.size(0)});
  check_tensor(params, "penalize.params", DType::kF32, {n, Ops::kPenaltyParams});
  SY_CHECK(ids.size(0) < (int64_t{1} << 31), "penalize: ", ids.size(0), " ids");
}

void check_bias(const Tensor& logits, const Tensor& offsets, const Tensor& ids,
                const Tensor& values) {
  const int64_t n = logits.size(0);
  check_tensor(logits, "bias.logits", DType::kF32, {n, -1});
  check_tensor(offsets, "bias.offsets", DType::kI32, {n + 1});
  check_tensor(ids, "bias.ids", DType::kI32, {-1});
  check_tensor(values, "bias.values", DType::kF32, {ids.size(0)});
  SY_CHECK(ids.size(0) < (int64_t{1} << 31), "bias: ", ids.size(0), " ids");
}

void check_logprobs(const Tensor& out_logprobs, const Tensor& out_ids, const Tensor& logits,
                    const Tensor& rows, const Tensor& chosen) {
  const int64_t m = logits.size(0);
  const int64_t vocab = logits.size(1);
  const int64_t top = out_ids.size(1);
  check_tensor(logits, "logprobs.logits", DType::kF32, {m, vocab});
  check_tensor(out_ids, "logprobs.out_ids", DType::kI32, {m, top});
  check_tensor(out_logprobs, "logprobs.out_logprobs", DType::kF32, {m, top + 1});
  check_tensor(rows, "logprobs.rows", DType::kI32, {m});
  check_tensor(chosen, "logprobs.chosen", DType::kI32, {-1});
  SY_CHECK(vocab > 0 && vocab < (int64_t{1} << 31) && top >= 1 && top <= vocab, "logprobs: top ",
           top, " of a vocabulary of ", vocab);
}

void check_count_routed(const Tensor& counts, const Tensor& offsets) {
  check_tensor(counts, "count_routed.counts", DType::kI32, {-1});
  check_tensor(offsets, "count_routed.offsets", DType::kI32, {counts.size(0) + 1});
}

void Ops::count_routed(Tensor counts, Tensor offsets) {
  check_count_routed(counts, offsets);
  const int64_t n = counts.size(0);
  std::vector<int32_t> c(static_cast<size_t>(n)), o(static_cast<size_t>(n + 1));
  copy_to_host(c.data(), counts.data, counts.bytes());
  copy_to_host(o.data(), offsets.data, offsets.bytes());
  for (int64_t e = 0; e < n; ++e)
    c[static_cast<size_t>(e)] += o[static_cast<size_t>(e + 1)] - o[static_cast<size_t>(e)];
  copy_from_host(counts.data, c.data(), counts.bytes());
}

void Ops::moe_route(Tensor sorted_rows, Tensor sorted_weights, Tensor offsets, Tensor topk_idx,
                    Tensor topk_weights, int64_t expert_begin, int64_t expert_end) {
  check_moe_route(sorted_rows, sorted_weights, offsets, topk_idx, topk_weights, expert_begin,
                  expert_end);
  const int64_t k = topk_idx.size(1);
  const int64_t n_rows = topk_idx.size(0) * k;
  const int64_t n_experts = offsets.size(0) - 1;
  std::vector<int32_t> idx(static_cast<size_t>(n_rows)), rows(static_cast<size_t>(n_rows));
  std::vector<float> w(static_cast<size_t>(n_rows)), sw(static_cast<size_t>(n_rows));
  std::vector<int32_t> off(static_cast<size_t>(n_experts + 1), 0);
  copy_to_host(idx.data(), topk_idx.data, topk_idx.bytes());
  copy_to_host(w.data(), topk_weights.data, topk_weights.bytes());
  for (int32_t e : idx) {
    SY_CHECK(e >= 0 && e < n_experts, "moe_route: expert id ", e, " outside [0, ", n_experts, ")");
    ++off[static_cast<size_t>(e) + 1];
  }
  for (int64_t e = 0; e < n_experts; ++e) off[e + 1] += off[e];
  std::vector<int32_t> cursor(off.begin(), off.end() - 1);
  for (int64_t i = 0; i < n_rows; ++i) {  // token-major: stable in token order
    const int32_t e = idx[i];
    const int32_t r = cursor[e]++;
    const bool here = e >= expert_begin && e < expert_end;
    rows[r] = here ? static_cast<int32_t>(i / k) : -1;
    sw[r] = here ? w[i] : 0.f;
  }
  copy_from_host(sorted_rows.data, rows.data(), sorted_rows.bytes());
  copy_from_host(sorted_weights.data, sw.data(), sorted_weights.bytes());
  copy_from_host(offsets.data, off.data(), offsets.bytes());
  synchronize();  // the host vectors go out of scope
}

void Ops::grouped_matmul_offsets(Tensor out, Tensor x, const Tensor* w, Tensor offsets,
                                 int64_t first, size_t n_groups) {
  SY_CHECK(offsets.dtype == DType::kI32 && offsets.ndim == 1 && first >= 0 &&
               first + static_cast<int64_t>(n_groups) < offsets.size(0),
           "grouped_matmul_offsets: groups [", first, ", ", first + static_cast<int64_t>(n_groups),
           ") of offsets ", offsets.shape_str());
  std::vector<int32_t> off(n_groups + 1);
  copy_to_host(off.data(), static_cast<int32_t*>(offsets.data) + first, off.size() * 4);
  std::vector<int64_t> off64(off.begin(), off.end());
  grouped_matmul(out, x, w, off64.data(), n_groups);
}

void Ops::sample(Tensor out_ids, Tensor logits, Tensor params) {
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  check_sample(out_ids, logits, params);
  std::vector<float> rows(static_cast<size_t>(n * vocab)),
      p(static_cast<size_t>(n * kSampleParams));
  std::vector<int32_t> ids(static_cast<size_t>(n)), order;
  copy_to_host(rows.data(), logits.data, logits.bytes());
  copy_to_host(p.data(), params.data, params.bytes());
  for (int64_t r = 0; r < n; ++r) {
    const float* q = p.data() + r * kSampleParams;
    ids[r] = cpu::sample_row(rows.data() + r * vocab, vocab, q[0], static_cast<int64_t>(q[1]), q[2],
                             q[3], static_cast<double>(q[4]) + static_cast<double>(q[5]), order);
  }
  copy_from_host(out_ids.data, ids.data(), out_ids.bytes());
  synchronize();
}

void Ops::logprobs(Tensor out_logprobs, Tensor out_ids, Tensor logits, Tensor rows, Tensor chosen) {
  check_logprobs(out_logprobs, out_ids, logits, rows, chosen);
  const int64_t m = logits.size(0);
  const int64_t vocab = logits.size(1);
  const int64_t top = out_ids.size(1);
  const int64_t n = chosen.size(0);
  std::vector<float> l(static_cast<size_t>(m * vocab)), lp(static_cast<size_t>(m * (top + 1)));
  std::vector<int32_t> r(static_cast<size_t>(m)), c(static_cast<size_t>(n)),
      ids(static_cast<size_t>(m * top)), order;
  copy_to_host(l.data(), logits.data, logits.bytes());
  copy_to_host(r.data(), rows.data, rows.bytes());
  copy_to_host(c.data(), chosen.data, chosen.bytes());
  for (int64_t j = 0; j < m; ++j) {
    SY_CHECK(r[j] >= 0 && r[j] < n, "logprobs: row ", r[j], " of ", n, " sampled tokens");
    const int32_t token = c[r[j]];
    SY_CHECK(token >= 0 && token < vocab, "logprobs: token ", token, " of a vocabulary of ", vocab);
    cpu::logprobs_row(l.data() + j * vocab, vocab, token, top, lp.data() + j * (top + 1),
                      ids.data() + j * top, order);
  }
  copy_from_host(out_logprobs.data, lp.data(), out_logprobs.bytes());
  copy_from_host(out_ids.data, ids.data(), out_ids.bytes());
  synchronize();
}

// The per-row offsets of a list op (penalize, bias) on the host: n + 1 of them, from 0,
// non-decreasing, to at most the list's m ids; throws naming `op` otherwise.
static std::vector<int32_t> host_offsets(Ops& ops, const Tensor& offsets, int64_t n, int64_t m,
                                         const char* op) {
  std::vector<int32_t> off(static_cast<size_t>(n + 1));
  ops.copy_to_host(off.data(), offsets.data, offsets.bytes());
  SY_CHECK(off[0] == 0 && off[n] <= m, op, ": offsets run from ", off[0], " to ", off[n], " over ",
           m, " ids");
  for (int64_t i = 0; i < n; ++i)
    SY_CHECK(off[i] <= off[i + 1], op, ": offsets decrease at row ", i);
  return off;
}

void Ops::penalize(Tensor logits, Tensor offsets, Tensor ids, Tensor counts, Tensor params) {
  check_penalize(logits, offsets, ids, counts, params);
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  const int64_t m = ids.size(0);
  const int64_t P = kPenaltyParams;
  const std::vector<int32_t> off = host_offsets(*this, offsets, n, m, "penalize");
  if (m == 0) return;
  std::vector<float> rows(static_cast<size_t>(n * vocab)), p(static_cast<size_t>(n * P));
  std::vector<int32_t> id(static_cast<size_t>(m)), count(static_cast<size_t>(m));
  copy_to_host(rows.data(), logits.data, logits.bytes());
  copy_to_host(id.data(), ids.data, ids.bytes());
  copy_to_host(count.data(), counts.data, counts.bytes());
  copy_to_host(p.data(), params.data, params.bytes());
  for (int64_t i = 0; i < n; ++i)
    cpu::penalize_row(rows.data() + i * vocab, vocab, id.data() + off[i], count.data() + off[i],
                      off[i + 1] - off[i], p[i * P], p[i * P + 1], p[i * P + 2]);
  copy_from_host(logits.data, rows.data(), logits.bytes());
  synchronize();
}

void Ops::bias(Tensor logits, Tensor offsets, Tensor ids, Tensor values) {
  check_bias(logits, offsets, ids, values);
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  const int64_t m = ids.size(0);
  const std::vector<int32_t> off = host_offsets(*this, offsets, n, m, "bias");
  if (m == 0) return;
  std::vector<int32_t> id(static_cast<size_t>(m));
  std::vector<float> rows(static_cast<size_t>(n * vocab)), value(static_cast<size_t>(m));
  copy_to_host(rows.data(), logits.data, logits.bytes());
  copy_to_host(id.data(), ids.data, ids.bytes());
  copy_to_host(value.data(), values.data, values.bytes());
  for (int64_t i = 0; i < n; ++i)
    cpu::bias_row(rows.data() + i * vocab, vocab, id.data() + off[i], value.data() + off[i],
                  off[i + 1] - off[i]);
  copy_from_host(logits.data, rows.data(), logits.bytes());
  synchronize();
}

}  // namespace sy
