// Single-request generation (see generator.h).
#include "runtime/engine/generator.h"

#include <algorithm>
#include <chrono>

#include "runtime/engine/kv_blocks.h"

namespace sy {

GenerateResult generate(Model& model, const std::vector<int32_t>& prompt,
                        const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token) {
  const ModelLimits& limits = model.limits();
  const int64_t vocab = model.config().vocab_size;
  const int64_t n_prompt = static_cast<int64_t>(prompt.size());
  SY_CHECK(n_prompt > 0, "empty prompt");
  SY_CHECK(options.max_tokens >= 0, "max_tokens ", options.max_tokens, " must be >= 0");
  SY_CHECK(options.sampling.min_tokens <= options.max_tokens, "min_tokens ",
           options.sampling.min_tokens, " exceeds max_tokens ", options.max_tokens);
  const int64_t context = n_prompt + options.max_tokens;
  SY_CHECK(context <= limits.max_blocks_per_seq * limits.block_size, "prompt of ", n_prompt,
           " tokens plus max_tokens ", options.max_tokens, " exceeds the context of ",
           limits.max_blocks_per_seq * limits.block_size, " tokens");
  for (int32_t id : prompt)
    SY_CHECK(id >= 0 && id < vocab, "prompt token id ", id, " outside the vocabulary of ", vocab);

  BlockAllocator blocks(limits.n_blocks);
  std::vector<int32_t> table;
  SY_CHECK(blocks.allocate((context + limits.block_size - 1) / limits.block_size, table),
           "not enough KV blocks for ", context, " tokens");
  table.resize(static_cast<size_t>(limits.max_blocks_per_seq), 0);

  GenerateResult result;
  if (options.all_prompt_logits) result.prompt_logits.resize(static_cast<size_t>(n_prompt * vocab));
  std::vector<float> last_logits(static_cast<size_t>(vocab));
  StepBatch batch;
  using clock = std::chrono::steady_clock;

  // Prefill in chunks of at most max_tokens tokens.
  auto t0 = clock::now();
  for (int64_t begin = 0; begin < n_prompt; begin += limits.max_tokens) {
    const int64_t n = std::min(limits.max_tokens, n_prompt - begin);
    batch.clear();
    batch.n_seqs = 1;
    batch.block_tables = table;
    for (int64_t i = 0; i < n; ++i) {
      batch.tokens.push_back(prompt[begin + i]);
      batch.positions.push_back(static_cast<int32_t>(begin + i));
      batch.token_seq.push_back(0);
    }
    const bool last_chunk = begin + n == n_prompt;
    if (options.all_prompt_logits) {
      for (int64_t i = 0; i < n; ++i) batch.logit_rows.push_back(static_cast<int32_t>(i));
      model.forward(batch, result.prompt_logits.data() + begin * vocab);
      if (last_chunk)
        std::copy_n(result.prompt_logits.data() + (n_prompt - 1) * vocab, vocab,
                    last_logits.begin());
    } else {
      if (last_chunk) batch.logit_rows.push_back(static_cast<int32_t>(n - 1));
      model.forward(batch, last_logits.data());
    }
  }
  auto t1 = clock::now();
  result.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();

  // Decode.
  std::vector<int32_t> end_ids;  // what min_tokens holds back
  if (!options.ignore_eos)
    for (int64_t id : options.eos_ids) end_ids.push_back(static_cast<int32_t>(id));
  Sampler sampler(options.sampling, vocab, prompt.size(), end_ids);
  // On GPUs the model samples on the device and only the token comes back (every rank samples
  // alike; rank 0's token is broadcast), the penalties applied there too.
  const bool on_device = model.ops().device() != Device::kCpu && model.forward_sample_supported();
  float params[Ops::kSampleParams] = {};
  float penalty[Ops::kPenaltyParams] = {};
  sampler.penalty_params(penalty);
  int32_t penalty_offsets[2] = {0, 0};
  int32_t bias_offsets[2] = {0, 0};
  int32_t device_next = -1;  // sampled by the last decode step on the device
  std::vector<int32_t> context_ids = prompt;
  context_ids.reserve(static_cast<size_t>(context));
  result.finish_reason = "length";
  for (int64_t step = 0; step < options.max_tokens; ++step) {
    int32_t next = device_next >= 0 ? device_next : sampler.sample(last_logits.data(), context_ids);
    if (model.parallel() != nullptr) model.parallel()->world->broadcast(&next, sizeof(next), 0);
    result.tokens.push_back(next);
    context_ids.push_back(next);
    if (on_token) on_token(next);
    const bool eos =
        std::find(options.eos_ids.begin(), options.eos_ids.end(), next) != options.eos_ids.end();
    if (eos && !options.ignore_eos) {
      result.finish_reason = "stop";
      break;
    }
    if (step + 1 == options.max_tokens) break;
    batch.clear();
    batch.n_seqs = 1;
    batch.block_tables = table;
    batch.tokens.push_back(next);
    batch.positions.push_back(static_cast<int32_t>(context_ids.size() - 1));
    batch.token_seq.push_back(0);
    batch.logit_rows.push_back(0);
    if (on_device) {
      sampler.device_params(params);
      const BiasList& bias = sampler.bias_list(static_cast<int64_t>(result.tokens.size()));
      bias_offsets[1] = static_cast<int32_t>(bias.ids.size());
      const SampleBiases biases{bias_offsets, bias.ids.data(), bias.values.data()};
      const PenaltyContext* pc =
          sampler.penalised() ? &sampler.penalty_context(context_ids) : nullptr;
      penalty_offsets[1] = pc != nullptr ? static_cast<int32_t>(pc->ids.size()) : 0;
      const SamplePenalties penalties{penalty_offsets, pc != nullptr ? pc->ids.data() : nullptr,
                                      pc != nullptr ? pc->counts.data() : nullptr, penalty};
      model.forward_sample(batch, params, &device_next, pc != nullptr ? &penalties : nullptr,
                           nullptr, bias.ids.empty() ? nullptr : &biases);
    } else {
      model.forward(batch, last_logits.data());
    }
  }
  result.decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  return result;
}

}  // namespace sy
