// Single-request generation (see generator.h).
#include "runtime/engine/generator.h"

#include <algorithm>
#include <chrono>

#include "runtime/engine/kv_blocks.h"
#include "runtime/engine/request.h"
#include "runtime/engine/sampling.h"

namespace sy {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

void check_options(const Model& model, const std::vector<int32_t>& prompt,
                   const GenerateOptions& options) {
  const ModelLimits& limits = model.limits();
  RequestParams p;
  p.prompt = prompt;
  p.max_tokens = options.max_tokens;
  p.sampling = options.sampling;
  p.ignore_eos = options.ignore_eos;
  RequestLimits l;
  l.vocab_size = model.config().vocab_size;
  l.context_limit = std::min(limits.max_blocks_per_seq * limits.block_size,
                             model.config().max_position_embeddings);
  l.max_prompt_tokens = l.context_limit;
  l.allow_no_tokens = true;
  validate_request(p, l);
}

// One sequence's steps: its block table (padded to the table width), and a batch of its next
// tokens.
struct OneSequence {
  std::vector<int32_t> table;
  StepBatch batch;

  void run(const int32_t* tokens, int64_t begin, int64_t end, bool logits) {
    batch.clear();
    const int64_t width = static_cast<int64_t>(table.size());
    batch.add_sequence(tokens, begin, end, table.data(), width, width, logits);
  }
};

// Prefills `prompt` in chunks of at most max_tokens tokens; the last chunk asks for the logits
// of its last token, or, with all_prompt_logits, every chunk for all of its tokens' (copied to
// result.prompt_logits).
void prefill(Model& model, const std::vector<int32_t>& prompt, bool all_prompt_logits,
             OneSequence& seq, GenerateResult& result) {
  const int64_t chunk = model.limits().max_tokens;
  const int64_t vocab = model.config().vocab_size;
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  if (all_prompt_logits) result.prompt_logits.resize(static_cast<size_t>(n_prompt * vocab));
  for (int64_t begin = 0; begin < n_prompt; begin += chunk) {
    const int64_t n = std::min(chunk, n_prompt - begin);
    seq.run(prompt.data(), begin, begin + n, !all_prompt_logits && begin + n == n_prompt);
    if (all_prompt_logits) {
      for (int64_t i = 0; i < n; ++i) seq.batch.logit_rows.push_back(static_cast<int32_t>(i));
      model.forward(seq.batch, result.prompt_logits.data() + begin * vocab);
    } else {
      model.forward(seq.batch);
    }
  }
}

}  // namespace

GenerateResult generate(Model& model, const std::vector<int32_t>& prompt,
                        const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token) {
  check_options(model, prompt, options);
  const ModelLimits& limits = model.limits();
  const int64_t context = static_cast<int64_t>(prompt.size()) + options.max_tokens;
  BlockAllocator blocks(limits.n_blocks);
  OneSequence seq;
  SY_CHECK(blocks.allocate((context + limits.block_size - 1) / limits.block_size, seq.table),
           "not enough KV blocks for ", context, " tokens");
  seq.table.resize(static_cast<size_t>(limits.max_blocks_per_seq), 0);

  GenerateResult result;
  const Clock::time_point t0 = Clock::now();
  prefill(model, prompt, options.all_prompt_logits, seq, result);
  result.prefill_seconds = seconds_since(t0);

  // Decode: each step samples the last logit row of the step before (every rank alike, as
  // every rank holds the whole rows; rank 0's token is broadcast), then computes that token.
  const Clock::time_point t1 = Clock::now();
  std::vector<int32_t> end_ids;  // what min_tokens holds back
  if (!options.ignore_eos)
    for (int64_t id : options.eos_ids) end_ids.push_back(static_cast<int32_t>(id));
  Sampler sampler(options.sampling, model.config().vocab_size, prompt.size(), end_ids);
  StepSampler step_sampler(model);
  std::vector<SampleRequest> rows;
  std::vector<int32_t> ids(static_cast<size_t>(limits.max_logit_rows));
  std::vector<int32_t> context_ids = prompt;
  context_ids.reserve(static_cast<size_t>(context));
  result.finish_reason = "length";
  for (int64_t step = 0; step < options.max_tokens; ++step) {
    // Earlier rows of a prompt's all-logits chunk sample greedily, unused.
    const size_t n_rows = step == 0 ? seq.batch.logit_rows.size() : 1;
    rows.assign(n_rows, SampleRequest{});
    rows.back() = {&sampler, &context_ids, step, 0, -1};
    step_sampler.sample(model, rows, ids.data());
    int32_t next = ids[n_rows - 1];
    if (model.parallel() != nullptr) model.parallel()->world->broadcast(&next, sizeof(next), 0);
    result.tokens.push_back(next);
    context_ids.push_back(next);
    if (on_token) on_token(next);
    const auto& eos = options.eos_ids;
    if (!options.ignore_eos && std::find(eos.begin(), eos.end(), next) != eos.end()) {
      result.finish_reason = "stop";
      break;
    }
    if (step + 1 == options.max_tokens) break;
    const int64_t n = static_cast<int64_t>(context_ids.size());
    seq.run(context_ids.data(), n - 1, n, true);
    model.forward(seq.batch);
  }
  result.decode_seconds = seconds_since(t1);
  return result;
}

}  // namespace sy
