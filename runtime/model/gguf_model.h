// Mixtral models in llama.cpp's GGUF files: the config from the `llama.*` metadata and the
// tensors under llama.cpp's names (see weights.h's WeightSource).
//
// llama.cpp's converter (convert_hf_to_gguf.py) writes a Mixtral checkpoint as architecture
// "llama" with these tensors (GGUF dims innermost first, so [cols, rows] of a Hugging Face
// weight):
//   token_embd, output_norm, output (absent when tied to token_embd)
//   blk.N.attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate_inp (the router)
//   blk.N.ffn_gate_exps, ffn_down_exps, ffn_up_exps: every expert's w1, w2, w3 as one 3-D
//     tensor [cols, rows, n_experts]; older files hold blk.N.ffn_gate.E, ffn_down.E, ffn_up.E
// attn_q and attn_k are permuted for llama.cpp's interleaved RoPE: within each head, GGUF row 2i
// is Hugging Face row i and row 2i + 1 is row i + head_dim / 2. Reading undoes it.
#pragma once

#include <memory>
#include <string>

#include "runtime/formats/gguf.h"
#include "runtime/model/config.h"
#include "runtime/model/weights.h"

namespace sy {

// The config of a GGUF Mixtral: architecture "llama" (or "mixtral"), ARCH.block_count,
// context_length, embedding_length, feed_forward_length, attention.head_count(_kv),
// attention.key_length (else rope.dimension_count, else embedding / heads), rope.freq_base
// (default 10000), attention.layer_norm_rms_epsilon, expert_count, expert_used_count,
// attention.sliding_window (default none), vocab_size (else the token list's length), and
// tokenizer.ggml.bos_token_id / eos_token_id. tie_word_embeddings when there is no output
// tensor. Throws naming the file and the key.
ModelConfig config_from_gguf(const GgufModelFiles& files);

// Reads Hugging Face tensor names out of a GGUF checkpoint (one file or its splits).
std::unique_ptr<WeightSource> open_gguf_source(const std::string& path);

}  // namespace sy
