#!/usr/bin/env python3
"""Records what Hugging Face `tokenizers` (PyPI) encodes with the fixture vocabulary in the two
tokenizer.json layouts Mistral/Mixtral checkpoints ship: the legacy one (normalizer
Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer: tests/fixtures/tokenizer.json) and the
Metaspace one (no normalizer, pre-tokenizer Metaspace(replacement "▁", prepend_scheme "first",
split false)), which it writes as tests/fixtures/tokenizer_json/metaspace/tokenizer.json. Texts
with special tokens written out ("<s>[INST] ...") are encoded as a chat template's render is,
the special tokens' text becoming their ids. Run once; the output is committed:

  python3 -m venv /tmp/tok && /tmp/tok/bin/pip install tokenizers
  /tmp/tok/bin/python tests/reference/make_tokenizer_json_fixtures.py
"""
import json
import os

import tokenizers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
OUT = os.path.join(FIXTURES, "tokenizer_json")

EXTRA_TEXTS = [
    "<s>[INST] What is a switchyard? [/INST]",
    "<s> [INST] Be terse.\n\nName a yard. [/INST] A hump.</s> [INST] Another? [/INST]",
    "a</s>b<s>c",
    "<unk> and <s><s></s>",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n",
    "ünïcødé ✓ 雪 🚂",
    "the the the the",
    "12345 67.89",
    "<s",
    "s>",
]


def main():
    with open(os.path.join(FIXTURES, "tokenizer.json")) as f:
        legacy = json.load(f)
    metaspace = json.loads(json.dumps(legacy))
    metaspace["normalizer"] = None
    metaspace["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁",
                                  "prepend_scheme": "first", "split": False}
    metaspace["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    os.makedirs(os.path.join(OUT, "metaspace"), exist_ok=True)
    with open(os.path.join(OUT, "metaspace", "tokenizer.json"), "w") as f:
        json.dump(metaspace, f, ensure_ascii=False, indent=1)
    with open(os.path.join(FIXTURES, "tokenizer_cases.json")) as f:
        texts = [c["text"] for c in json.load(f)["encode"]] + EXTRA_TEXTS
    cases = {}
    for name, spec in (("legacy", legacy), ("metaspace", metaspace)):
        tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
        cases[name] = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids,
                        "decoded": tok.decode(tok.encode(t, add_special_tokens=False).ids,
                                              skip_special_tokens=True)}
                       for t in texts]
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"tokenizers": tokenizers.__version__, "cases": cases}, f, ensure_ascii=False,
                  indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
