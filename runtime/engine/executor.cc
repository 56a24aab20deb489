// The executor (see executor.h).
#include "runtime/engine/executor.h"

namespace sy {

namespace {

constexpr int32_t kPlanExit = 0;
constexpr int32_t kPlanStep = 1;
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

void send_batch(Communicator& world, const StepBatch& batch, std::vector<int32_t>& wire) {
  send_header(world, kPlanStep, &batch);
  wire.clear();
  for (const auto* v :
       {&batch.tokens, &batch.positions, &batch.token_seq, &batch.block_tables, &batch.logit_rows})
    wire.insert(wire.end(), v->begin(), v->end());
  world.broadcast(wire.data(), wire.size() * sizeof(int32_t), 0);
}

// The next batch from rank 0 into `batch`; false when told to exit.
bool receive_batch(Communicator& world, const ModelLimits& limits, StepBatch& batch,
                   std::vector<int32_t>& wire) {
  int32_t header[4] = {0, 0, 0, 0};
  world.broadcast_idle(header, sizeof(header), 0, kIdleSleepMs);
  if (header[0] == kPlanExit) return false;
  SY_CHECK(header[0] == kPlanStep, "unknown step plan kind ", header[0]);
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
  return true;
}

}  // namespace

Executor::Executor(Model& model, Communicator* world)
    : model_(model), world_(world), sampler_(model) {
  tokens_.reserve(static_cast<size_t>(model.limits().max_logit_rows));
}

const std::vector<int32_t>& Executor::execute(const StepBatch& batch,
                                              const std::vector<SampleRequest>& rows) {
  if (world_ != nullptr && world_->size() > 1) send_batch(*world_, batch, wire_);
  model_.forward(batch);
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
  // Rank 0 samples; this rank only takes part in the step's collectives, the logits' gather
  // included.
  while (receive_batch(world, model.limits(), batch, wire)) model.forward(batch);
}

}  // namespace sy
