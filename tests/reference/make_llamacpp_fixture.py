#!/usr/bin/env python3
"""Regenerates tests/fixtures/gguf/tiny_q4_k_m.gguf with llama.cpp's own tools: the checkpoint
`switchyard make-tiny-model` writes with the shapes below (the same one the C++ tests write in
memory, tests/common/tiny_checkpoint.h), converted by llama.cpp's convert_hf_to_gguf.py to F32
and quantized by its llama-quantize to Q4_K_M (Q4_K, with Q6_K where llama.cpp keeps more bits).

Needs the llama.cpp tree, tools and converter venv that launch/bench_llamacpp.py builds into its
cache (run that once first). From the repository root:

    python3 tests/reference/make_llamacpp_fixture.py [--cache ~/.cache/switchyard/llama.cpp] \
        [--switchyard build/launch/switchyard]

The tests only read the file; nothing here runs in CI.
"""
import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "launch"))
import bench_llamacpp  # noqa: E402

# Keep in step with tests/common/tiny_checkpoint.h.
TINY = ["--seed", "20", "--layers", "2", "--experts", "4", "--intermediate-size", "256"]
OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "gguf", "tiny_q4_k_m.gguf")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/switchyard/llama.cpp"))
    p.add_argument("--switchyard", default="build/launch/switchyard")
    args = p.parse_args()
    src = bench_llamacpp.fetch_source(args.cache)
    bins = bench_llamacpp.build_tools(args.cache, src, os.cpu_count())
    py = bench_llamacpp.converter_python(args.cache, src)
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "tiny")
        subprocess.run([args.switchyard, "make-tiny-model", "--out", model] + TINY, check=True)
        f32 = os.path.join(tmp, "f32.gguf")
        subprocess.run([py, os.path.join(src, "convert_hf_to_gguf.py"), model, "--outtype", "f32",
                        "--outfile", f32], check=True)
        subprocess.run([bins["llama-quantize"], f32, OUT, "Q4_K_M"], check=True)
    print("wrote", os.path.normpath(OUT), os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
