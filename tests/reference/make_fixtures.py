#!/usr/bin/env python3
"""Regenerates tests/fixtures: the tiny tokenizer, three small random Mixtral checkpoints and the
reference outputs of Hugging Face transformers for them.

Run from the repository root:

    /opt/refenv/bin/python tests/reference/make_fixtures.py

Needs torch, transformers (5.x), tokenizers, sentencepiece, safetensors and numpy. Everything is
seeded: a second run rewrites the same bytes. The C++ tests only read the files written here; they
never need Python or torch.

What is written (see docs/testing.md):
  tests/fixtures/tokenizer.model       sentencepiece BPE model trained on launch/tiny_corpus.txt
  tests/fixtures/tokenizer.json        the same vocabulary as a Hugging Face tokenizer, in the
  tests/fixtures/tokenizer_config.json layout of the files shipped with Mixtral checkpoints
  tests/fixtures/tokenizer_cases.json  encode/decode references
  tests/fixtures/<model>/              a complete checkpoint (config.json, *.safetensors,
                                       generation_config.json, tokenizer files) and
                                       reference.json + logits_<k>.bin
"""

import copy
import io
import json
import os
import re
import shutil
import sys

import numpy as np
import sentencepiece as spm
import torch
import transformers
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import (
    GenerationConfig,
    LlamaTokenizer,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(REPO, "launch", "tiny_corpus.txt")
FIXTURES = os.path.join(REPO, "tests", "fixtures")
VOCAB_SIZE = 384
BOS_ID, EOS_ID = 1, 2

# The options of sy::train_tokenizer (runtime/formats/tokenizer.cc); keep the two in step.
TRAINER_OPTIONS = dict(
    model_type="bpe",
    vocab_size=VOCAB_SIZE,
    byte_fallback=True,
    character_coverage=0.995,
    num_threads=1,
    split_digits=True,
    unk_id=0,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    pad_id=-1,
    unk_piece="<unk>",
    bos_piece="<s>",
    eos_piece="</s>",
    add_dummy_prefix=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
)

TRAIN_SEED = 1234  # kTrainSeed

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def write_json(path, obj):
    """Indented JSON with each list of numbers on one line."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    # Only lists json.dumps broke over lines (a JSON string never holds a raw newline).
    text = re.sub(r"\[\n[-0-9.e,\s]+?\]",
                  lambda m: "[" + ", ".join(m.group(0)[1:-1].replace(",", " ").split()) + "]", text)
    assert json.loads(text) == obj
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


# ---- tokenizer -----------------------------------------------------------------------------------


def train_tokenizer():
    """Trains the sentencepiece model twice and checks both runs give the same bytes."""
    models = []
    for _ in range(2):
        spm.set_random_generator_seed(TRAIN_SEED)
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            input=CORPUS, model_writer=out, minloglevel=1, **TRAINER_OPTIONS
        )
        models.append(out.getvalue())
    assert models[0] == models[1], "sentencepiece training is not deterministic"
    path = os.path.join(FIXTURES, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(models[0])
    return path


def write_hf_tokenizer_files(model_path, out_dir):
    """tokenizer.json / tokenizer_config.json laid out as in the Mixtral checkpoints: a BPE model
    with byte fallback; normalizer Prepend('▁') + Replace(' ', '▁') (sentencepiece's dummy
    prefix); decoder Replace('▁', ' ') + ByteFallback + Fuse + Strip(1 leading ' '); BOS added."""
    vocab, _, merges = SentencePieceExtractor(model_path).extract()
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(("<unk>", "<s>", "</s>"))
    }
    write_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": special,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": True,
            "model_max_length": 4096,
            "pad_token": None,
            "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
        },
    )


class Tokenizers:
    """The references: `hf` (Hugging Face tokenizers running the tokenizer.json above, i.e. what
    Mixtral's tokenizer.json gives) and `sp` (sentencepiece, what the C++ side runs). `llama5` is
    transformers 5's LlamaTokenizer rebuilt from tokenizer.model; it differs from both on text
    that starts with whitespace and is only recorded where it differs."""

    def __init__(self, model_path):
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.hf = PreTrainedTokenizerFast(
            tokenizer_file=os.path.join(FIXTURES, "tokenizer.json"),
            bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        )
        self.llama5 = LlamaTokenizer.from_pretrained(FIXTURES)
        assert self.sp.get_piece_size() == VOCAB_SIZE == len(self.hf)

    def encode(self, text, add_bos):
        ids = self.hf.encode(text, add_special_tokens=add_bos)
        expected = ([BOS_ID] if add_bos else []) + self.sp.encode(text)
        assert ids == expected, f"tokenizers and sentencepiece disagree on {text!r}"
        return ids

    def decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=True)


ENCODE_CASES = [
    "Hello world",
    "",
    " ",
    "   ",
    "  two leading spaces",
    "trailing spaces  ",
    "multiple   inner    spaces",
    "line one\nline two",
    "\n\nstarts with newlines",
    "ends with a newline\n",
    "windows\r\nnewline",
    "tab\tseparated\tvalues",
    "\tleading tab",
    "digits 0123456789 and 3.14159",
    "Total: 1,234,567 tonnes in 2023",
    "Zürich café naïve façade",
    "crème brûlée à la carte",
    "combining e\u0301 stays unnormalised",
    "東京駅",
    "日本語のテキスト",
    "Ωμέγα and Привет",
    "🚂 the train",
    "emoji 🦀🧪 need bytes",
    "mixed: café 東京 🍕 done",
    "The switchyard at dawn.",
    "def total(values):\n    return sum(values)",
    '{"name": "tiny", "layers": 3}',
    "\u2581literal lower block",
    "a",
]


def decode_cases(sp):
    """Id lists for decode: special ids, byte runs cut inside a character, invalid UTF-8."""
    pid = sp.piece_to_id

    def byte_ids(data):
        return [pid(f"<0x{b:02X}>") for b in data]

    crab = "🦀".encode()
    east = "東".encode()
    the = sp.encode("the")
    world = sp.encode("the yard")
    return [
        ("bos_text_eos", [BOS_ID] + world + [EOS_ID]),
        ("unk_dropped", the + [0] + world),
        ("only_special", [BOS_ID, 0, EOS_ID]),
        ("empty", []),
        ("emoji_complete", byte_ids(crab)),
        ("emoji_first_two_bytes", byte_ids(crab[:2])),
        ("emoji_first_three_bytes_then_text", byte_ids(crab[:3]) + world),
        ("special_inside_byte_run", byte_ids(crab[:2]) + [BOS_ID] + byte_ids(crab[2:])),
        ("valid_char_then_stray_lead_byte", byte_ids(east) + byte_ids(east[:1]) + world),
        ("lone_continuation_byte", byte_ids(b"\x80")),
        ("overlong_slash", byte_ids(b"\xc0\xaf")),
        ("surrogate", byte_ids(b"\xed\xa0\x80")),
        ("above_max_code_point", byte_ids(b"\xf4\x90\x80\x80")),
        ("byte_space_first", byte_ids(b" ") + the),
        ("bos_then_byte_space", [BOS_ID] + byte_ids(b" ") + the),
        ("space_pieces_first", [pid("\u2581"), pid("\u2581")] + the),
        ("text_then_space_pieces", the + [pid("\u2581"), pid("\u2581")]),
        ("newline_byte_first", byte_ids(b"\n") + the),
    ]


def make_tokenizer_cases(toks):
    encode = []
    for text in ENCODE_CASES:
        ids = toks.encode(text, add_bos=False)
        case = {"text": text, "ids": ids, "decoded": toks.decode(ids)}
        llama5 = toks.llama5.encode(text, add_special_tokens=False)
        if llama5 != ids:
            case["llama_tokenizer_v5_ids"] = llama5
        encode.append(case)
    decode = []
    for name, ids in decode_cases(toks.sp):
        case = {"name": name, "ids": ids, "text": toks.decode(ids)}
        sp_text = toks.sp.decode(ids)
        if sp_text != case["text"]:
            case["sentencepiece_decode"] = sp_text
        decode.append(case)
    write_json(
        os.path.join(FIXTURES, "tokenizer_cases.json"),
        {
            "tokenizer": "tokenizer.model",
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
            "semantics": (
                "encode: ids without BOS from Hugging Face tokenizers running tokenizer.json "
                "(Mixtral layout), checked equal to sentencepiece Encode. decoded/text: "
                "decode(ids, skip_special_tokens=True) of the same tokenizer. "
                "llama_tokenizer_v5_ids: transformers 5 LlamaTokenizer built from "
                "tokenizer.model, only where it differs (it drops a leading space). "
                "sentencepiece_decode: sentencepiece DecodeIds, only where it differs."
            ),
            "encode": encode,
            "decode": decode,
        },
    )
    n_div = sum("llama_tokenizer_v5_ids" in c for c in encode)
    log(f"tokenizer_cases.json: {len(encode)} encode, {len(decode)} decode cases "
        f"({n_div} where transformers 5 LlamaTokenizer differs)")


# ---- models --------------------------------------------------------------------------------------

MODELS = [
    dict(
        name="window_gqa4", seed=101, dtype=torch.float32, shard=None,
        config=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                    num_local_experts=8, num_experts_per_tok=2, sliding_window=16,
                    rope_theta=10000.0, tie_word_embeddings=False),
    ),
    dict(
        name="sharded_bf16_tied", seed=202, dtype=torch.bfloat16, shard="200KB",
        config=dict(hidden_size=80, intermediate_size=112, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                    num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
                    rope_theta=1e6, tie_word_embeddings=True),
    ),
    dict(
        name="e4_top1_f16", seed=303, dtype=torch.float16, shard=None,
        config=dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=4, head_dim=12,
                    num_local_experts=4, num_experts_per_tok=1, sliding_window=32,
                    rope_theta=1e6, tie_word_embeddings=False),
    ),
]

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

SHORT_TEXT = "The train left."
TEXT_20 = "The crew sorts the cars on track nine."
TEXT_33 = ("A switchyard is a sorting machine made of steel, gravity and human judgement, "
           "and every car in it carries a small story.")
N_GREEDY = 16


def build_model(spec):
    c = dict(spec["config"])
    rope_theta = c.pop("rope_theta")
    config = MixtralConfig(
        vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None,
        max_position_embeddings=4096, rms_norm_eps=1e-5, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        attn_implementation="eager", **c,
    )
    torch.manual_seed(spec["seed"])
    model = MixtralForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    with torch.no_grad():
        # RMSNorm weights start at exactly 1; make them matter.
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=gen))
        # Reduced-precision checkpoints: the fp32 reference model holds exactly the values the
        # checkpoint stores, so converting the checkpoint to fp32 reproduces the references.
        if spec["dtype"] != torch.float32:
            for p in model.parameters():
                p.copy_(p.to(spec["dtype"]).to(torch.float32))
    inv_freq = model.model.rotary_emb.inv_freq[1].item()  # rope_theta ** (-2 / head_dim)
    assert abs(inv_freq - rope_theta ** (-2.0 / c["head_dim"])) < 1e-6 * inv_freq
    return model


def expected_keys(spec):
    c = spec["config"]
    keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not c["tie_word_embeddings"]:
        keys.add("lm_head.weight")
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                 p + "block_sparse_moe.gate.weight"}
        keys |= {f"{p}self_attn.{x}_proj.weight" for x in "qkvo"}
        keys |= {f"{p}block_sparse_moe.experts.{j}.{w}.weight"
                 for j in range(c["num_local_experts"]) for w in ("w1", "w2", "w3")}
    return keys


def save_checkpoint(model, spec, out_dir):
    to_save = copy.deepcopy(model).to(spec["dtype"])
    kwargs = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
    to_save.save_pretrained(out_dir, **kwargs)

    # config.json as Mixtral checkpoints spell it: top-level rope_theta and torch_dtype (besides
    # transformers 5's rope_parameters and dtype, which it reads back).
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["rope_theta"] = spec["config"]["rope_theta"]
    config["torch_dtype"] = DTYPE_NAMES[spec["dtype"]]
    config["dtype"] = DTYPE_NAMES[spec["dtype"]]
    for field in ("head_dim", "sliding_window", "num_key_value_heads", "tie_word_embeddings"):
        assert field in config, f"{path}: no {field}"
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")

    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    if spec["shard"]:
        assert len(files) >= 3, f"{out_dir}: only {len(files)} shards"
        assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json"))
    else:
        assert files == ["model.safetensors"], files
    keys = {}
    for name in files:
        with safe_open(os.path.join(out_dir, name), "pt") as f:
            for k in f.keys():
                assert k not in keys, f"{k} in two shards"
                keys[k] = f.get_slice(k).get_dtype()
    assert set(keys) == expected_keys(spec), set(keys) ^ expected_keys(spec)
    want = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[spec["dtype"]]
    assert set(keys.values()) == {want}, set(keys.values())
    return files


def prompts(toks):
    rng = np.random.default_rng(7)
    random_40 = [BOS_ID] + rng.integers(3, VOCAB_SIZE, size=39).tolist()
    text_33 = toks.encode(TEXT_33, add_bos=True)
    assert len(text_33) >= 33, len(text_33)
    out = [
        dict(name="bos_only", ids=[BOS_ID]),
        dict(name="short_text", text=SHORT_TEXT, ids=toks.encode(SHORT_TEXT, add_bos=True)),
        dict(name="text_20", text=TEXT_20, ids=toks.encode(TEXT_20, add_bos=True)),
        dict(name="random_40", ids=random_40),
        dict(name="text_33", text=toks.hf.decode(text_33[:33], skip_special_tokens=True),
             ids=text_33[:33]),
    ]
    for p in out:
        if "text" in p:  # the truncated text must encode back to the same ids
            assert toks.encode(p["text"], add_bos=True) == p["ids"], p["name"]
            assert toks.llama5.encode(p["text"]) == p["ids"], p["name"]
    return out


@torch.no_grad()
def record(model, spec, out_dir, prompt_list):
    entries = []
    for k, p in enumerate(prompt_list):
        ids = torch.tensor([p["ids"]])
        logits = model(ids).logits[0].float()
        logits_file = f"logits_{k}.bin"
        logits.numpy().astype("<f4").tofile(os.path.join(out_dir, logits_file))

        gen_config = GenerationConfig(do_sample=False, max_new_tokens=N_GREEDY, min_new_tokens=0,
                                      eos_token_id=None, bos_token_id=BOS_ID, pad_token_id=0)
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             generation_config=gen_config)
        greedy = out[0, ids.shape[1]:].tolist()
        assert len(greedy) == N_GREEDY

        # The cached greedy decode must equal argmax of one full forward pass over everything.
        full = model(out).logits[0, ids.shape[1] - 1:-1]
        assert full.argmax(-1).tolist() == greedy, p["name"]
        top2 = full.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).min().item()

        entry = {"name": p["name"]}
        if "text" in p:
            entry["text"] = p["text"]
        entry.update(ids=p["ids"], logits=logits_file, greedy=greedy,
                     greedy_min_margin=round(margin, 6))
        entries.append(entry)
        log(f"  {p['name']:<11} n={len(p['ids']):>2} logit std {logits.std().item():.3f} "
            f"greedy {greedy} margin {margin:.4f}")
    return entries


def check_reload(out_dir, entries):
    """The saved checkpoint, loaded back as fp32, reproduces the recorded logits bit for bit."""
    model = MixtralForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    with torch.no_grad():
        for e in entries:
            logits = model(torch.tensor([e["ids"]])).logits[0].float().numpy()
            recorded = np.fromfile(os.path.join(out_dir, e["logits"]), dtype="<f4")
            assert np.array_equal(logits.reshape(-1), recorded), f"{out_dir}: {e['name']}"


def make_model(spec, toks, prompt_list):
    out_dir = os.path.join(FIXTURES, spec["name"])
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    log(f"{spec['name']}:")
    model = build_model(spec)
    files = save_checkpoint(model, spec, out_dir)
    for f in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(FIXTURES, f), os.path.join(out_dir, f))
    # Greedy references run to N_GREEDY tokens: no stop at EOS (generation_config.json, written
    # above, keeps eos_token_id).
    model.generation_config.eos_token_id = None
    entries = record(model, spec, out_dir, prompt_list)
    write_json(os.path.join(out_dir, "reference.json"), {
        "model": spec["name"],
        "checkpoint_dtype": DTYPE_NAMES[spec["dtype"]],
        "safetensors": files,
        "logits_format": "float32 little-endian, [n_prompt, vocab_size] row-major, from one "
                         "forward pass over the whole prompt by the fp32 model holding the "
                         "checkpoint's values",
        "greedy_format": f"{N_GREEDY} ids after the prompt, argmax each step, no EOS stop; "
                         "greedy_min_margin is the smallest top-1 minus top-2 logit gap",
        "prompts": entries,
    })
    check_reload(out_dir, entries)


def main():
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    os.makedirs(FIXTURES, exist_ok=True)
    model_path = train_tokenizer()
    write_hf_tokenizer_files(model_path, FIXTURES)
    toks = Tokenizers(model_path)
    make_tokenizer_cases(toks)
    prompt_list = prompts(toks)
    for spec in MODELS:
        make_model(spec, toks, prompt_list)
    log("done:", FIXTURES)


if __name__ == "__main__":
    main()
