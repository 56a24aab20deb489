// Rank layout (see layout.h).
#include "parallel/layout.h"

#include <sstream>

#include "kernels/error.h"

namespace sy {

const char* moe_exchange_name(MoeExchange exchange) {
  switch (exchange) {
    case MoeExchange::kAllToAll:
      return "all-to-all";
    case MoeExchange::kAllGather:
      return "all-gather";
    default:
      return "auto";
  }
}

MoeExchange ParallelConfig::step_exchange(int64_t n_routed_rows) const {
  if (exchange != MoeExchange::kAuto) return exchange;
  return n_routed_rows <= auto_max_routed_rows ? MoeExchange::kAllGather : MoeExchange::kAllToAll;
}

MoeExchange parse_moe_exchange(const std::string& name) {
  if (name == "all-to-all") return MoeExchange::kAllToAll;
  if (name == "all-gather") return MoeExchange::kAllGather;
  if (name == "auto") return MoeExchange::kAuto;
  SY_FAIL("--moe-exchange \"", name, "\" is not all-to-all, all-gather or auto");
}

void ParallelConfig::validate(const LayoutShape& c) const {
  SY_CHECK(world >= 1 && rank >= 0 && rank < world, "rank ", rank, " of a world of ", world);
  SY_CHECK(auto_max_routed_rows >= 0, "auto exchange limit of ", auto_max_routed_rows,
           " routed rows is negative");
  SY_CHECK(tp >= 1 && world % tp == 0, "--tp ", tp, " must divide the world size ", world);
  SY_CHECK(c.n_kv_heads % tp == 0, "--tp ", tp,
           " must divide num_key_value_heads = ", c.n_kv_heads);
  SY_CHECK(ep >= 0 && ep <= world && (ep == 0 || world % ep == 0), "--ep ", ep,
           " must divide the world size ", world);
  SY_CHECK(ep_size() <= c.n_experts, "--ep ", ep_size(), " exceeds the ", c.n_experts,
           " experts: some rank would hold none");
  SY_CHECK(world <= c.vocab_size, "world of ", world, " ranks exceeds the vocabulary");
}

int64_t split_begin(int64_t n, int64_t parts, int64_t i) {
  return i * (n / parts) + std::min(i, n % parts);
}

int64_t split_count(int64_t n, int64_t parts, int64_t i) {
  return n / parts + (i < n % parts ? 1 : 0);
}

std::vector<int64_t> experts_of(int64_t n_experts, int ep_size, int e) {
  std::vector<int64_t> out;
  const int64_t begin = split_begin(n_experts, ep_size, e);
  for (int64_t i = 0; i < split_count(n_experts, ep_size, e); ++i) out.push_back(begin + i);
  return out;
}

int owner_of_expert(int64_t n_experts, int ep_size, int64_t expert) {
  for (int e = 0; e < ep_size; ++e)
    if (expert < split_begin(n_experts, ep_size, e) + split_count(n_experts, ep_size, e)) return e;
  SY_FAIL("expert ", expert, " outside ", n_experts);
}

void token_counts(int64_t n_tokens, int world, std::vector<int64_t>& counts) {
  counts.resize(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) counts[r] = split_count(n_tokens, world, r);
}

std::string layout_table(const ParallelConfig& p, const LayoutShape& c) {
  std::ostringstream out;
  out << "# layout: world " << p.world << ", tp " << p.tp << ", ep " << p.ep_size()
      << ", moe exchange " << moe_exchange_name(p.exchange) << "\n";
  out << "#  rank  tp_group  tp_rank  q_heads    kv_heads   ep_rank  experts\n";
  const int64_t hq = c.n_heads / p.tp;
  const int64_t hkv = c.n_kv_heads / p.tp;
  for (int r = 0; r < p.world; ++r) {
    ParallelConfig q = p;
    q.rank = r;
    std::ostringstream heads, kv, experts;
    heads << "[" << q.tp_rank() * hq << "," << (q.tp_rank() + 1) * hq << ")";
    kv << "[" << q.tp_rank() * hkv << "," << (q.tp_rank() + 1) * hkv << ")";
    const auto ex = experts_of(c.n_experts, q.ep_size(), q.ep_rank());
    experts << "[" << ex.front() << "," << ex.back() + 1 << ")";
    char line[160];
    std::snprintf(line, sizeof(line), "  %5d  %8d  %7d  %-9s  %-9s  %7d  %s\n", r, q.tp_group(),
                  q.tp_rank(), heads.str().c_str(), kv.str().c_str(), q.ep_rank(),
                  experts.str().c_str());
    out << line;
  }
  return out.str();
}

}  // namespace sy
