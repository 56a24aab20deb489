#!/usr/bin/env python3
"""Regenerates the GGUF fixtures of tests/fixtures/gguf, written by the `gguf` package's own
GGUFWriter:

  quant_blocks.gguf   blocks of every GGML type switchyard dequantizes, and their
                      dequantization by gguf.quants (below);
  tiny_bf16.gguf      the sharded_bf16_tied checkpoint as llama.cpp's convert_hf_to_gguf.py
                      lays out a Mixtral: architecture "llama", q/k rows permuted for its RoPE,
                      the experts merged into ffn_{gate,up,down}_exps, BF16, tied output, and the
                      tokenizer as tokenizer.ggml arrays (from the checkpoint's tokenizer.model,
                      read with sentencepiece as the converter does);
  e4_f16-0000{1,2}-of-00002.gguf
                      e4_top1_f16 (F16, untied, sliding window) in the older per-expert layout
                      (blk.N.ffn_gate.E.weight), split in two as llama.cpp's gguf-split does;
  window_q8_0.gguf    window_gqa4 (F32) with every 2-d weight quantized to Q8_0 by gguf.quants.

Run from the repository root (any Python 3.10+):

    python3 -m venv .cache/gguf-venv && .cache/gguf-venv/bin/pip install gguf numpy sentencepiece
    .cache/gguf-venv/bin/python tests/reference/make_gguf_fixtures.py

Everything is seeded: a second run rewrites the same bytes. The C++ tests (tests/runtime/formats/
test_gguf.cc, tests/kernels/test_quant.cc) only read the file.

For each type T of F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K and Q5_K the file holds:
  T.raw   [4, 256] of type T: 1024 elements as the type stores them
  T.want  [4, 256] F32: gguf.quants.dequantize of T.raw
Q8_0 and Q4_0 blocks are quantized from seeded normal values (row 0 all zero, row 3 scaled by
1e4); Q4_K, Q6_K and Q5_K blocks are seeded random bytes whose f16 scales are set to finite values of
either sign. Metadata of every value type (scalars and arrays) is written too, for the reader's
tests.
"""

import json
import os
import struct
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf", "quant_blocks.gguf")
ROWS, COLS = 4, 256


def values(rng):
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    x[0] = 0
    x[3] *= 1e4
    return x


def random_k_blocks(rng, qtype):
    """Random bytes of ROWS x (COLS / 256) K-quant blocks, with finite f16 scales."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = ROWS * COLS // block_elems
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scales = (rng.standard_normal(n_blocks * 2) * 0.05).astype(np.float16).view(np.uint8)
    scales = scales.reshape(n_blocks, 2, 2)
    if qtype in (T.Q4_K, T.Q5_K):  # d at bytes 0-1, dmin at 2-3
        raw[:, 0:2] = scales[:, 0]
        raw[:, 2:4] = scales[:, 1]
    else:  # Q6_K: d in the last two bytes
        raw[:, -2:] = scales[:, 0]
    return raw.reshape(ROWS, -1)


def write_quant_blocks():
    rng = np.random.default_rng(20261207)
    w = gguf.GGUFWriter(OUT, arch="llama")
    w.add_uint32("test.u32", 7)
    w.add_int32("test.i32", -3)
    w.add_float32("test.f32", 0.5)
    w.add_uint64("test.u64", 1 << 40)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "blocks")
    w.add_array("test.strings", ["a", "bc", ""])
    w.add_array("test.floats", [0.25, -1.5])
    w.add_array("test.ints", [1, -2, 3])
    for qtype in (T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K, T.Q5_K):
        if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
            raw = random_k_blocks(rng, qtype)
        else:
            raw = quants.quantize(values(rng), qtype)
        want = quants.dequantize(raw, qtype).astype(np.float32)
        assert want.shape == (ROWS, COLS), want.shape
        assert np.isfinite(want).all()
        name = qtype.name
        if qtype == T.F16:
            w.add_tensor(name + ".raw", raw.view(np.float16))
        else:
            w.add_tensor(name + ".raw", raw.view(np.uint8), raw_shape=raw.shape, raw_dtype=qtype)
        w.add_tensor(name + ".want", want)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", os.path.relpath(OUT, ROOT), os.path.getsize(OUT), "bytes")


FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def read_safetensors(model_dir):
    """Every tensor of a checkpoint directory as float32 (bf16 and f16 widened exactly)."""
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(model_dir, name), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            data = f.read()
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            raw = np.frombuffer(data[begin:end], dtype=np.uint8)
            if info["dtype"] == "BF16":
                v = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif info["dtype"] == "F16":
                v = raw.view(np.float16).astype(np.float32)
            else:
                v = raw.view(np.float32)
            out[key] = v.reshape(info["shape"])
    return out


def permute(w, n_head):
    """llama.cpp's q/k row order: within each head, rows i and i + d/2 become 2i and 2i + 1."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def add_metadata(w, cfg, tok_dir):
    import sentencepiece as spm

    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_local_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        t = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        types.append(t)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_unk_token_id(0)
    w.add_add_space_prefix(True)


def gguf_tensors(cfg, t, merged):
    """(name, float32 array) in llama.cpp's names and layout."""
    out = [("token_embd.weight", t["model.embed_tokens.weight"])]
    for l in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{l}.", f"blk.{l}."
        out += [
            (b + "attn_norm.weight", t[p + "input_layernorm.weight"]),
            (b + "attn_q.weight", permute(t[p + "self_attn.q_proj.weight"], cfg["num_attention_heads"])),
            (b + "attn_k.weight", permute(t[p + "self_attn.k_proj.weight"], cfg["num_key_value_heads"])),
            (b + "attn_v.weight", t[p + "self_attn.v_proj.weight"]),
            (b + "attn_output.weight", t[p + "self_attn.o_proj.weight"]),
            (b + "ffn_norm.weight", t[p + "post_attention_layernorm.weight"]),
            (b + "ffn_gate_inp.weight", t[p + "block_sparse_moe.gate.weight"]),
        ]
        for hf, gg in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            per = [t[p + f"block_sparse_moe.experts.{e}.{hf}.weight"]
                   for e in range(cfg["num_local_experts"])]
            if merged:
                out.append((b + f"ffn_{gg}_exps.weight", np.stack(per)))
            else:
                out += [(b + f"ffn_{gg}.{e}.weight", x) for e, x in enumerate(per)]
    out.append(("output_norm.weight", t["model.norm.weight"]))
    if not cfg["tie_word_embeddings"]:
        out.append(("output.weight", t["lm_head.weight"]))
    return out


def add_tensor(w, name, x, qtype):
    """Norms (1-d) and the router in F32, the rest in qtype."""
    if x.ndim == 1 or name.endswith("ffn_gate_inp.weight") or qtype == T.F32:
        w.add_tensor(name, x.astype(np.float32))
    elif qtype == T.F16:
        w.add_tensor(name, x.astype(np.float16))
    else:
        raw = quants.quantize(x.astype(np.float32), qtype)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)


def write_model(src, out_names, qtype, merged):
    src_dir = os.path.join(FIXTURES, src)
    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = json.load(f)
    tensors = gguf_tensors(cfg, read_safetensors(src_dir), merged)
    parts = [tensors] if len(out_names) == 1 else [tensors[: len(tensors) // 2],
                                                   tensors[len(tensors) // 2:]]
    for i, (name, part) in enumerate(zip(out_names, parts)):
        path = os.path.join(ROOT, "tests", "fixtures", "gguf", name)
        w = gguf.GGUFWriter(path, arch="llama")
        if i == 0:
            add_metadata(w, cfg, src_dir)
        if len(out_names) > 1:  # llama.cpp's gguf-split keys
            w.add_uint16("split.no", i)
            w.add_uint16("split.count", len(out_names))
            w.add_int32("split.tensors.count", len(tensors))
        for tname, x in part:
            add_tensor(w, tname, x, qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        print("wrote", os.path.relpath(path, ROOT), os.path.getsize(path), "bytes")


def main():
    write_quant_blocks()
    write_model("sharded_bf16_tied", ["tiny_bf16.gguf"], T.BF16, merged=True)
    write_model("e4_top1_f16", ["e4_f16-00001-of-00002.gguf", "e4_f16-00002-of-00002.gguf"],
                T.F16, merged=False)
    write_model("window_gqa4", ["window_q8_0.gguf"], T.Q8_0, merged=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
