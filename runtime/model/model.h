// The Mixtral forward pass over a batch of sequences with a paged KV cache.
//
// One step runs any mix of prefill chunks and decode tokens: the tokens of every sequence are
// flattened into one batch, each with its position and sequence index; attention reads each
// sequence's keys and values through its block table. Every buffer is sized once from
// ModelLimits; forward() allocates nothing.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/ops.h"
#include "parallel/context.h"
#include "runtime/model/config.h"
#include "runtime/model/moe.h"
#include "runtime/model/weights.h"

namespace sy {

// Capacity of the engine, fixed at start-up.
struct ModelLimits {
  int64_t max_tokens = 512;        // tokens in one step (prefill chunk budget)
  int64_t max_seqs = 1;            // sequences in one step
  int64_t max_blocks_per_seq = 0;  // block-table width: ceil(context limit / block_size)
  int64_t n_blocks = 0;            // KV blocks in the cache
  int64_t block_size = 16;         // tokens per KV block
  int64_t max_logit_rows = 512;    // rows of logits one step may ask for

  void validate() const;
};

// One step's input on the host: the tensor part of a step plan.
struct StepBatch {
  std::vector<int32_t> tokens;        // [n_tokens]
  std::vector<int32_t> positions;     // [n_tokens] position of each token in its sequence
  std::vector<int32_t> token_seq;     // [n_tokens] row of each token's sequence in block_tables
  std::vector<int32_t> block_tables;  // [n_seqs, max_blocks_per_seq] physical block ids
  int64_t n_seqs = 0;
  std::vector<int32_t> logit_rows;  // token rows whose logits are wanted, in output order

  int64_t n_tokens() const { return static_cast<int64_t>(tokens.size()); }
  void clear();
  // Appends a sequence: its tokens[begin, end) at positions begin.., its n_blocks block ids
  // padded with zeros to table_width, and with `logits` a logit row at its last token. Returns
  // its row in block_tables.
  int32_t add_sequence(const int32_t* seq_tokens, int64_t begin, int64_t end, const int32_t* blocks,
                       int64_t n_blocks, int64_t table_width, bool logits);
};

// Time and traffic of forward steps on this rank, accumulated while attached (set_profile).
// Always-on counts of this rank's MoE blocks, for the server's metrics, added to by every
// forward() until taken: on the host from the layout the step makes anyway, or, where the layout
// is made on the device (GPU decode graphs), in a device tally read when they are taken. No
// device synchronisation in the forward pass.
struct MoeCounters {
  std::vector<int64_t> expert_tokens;  // [n_layers, n_experts] routed pairs, counted as
                                       // ForwardProfile counts them (each pair on one rank)
  int64_t dispatch_bytes = 0;          // exchange payload this rank sent: tokens to experts
  int64_t combine_bytes = 0;           // and results back
  double dispatch_seconds = 0;         // host wall time in the two exchanges (on GPU ranks, the
  double combine_seconds = 0;          // time to enqueue them)

  void reset();
};

struct ForwardProfile {
  enum Phase { kAttention, kRouter, kDispatch, kExpert, kCombine, kOther, kPhases };
  static const char* phase_name(int phase);
  double seconds[kPhases] = {};  // wall time per phase (the device is synchronised at each mark)
  enum Traffic {
    kTpReduce,
    kDispatchBytes,
    kCombineBytes,
    kResidualGather,
    kEpReduce,
    kEmbed,
    kLogits,
    kTraffics
  };
  static const char* traffic_name(int traffic);
  uint64_t bytes[kTraffics] = {};      // payload bytes this rank sent, per collective
  std::vector<int64_t> expert_tokens;  // [n_layers, n_experts] routed (token, k) pairs counted here
  int64_t steps = 0;
  int64_t tokens = 0;

  void reset();
};

// This rank's part of the weights for `parallel` (the whole model when it is null).
WeightShard shard_for(const ModelConfig& config, const ParallelContext* parallel);

class Model {
 public:
  // `parallel` (not owned) is null for a single rank. Every rank of it must build its Model with
  // the same config and limits and then call forward() with the same batches, in lockstep.
  Model(const ModelConfig& config, Weights weights, Ops& ops, const ModelLimits& limits,
        const ParallelContext* parallel = nullptr);
  ~Model();  // drops the graphs it recorded on the backend
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  // Runs one step up to its logits: [batch.logit_rows.size(), vocab] rows of every rank's
  // vocabulary columns (a parallel model gathers them on every rank: a collective, so every rank
  // runs every step, whether it samples or not).
  void forward(const StepBatch& batch);
  // forward(batch), then its logits to `logits` (host, F32; null skips the copy).
  void forward(const StepBatch& batch, float* logits);
  // The last step's logits as whole rows on the device, [n_logits, vocab]: this rank's own on
  // one rank; the gathered blocks interleaved on the device when the vocabulary splits evenly
  // over the ranks, else on the host. Valid until the next step; the caller may change them in
  // place (sampling does). Not a collective.
  Tensor step_logits();
  // The last step's logits on the host: out [n_logits, vocab]. Not a collective.
  void copy_logits(float* out);

  const ModelConfig& config() const { return config_; }
  const ModelLimits& limits() const { return limits_; }
  const Weights& weights() const { return weights_; }
  Ops& ops() const { return ops_; }
  const ParallelContext* parallel() const { return par_; }
  // Attaches (or with null detaches) a profile that forward() adds to. Profiling synchronises
  // the device at every phase boundary.
  void set_profile(ForwardProfile* profile);
  // This rank's MoE counts since the last take (MoeCounters), the device tally included; they
  // start again from zero. Synchronises the device.
  MoeCounters take_moe_counters();
  // MoE blocks of at most `max_rows` routed rows (tokens x top-k) build their layout on the
  // device (Ops::moe_route) instead of on the host; 0 turns it off. The default is
  // kDeviceRouteMaxRows on GPUs (decode steps, which then run as graphs on one rank) and 0 on
  // the CPU. The all-to-all exchange always takes the host layout (its counts travel by MPI).
  void set_device_routing(int64_t max_rows);
  static constexpr int64_t kDeviceRouteMaxRows = 256;
  // Appends the router's choice of every MoE block run from now on to `trace` (null detaches):
  // for each step, layer by layer, the top-k expert ids of each of the step's tokens (this
  // rank's tokens with the all-to-all exchange). For tests comparing two backends' routing; it
  // copies to the host at every layer, so traced steps run without graphs.
  void set_routing_trace(std::vector<int32_t>* trace) { routing_trace_ = trace; }
  // Steps run so far as the launch of a recorded graph (pure-decode steps of a shape seen
  // before, on a backend with graphs, with device routing, on one rank or over stream-ordered
  // device communicators: Communicator::stream_ordered).
  int64_t graph_steps() const { return graph_steps_; }
  // Bytes of the KV cache on this rank.
  uint64_t kv_cache_bytes() const { return kv_storage_.bytes(); }

 private:
  void attention_block(int64_t layer, int64_t n_tokens, const AttentionMeta& meta);
  // out = MoE(xn) for n_tokens rows; the expert exchange follows the parallel layout.
  void run_step(const StepBatch& batch);  // every op of a step up to the logits on the device
  // `x` (F32) is the residual stream xn was normed from: with a storage dtype below fp32 the
  // router takes its own fp32 norm of it.
  // `all_to_all`: this step's exchange (ParallelConfig::step_exchange), else all-gather or one
  // rank.
  void moe_block(int64_t layer, Tensor out, Tensor xn, Tensor x, bool all_to_all);
  void moe_block_on_device(int64_t layer, Tensor out, Tensor xn);
  void reduce_expert_partials(Tensor out);  // all-reduce over the expert group (all-gather)
  void logits_compute(int64_t n_logits, int64_t n_tokens);  // into logits_ (device)
  void logits_gather(int64_t n_logits);  // every rank's block into logits_all_ (parallel)
  bool routes_on_device(int64_t n_rows, bool all_to_all) const;
  // Construction: the run state's views (two passes over one carving: sizing, then placing),
  // the KV cache, and the host scratch.
  void carve_state(Carver& carver);
  void allocate_kv_cache();
  void reserve_host_scratch();
  // A step: its batch checked against the limits and the config, its inputs on the device,
  // its layers (every op to the logits), run eagerly or as a recorded graph.
  void check_batch(const StepBatch& batch) const;
  AttentionMeta upload_inputs(const StepBatch& batch);
  void run_layers(const StepBatch& batch, const AttentionMeta& meta, bool all_to_all);
  // One layer when every rank holds every token (one rank, or the all-gather exchange).
  void replicated_layer(int64_t layer, int64_t n_tokens, const AttentionMeta& meta);
  // One layer with the all-to-all exchange: this rank's tokens go through the MoE block.
  void sequence_parallel_layer(int64_t layer, int64_t n_tokens, const AttentionMeta& meta);
  // Runs `step` eagerly, or records it as a graph on its shape's second run and replays it.
  void run_or_replay(const StepBatch& batch, bool all_to_all, const std::function<void()>& step);
  // The MoE block after routing with the layout on the host: over the all-to-all exchange, or
  // this rank's experts only.
  void moe_exchange(int64_t layer, Tensor out, Tensor xn, Tensor rows, Tensor weights);
  void moe_local(int64_t layer, Tensor out, Tensor xn, Tensor rows, Tensor weights);
  void count_exchange_bytes();  // dispatch and combine traffic of ep_plan_ (counters, profile)

  ModelConfig config_;
  Weights weights_;
  Ops& ops_;
  ModelLimits limits_;
  void lap(ForwardProfile::Phase phase);  // charges the time since the last mark to `phase`

  const ParallelContext* par_;  // null: one rank
  ForwardProfile* profile_ = nullptr;
  MoeCounters moe_counters_;
  std::chrono::steady_clock::time_point mark_;
  int world_ = 1;  // ranks in the job
  int rank_ = 0;

  // ---- run state (device), sized for limits_.max_tokens = N ----------------------------------
  DeviceBuffer state_storage_;
  Tensor x_;              // [N, dim]            residual stream
  Tensor xn_;             // [N, dim]            normed input of attention / MoE (storage dtype)
  Tensor q_;              // [N, n_heads, head_dim]
  Tensor k_;              // [N, n_kv_heads, head_dim]
  Tensor v_;              // [N, n_kv_heads, head_dim]
  Tensor attn_;           // [N, n_heads, head_dim]
  Tensor o_;              // [N, dim]            attention output / MoE output
  Tensor router_logits_;  // [N, n_experts]
  Tensor router_in_;      // [N, dim] F32: the router's norm when the storage dtype is not F32
  Tensor topk_idx_;       // I32 [N, k]
  Tensor topk_weights_;   // [N, k]
  Tensor x_own_;          // [N, dim]            this rank's tokens of the residual stream
  Tensor xn_own_;         // [N, dim]
  Tensor y_own_;          // [N, dim]            MoE output of this rank's tokens
  Tensor moe_send_;       // [N * k, dim]        routed rows in expert order; later combined rows
  Tensor moe_recv_;     // [N * k, dim]        rows received from the expert group; later sent back
  Tensor moe_in_;       // [N * k, dim]        rows of the local experts in expert order
  Tensor moe_out_;      // [N * k, dim]
  Tensor sorted_rows_;  // I32 [N * k]
  Tensor sorted_weights_;  // [N * k]
  Tensor perm_;            // I32 [N * k]         row permutation between exchange and expert order
  Tensor expert_offsets_;  // I32 [n_experts + 1] first routed row of each expert (device routing)
  Tensor routed_counts_;   // I32 [n_layers * n_experts] device-routed pairs since the last take
  ExpertScratch expert_scratch_;  // [N * k, hidden_dim] x 2
  Tensor ids_;                    // I32 [N]
  Tensor positions_;              // I32 [N]
  Tensor token_seq_;              // I32 [N]
  Tensor block_tables_;           // I32 [max_seqs, max_blocks_per_seq]
  Tensor logit_rows_;             // I32 [max_logit_rows]
  Tensor logit_x_;                // [max_logit_rows, dim]
  Tensor logit_xn_;               // [max_logit_rows, dim]       normed, storage dtype
  Tensor logits_;                 // [max_logit_rows, n_vocab]   this rank's vocabulary columns
  Tensor logits_all_;   // [vocab * max_logit_rows]    every rank's block, in rank order (parallel)
  Tensor logits_full_;  // [max_logit_rows, vocab]     the blocks interleaved (step_logits)
  Tensor logits_perm_;  // I32 [max_logit_rows * world] logits_full_'s rows in logits_all_

  // ---- KV cache (device): per layer [n_blocks, block_size, n_kv_heads, head_dim] -------------
  DeviceBuffer kv_storage_;
  std::vector<Tensor> k_cache_;  // [n_layers]
  std::vector<Tensor> v_cache_;  // [n_layers]

  // ---- host scratch ----------------------------------------------------------------------------
  MoeLayout layout_;
  std::vector<int32_t> host_topk_idx_;    // [N * k]
  std::vector<float> host_topk_weights_;  // [N * k]
  std::vector<int64_t> local_offsets_;    // [n_local_experts + 1]
  EpPlan ep_plan_;
  std::vector<int64_t> token_counts_;              // [world] tokens owned by each rank in this step
  std::vector<int64_t> tp_counts_;                 // [tp] the same for this attention group
  std::vector<int64_t> vocab_counts_;              // [world] logit elements of each rank's block
  std::vector<float> host_logits_;                 // [vocab * max_logit_rows] (parallel)
  std::vector<float> host_blocks_;                 // the same, every rank's block (copy_logits)
  std::vector<int32_t> host_perm_;                 // logits_perm_ on the host (step_logits)
  int64_t perm_rows_ = -1;                         // the logit rows logits_perm_ is made for
  int64_t step_rows_ = 0;                          // logit rows of the last step
  int64_t device_route_max_rows_ = 0;              // see set_device_routing
  std::vector<int32_t>* routing_trace_ = nullptr;  // see set_routing_trace
  std::vector<uint8_t> graph_seen_;  // [(max_seqs + 1) * (max_logit_rows + 1)] shapes run once
  std::vector<int64_t> recorded_;    // graph ids recorded on the backend
  bool graph_collectives_ = true;    // every collective of a step can be recorded (one rank, or
                                     // stream-ordered device communicators)
  int64_t graph_steps_ = 0;          // steps run as a graph launch
  int64_t serial_;                   // this model's graph namespace on a shared backend
  static std::atomic<int64_t> next_serial_;
};

}  // namespace sy
