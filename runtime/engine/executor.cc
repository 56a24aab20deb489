// The executor (see executor.h).
#include "runtime/engine/executor.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace sy {

namespace {

constexpr int32_t kPlanExit = 0;
constexpr int32_t kPlanStep = 1;
constexpr int32_t kPlanStepReport = 2;
constexpr int kIdleSleepMs = 20;  // longest sleep between polls of an idle worker

void send_header(Communicator& world, int32_t kind, const StepBatch* batch) {
  int32_t header[4] = {kind, 0, 0, 0};
  if (batch != nullptr) {
    header[1] = static_cast<int32_t>(batch->n_tokens());
    header[2] = static_cast<int32_t>(batch->n_seqs);
    header[3] = static_cast<int32_t>(batch->logit_rows.size());
  }
  world.broadcast_idle(header, sizeof(header), 0, kIdleSleepMs);
}

void send_batch(Communicator& world, const StepBatch& batch, std::vector<int32_t>& wire,
                bool report) {
  send_header(world, report ? kPlanStepReport : kPlanStep, &batch);
  wire.clear();
  for (const auto* v :
       {&batch.tokens, &batch.positions, &batch.token_seq, &batch.block_tables, &batch.logit_rows})
    wire.insert(wire.end(), v->begin(), v->end());
  world.broadcast(wire.data(), wire.size() * sizeof(int32_t), 0);
}

// The next batch from rank 0 into `batch`; its kind (kPlanExit when told to exit).
int32_t receive_batch(Communicator& world, const ModelLimits& limits, StepBatch& batch,
                      std::vector<int32_t>& wire) {
  int32_t header[4] = {0, 0, 0, 0};
  world.broadcast_idle(header, sizeof(header), 0, kIdleSleepMs);
  if (header[0] == kPlanExit) return kPlanExit;
  SY_CHECK(header[0] == kPlanStep || header[0] == kPlanStepReport, "unknown step plan kind ",
           header[0]);
  const int64_t n_tokens = header[1], n_seqs = header[2], n_logits = header[3];
  SY_CHECK(n_tokens > 0 && n_tokens <= limits.max_tokens && n_seqs > 0 &&
               n_seqs <= limits.max_seqs && n_logits >= 0 && n_logits <= limits.max_logit_rows,
           "step plan of ", n_tokens, " tokens, ", n_seqs, " sequences and ", n_logits,
           " logit rows outside the model's limits");
  const int64_t n_table = n_seqs * limits.max_blocks_per_seq;
  wire.resize(static_cast<size_t>(3 * n_tokens + n_table + n_logits));
  world.broadcast(wire.data(), wire.size() * sizeof(int32_t), 0);
  batch.clear();
  batch.n_seqs = n_seqs;
  const int32_t* p = wire.data();
  auto take = [&](std::vector<int32_t>& v, int64_t n) {
    v.assign(p, p + n);
    p += n;
  };
  take(batch.tokens, n_tokens);
  take(batch.positions, n_tokens);
  take(batch.token_seq, n_tokens);
  take(batch.block_tables, n_table);
  take(batch.logit_rows, n_logits);
  return header[0];
}

// A forward pass of `seconds` into `c`.
void note_pass(RankCounters& c, double seconds) {
  const std::vector<double>& edges = step_seconds_edges();
  c.step_buckets.resize(edges.size() + 1);
  ++c.step_buckets[static_cast<size_t>(std::lower_bound(edges.begin(), edges.end(), seconds) -
                                       edges.begin())];
  c.step_seconds += seconds;
  ++c.steps;
}

int64_t bits(double x) {
  int64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

double from_bits(int64_t b) {
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// RankCounters as int64 words: expert tokens, the exchange's bytes and seconds, the step
// buckets, their seconds and count. The same length on every rank (the same model).
size_t packed_words(const Model& model) {
  const ModelConfig& c = model.config();
  return static_cast<size_t>(c.num_hidden_layers * c.num_local_experts) + 4 +
         step_seconds_edges().size() + 1 + 2;
}

void pack(const RankCounters& c, std::vector<int64_t>& w) {
  w.clear();
  w.insert(w.end(), c.moe.expert_tokens.begin(), c.moe.expert_tokens.end());
  w.insert(w.end(), {c.moe.dispatch_bytes, c.moe.combine_bytes, bits(c.moe.dispatch_seconds),
                     bits(c.moe.combine_seconds)});
  std::vector<int64_t> buckets = c.step_buckets;
  buckets.resize(step_seconds_edges().size() + 1);
  w.insert(w.end(), buckets.begin(), buckets.end());
  w.insert(w.end(), {bits(c.step_seconds), c.steps});
}

RankCounters unpack(const std::vector<int64_t>& w, size_t n_expert_words, int rank) {
  RankCounters c;
  c.rank = rank;
  const int64_t* p = w.data();
  c.moe.expert_tokens.assign(p, p + n_expert_words);
  p += n_expert_words;
  c.moe.dispatch_bytes = p[0];
  c.moe.combine_bytes = p[1];
  c.moe.dispatch_seconds = from_bits(p[2]);
  c.moe.combine_seconds = from_bits(p[3]);
  p += 4;
  c.step_buckets.assign(p, p + step_seconds_edges().size() + 1);
  p += c.step_buckets.size();
  c.step_seconds = from_bits(p[0]);
  c.steps = p[1];
  return c;
}

// Every rank broadcasts its figures in turn (a report step only); rank 0 keeps them in `out`.
// Each rank's counts start again from zero.
void exchange_reports(Communicator* world, Model& model, RankCounters& local,
                      std::vector<RankCounters>* out) {
  local.moe = model.take_moe_counters();
  const int size = world != nullptr ? world->size() : 1;
  const int me = world != nullptr ? world->rank() : 0;
  const size_t n_expert_words = local.moe.expert_tokens.size();
  std::vector<int64_t> words;
  if (out != nullptr) out->clear();
  for (int r = 0; r < size; ++r) {
    if (r == me) {
      pack(local, words);
    } else {
      words.assign(packed_words(model), 0);
    }
    SY_CHECK(words.size() == packed_words(model), "report of ", words.size(), " words");
    if (size > 1) world->broadcast(words.data(), words.size() * sizeof(int64_t), r);
    if (out != nullptr) out->push_back(unpack(words, n_expert_words, r));
  }
  local = RankCounters{};
}

}  // namespace

Executor::Executor(Model& model, Communicator* world)
    : model_(model), world_(world), sampler_(model) {
  tokens_.reserve(static_cast<size_t>(model.limits().max_logit_rows));
}

const std::vector<double>& step_seconds_edges() {
  static const std::vector<double> edges = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                            0.25,  0.5,    1.0,   2.5,  5.0,   10.0};
  return edges;
}

const std::vector<int32_t>& Executor::execute(const StepBatch& batch,
                                              const std::vector<SampleRequest>& rows, bool report) {
  if (world_ != nullptr && world_->size() > 1) send_batch(*world_, batch, wire_, report);
  const auto t0 = std::chrono::steady_clock::now();
  model_.forward(batch);
  note_pass(local_, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  if (report) exchange_reports(world_, model_, local_, &reports_);
  tokens_.resize(rows.size());
  sampler_.sample(model_, rows, tokens_.data());
  return tokens_;
}

void Executor::stop_workers() {
  if (world_ != nullptr && world_->size() > 1) send_header(*world_, kPlanExit, nullptr);
}

void Executor::run_worker(Model& model, Communicator& world) {
  StepBatch batch;
  std::vector<int32_t> wire;
  RankCounters local;
  // Rank 0 samples; this rank only takes part in the step's collectives, the logits' gather
  // included, and in the reports.
  for (int32_t kind; (kind = receive_batch(world, model.limits(), batch, wire)) != kPlanExit;) {
    const auto t0 = std::chrono::steady_clock::now();
    model.forward(batch);
    note_pass(local, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (kind == kPlanStepReport) exchange_reports(&world, model, local, nullptr);
  }
}

}  // namespace sy
