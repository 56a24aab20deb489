// The scheduler (see scheduler.h).
#include "runtime/engine/scheduler.h"

#include <algorithm>

namespace sy {

void StepPlan::clear() {
  batch.clear();
  sampled.clear();
  prompt_rows.clear();
  started = started_tokens = prefix_queried_tokens = prefix_hit_tokens = 0;
}

Scheduler::Scheduler(const ModelConfig& config, const ModelLimits& limits,
                     const SchedulerOptions& options)
    : limits_(limits),
      sliding_window_(config.sliding_window),
      options_(options),
      blocks_(limits.n_blocks, options.prefix_caching ? limits.block_size : 0) {}

void Scheduler::enqueue(std::unique_ptr<Sequence> seq) {
  auto at = std::upper_bound(waiting_.begin(), waiting_.end(), seq,
                             [](const auto& a, const auto& b) { return a->before(*b); });
  waiting_.insert(at, std::move(seq));
}

void Scheduler::add_running(std::unique_ptr<Sequence> seq) {
  auto at = std::upper_bound(running_.begin(), running_.end(), seq,
                             [](const auto& a, const auto& b) { return a->before(*b); });
  running_.insert(at, std::move(seq));
}

void Scheduler::remove_running(const std::vector<Sequence*>& done) {
  if (done.empty()) return;
  running_.erase(std::remove_if(running_.begin(), running_.end(),
                                [&](const std::unique_ptr<Sequence>& s) {
                                  return std::find(done.begin(), done.end(), s.get()) != done.end();
                                }),
                 running_.end());
}

int64_t Scheduler::preempt_last() {
  std::unique_ptr<Sequence> victim = std::move(running_.back());
  running_.pop_back();
  release_blocks(*victim);
  const int64_t given = victim->scheduled;
  victim->n_computed = 0;
  victim->n_recorded = 0;
  victim->scheduled = 0;
  ++victim->preemptions;
  ++n_preemptions_;
  enqueue(std::move(victim));
  return given;
}

bool Scheduler::reserve(Sequence& seq, int64_t take) {
  const int64_t B = limits_.block_size;
  const int64_t need =
      (seq.n_computed + take + B - 1) / B - static_cast<int64_t>(seq.blocks.size());
  return need <= 0 || blocks_.allocate(need, seq.blocks);
}

bool Scheduler::schedule(StepPlan& plan) {
  plan.clear();
  budget_ = options_.max_batch_tokens;
  prompt_rows_left_ = options_.prompt_logit_rows;
  for (auto& s : running_) s->scheduled = 0;
  schedule_running();
  admit_waiting(plan);
  build_batch(plan);
  return plan.batch.n_tokens() > 0;
}

// Running sequences first (decodes, then prefill chunks), in serving order; when blocks run out
// the last running sequence (the newest of the highest priority value) is preempted and
// recomputed later.
void Scheduler::schedule_running() {
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < running_.size() && budget_ > 0; ++i) {
      Sequence& seq = *running_[i];
      const int64_t pending = static_cast<int64_t>(seq.tokens.size()) - seq.n_computed;
      if ((pass == 0) != (pending == 1) || seq.scheduled > 0) continue;
      const int64_t take = seq.fit_prompt_rows(std::min(pending, budget_), prompt_rows_left_);
      if (take == 0) continue;  // its prompt logprobs wait for rows
      bool ok = reserve(seq, take);
      while (!ok && running_.back().get() != &seq) {
        budget_ += preempt_last();
        ok = reserve(seq, take);
      }
      if (!ok) {  // `seq` itself is the last: it waits
        preempt_last();
        break;
      }
      seq.scheduled = take;
      budget_ -= take;
      prompt_rows_left_ -= seq.prompt_rows(take);
    }
  }
}

Sequence* Scheduler::lower(const Sequence& seq) const {
  if (running_.empty()) return nullptr;
  Sequence& last = *running_.back();
  return last.params.priority > seq.params.priority ? &last : nullptr;
}

// The lowest priority first: they run fewer tokens this step, or none.
void Scheduler::reclaim(const Sequence& seq, int64_t want) {
  for (size_t i = running_.size(); i-- > 0 && want > 0;) {
    Sequence& other = *running_[i];
    if (other.params.priority <= seq.params.priority) break;
    const int64_t r = std::min(want, other.scheduled);
    other.scheduled -= r;
    budget_ += r;
    want -= r;
  }
}

// New (or preempted) requests in serving order (priority, then arrival), each starting past the
// longest run of whole blocks of its tokens in the prefix cache, short of its last token (whose
// logits are wanted). A request whose next block a sequence of this step is about to record
// waits and takes it from the cache then, instead of computing it too (a burst of requests with
// the same new system prompt computes it once); it keeps its running slot meanwhile, so later
// requests do not take it, and the scan ends with the slots. A request short of step tokens, of
// a running slot or of blocks takes them from running sequences of higher priority values:
// their tokens of this step first, then the sequences themselves (preempted).
void Scheduler::admit_waiting(StepPlan& plan) {
  int64_t n_waiting_for_blocks = 0;
  for (size_t w = 0; w < waiting_.size();) {
    const Admission a = admit(w, plan, n_waiting_for_blocks);
    if (a == Admission::kStop) break;
    if (a == Admission::kSkipped) ++w;
  }
}

Scheduler::Admission Scheduler::admit(size_t w, StepPlan& plan, int64_t& n_waiting_for_blocks) {
  Sequence& seq = *waiting_[w];
  const int64_t B = limits_.block_size;
  if (budget_ == 0 && lower(seq) == nullptr) return Admission::kStop;
  auto slots_full = [&] {
    return static_cast<int64_t>(running_.size()) + n_waiting_for_blocks >= options_.max_running;
  };
  while (slots_full() && lower(seq) != nullptr) budget_ += preempt_last();
  if (slots_full()) return Admission::kStop;
  const int64_t n_tokens = static_cast<int64_t>(seq.tokens.size());
  // A request that owes prompt logprobs computes its whole prompt: it matches nothing.
  const int64_t max_blocks = seq.wants_prompt_rows() ? 0 : (n_tokens - 1) / B;
  const int64_t matched = blocks_.match(seq.tokens.data(), max_blocks, seq.blocks);
  const int64_t hit = matched * B;
  if (matched < max_blocks && being_computed(seq, matched)) {
    blocks_.release(seq.blocks);
    ++n_waiting_for_blocks;
    return Admission::kSkipped;
  }
  seq.n_computed = hit;
  seq.n_recorded = matched;
  seq.recording = true;
  drop_out_of_window(seq);  // matched blocks the next tokens do not see
  if (n_tokens - hit > budget_) reclaim(seq, n_tokens - hit - budget_);
  const int64_t take = seq.fit_prompt_rows(std::min(n_tokens - hit, budget_), prompt_rows_left_);
  auto back_off = [&] {
    release_blocks(seq);
    seq.n_computed = seq.n_recorded = 0;
  };
  if (take == 0 && seq.wants_prompt_rows() && budget_ > 0) {
    back_off();  // no rows left for its prompt logprobs: it waits for the next step
    return Admission::kSkipped;
  }
  bool ok = take > 0 && reserve(seq, take);
  while (!ok && take > 0 && lower(seq) != nullptr) {
    budget_ += preempt_last();
    ok = reserve(seq, take);
  }
  if (!ok) {
    back_off();
    return Admission::kStop;
  }
  seq.scheduled = take;
  budget_ -= take;
  prompt_rows_left_ -= seq.prompt_rows(take);
  plan.prefix_queried_tokens += n_tokens;
  plan.prefix_hit_tokens += hit;
  if (!seq.started) {
    ++plan.started;
    plan.started_tokens += seq.n_prompt;
    seq.started = true;
    seq.first_step = Sequence::Clock::now();
    seq.cached_prompt = hit;
  }
  // A sequence preempted for `seq` sorts after it, so `seq` is still at w.
  SY_CHECK(waiting_[w].get() == &seq, "schedule: the waiting queue moved under request ", seq.id);
  std::unique_ptr<Sequence> admitted = std::move(waiting_[w]);
  waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(w));
  add_running(std::move(admitted));
  return Admission::kAdmitted;
}

// Each scheduled sequence's next tokens, and a logit row where a sequence reaches its last known
// token; then the prompt logprob rows.
void Scheduler::build_batch(StepPlan& plan) {
  StepBatch& batch = plan.batch;
  for (auto& sp : running_) {
    Sequence& seq = *sp;
    if (seq.scheduled == 0) continue;
    // Its prompt logprob rows: positions [lo, lo + n_rows), after the step's tokens so far.
    const int64_t n_rows = seq.prompt_rows(seq.scheduled);
    const int64_t lo = std::max(seq.n_computed, seq.prompt_lp_next - 1);
    for (int64_t p = lo; p < lo + n_rows; ++p)
      plan.prompt_rows.push_back(
          {&seq, p + 1, static_cast<int32_t>(batch.n_tokens() + (p - seq.n_computed))});
    const int64_t end = seq.n_computed + seq.scheduled;
    const bool last = end == static_cast<int64_t>(seq.tokens.size());
    batch.add_sequence(seq.tokens.data(), seq.n_computed, end, seq.blocks.data(),
                       static_cast<int64_t>(seq.blocks.size()), limits_.max_blocks_per_seq, last);
    seq.n_computed = end;
    if (last) plan.sampled.push_back(&seq);
  }
  for (const StepPlan::PromptRow& r : plan.prompt_rows) batch.logit_rows.push_back(r.batch_row);
}

bool Scheduler::being_computed(const Sequence& seq, int64_t block) const {
  if (!blocks_.prefix_caching()) return false;
  const int64_t B = limits_.block_size;
  const int64_t end = (block + 1) * B;  // the block is tokens [end - B, end)
  for (const auto& sp : running_) {
    const Sequence& r = *sp;
    // Scheduled this step, recording, and with the block next to record (n_computed moves past
    // this step's tokens once the batch is built): each step of waiting brings it closer to
    // recording the block. Its block before that one is `seq`'s matched one (so the same
    // tokens up to there); it still holds it, as the parent of its next record.
    if (r.scheduled == 0 || !r.recording || r.n_recorded != block || r.n_computed >= end ||
        static_cast<int64_t>(r.tokens.size()) < end)
      continue;
    if (block > 0 &&
        r.blocks[static_cast<size_t>(block - 1)] != seq.blocks[static_cast<size_t>(block - 1)])
      continue;
    if (std::equal(seq.tokens.begin() + (end - B), seq.tokens.begin() + end,
                   r.tokens.begin() + (end - B)))
      return true;
  }
  return false;
}

void Scheduler::release_blocks(Sequence& seq) {
  blocks_.release(seq.blocks, seq.n_dropped, static_cast<int64_t>(seq.blocks.size()));
  seq.blocks.clear();
  seq.n_dropped = 0;
}

void Scheduler::record_blocks() {
  const int64_t B = limits_.block_size;
  for (auto& sp : running_) {
    Sequence& seq = *sp;
    if (seq.scheduled == 0) continue;
    const int64_t full = seq.n_computed / B;
    if (blocks_.prefix_caching() && seq.recording && full > seq.n_recorded) {
      seq.n_recorded = blocks_.commit(seq.blocks, seq.tokens.data(), seq.n_recorded, full);
      // Another block holds the same content (two sequences computed it at once): this one
      // records no more, so nothing keeps it from giving back blocks.
      seq.recording = seq.n_recorded == full;
    }
    drop_out_of_window(seq);
  }
}

void Scheduler::drop_out_of_window(Sequence& seq) {
  const int64_t window = sliding_window_;
  if (window <= 0) return;
  const int64_t B = limits_.block_size;
  // Every later token attends to positions from n_computed - window + 1 on: the blocks wholly
  // before that are read no more, and go back (to the cache, where recorded). While the
  // sequence records, its last recorded block stays: the next block to record names it.
  int64_t drop = std::max<int64_t>(0, seq.n_computed - window + 1) / B;
  if (blocks_.prefix_caching() && seq.recording)
    drop = std::min(drop, std::max<int64_t>(0, seq.n_recorded - 1));
  if (drop <= seq.n_dropped) return;
  blocks_.release(seq.blocks, seq.n_dropped, drop);
  std::fill(seq.blocks.begin() + seq.n_dropped, seq.blocks.begin() + drop, 0);
  seq.n_dropped = drop;
}

}  // namespace sy
