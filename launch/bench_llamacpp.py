#!/usr/bin/env python3
"""switchyard against llama.cpp on the same GGUF files, batches and lengths, in one invocation.

  python3 launch/bench_llamacpp.py --model DIR --types f16,q8_0,q4_k_m --batch 1,8,32 \
      --prompt-len 128 --output-len 32 --threads 2 [--ranks 1] [--engine-args "--tp 2"]

Once, into a cache folder (--cache, default ~/.cache/switchyard/llama.cpp): the `llama-cpp-python`
source package from PyPI (it vendors the whole llama.cpp tree), llama.cpp built from it with cmake
(llama-bench, llama-batched-bench, llama-quantize; CPU only, native), and a virtual environment
with the Python its `convert_hf_to_gguf.py` needs (torch, transformers, sentencepiece). Then, per
checkpoint, also cached: the Hugging Face directory DIR converted by `convert_hf_to_gguf.py`
(--outtype f32 / f16 / bf16) and quantized by `llama-quantize` (Q8_0, Q4_0, Q4_K_M).

For every type, both engines run on that same file: llama.cpp's `llama-bench` (one sequence:
prefill of --prompt-len tokens, decode of --output-len) and `llama-batched-bench` (--batch
sequences at once), then switchyard's `bench engine --model FILE.gguf` (the file's own types).
The table gives tokens per second of each and the switchyard/llama.cpp ratio: the best of
--repeat runs of each side, the two sides alternating (shared machines are noisy; best-of is the
figure least disturbed by other work). Both get --threads
cores: llama.cpp `-t THREADS`, switchyard `mpirun -n RANKS` with THREADS / RANKS threads a rank.
"""
import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile

LLAMA_CPP_PYTHON = "0.3.36"
OUTTYPES = {"f32": "f32", "f16": "f16", "bf16": "bf16"}
QUANTS = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}
TOOLS = ["llama-bench", "llama-batched-bench", "llama-quantize"]


def log(*args):
    print("#", *args, file=sys.stderr, flush=True)


def run(cmd, **kw):
    log("$", " ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


def parse_list(text):
    return [int(x) for x in text.split(",") if x]


def fetch_source(cache):
    """The vendored llama.cpp tree of the llama-cpp-python sdist, extracted once."""
    src = os.path.join(cache, f"llama-cpp-python-{LLAMA_CPP_PYTHON}", "vendor", "llama.cpp")
    if os.path.isfile(os.path.join(src, "CMakeLists.txt")):
        return src
    dl = os.path.join(cache, "download")
    os.makedirs(dl, exist_ok=True)
    sdists = glob.glob(os.path.join(dl, f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if not sdists:
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", dl])
        sdists = glob.glob(os.path.join(dl, f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    top = os.path.join(cache, f"llama-cpp-python-{LLAMA_CPP_PYTHON}")
    with tarfile.open(sdists[0]) as tar:
        prefix = tar.getnames()[0].split("/")[0]
        tar.extractall(cache, filter="data")
    os.rename(os.path.join(cache, prefix), top)
    return src


def build_tools(cache, src, jobs):
    build = os.path.join(cache, "build")
    bins = {t: os.path.join(build, "bin", t) for t in TOOLS}
    if all(os.access(b, os.X_OK) for b in bins.values()):
        return bins
    run(["cmake", "-S", src, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
    run(["cmake", "--build", build, "-j", str(jobs), "--target"] + TOOLS)
    return bins


def converter_python(cache, src):
    """A venv with what convert_hf_to_gguf.py imports (its gguf-py from the same tree)."""
    venv = os.path.join(cache, "venv")
    py = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".switchyard-ready")
    if os.path.exists(stamp):
        return py
    run([sys.executable, "-m", "venv", venv])
    run([py, "-m", "pip", "install", "-q", "torch", "numpy", "sentencepiece", "safetensors",
         "transformers", "protobuf"])
    run([py, "-m", "pip", "install", "-q", "--no-deps", os.path.join(src, "gguf-py")])
    open(stamp, "w").close()
    return py


def checkpoint_key(model):
    """Checkpoints are cached by the bytes of their config and file sizes."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model)):
        path = os.path.join(model, name)
        if os.path.isfile(path):
            h.update(name.encode())
            h.update(str(os.path.getsize(path)).encode())
            if name.endswith(".json"):
                with open(path, "rb") as f:
                    h.update(f.read())
    return os.path.basename(os.path.normpath(model)) + "-" + h.hexdigest()[:12]


def gguf_file(args, cache, src, bins, kind):
    out_dir = os.path.join(cache, "models", checkpoint_key(args.model))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{kind}.gguf")
    if os.path.exists(path):
        return path
    if kind in OUTTYPES:
        py = converter_python(cache, src)
        tmp = path + ".part"
        run([py, os.path.join(src, "convert_hf_to_gguf.py"), args.model, "--outtype",
             OUTTYPES[kind], "--outfile", tmp])
        os.rename(tmp, path)
        return path
    base = gguf_file(args, cache, src, bins, "f16")
    tmp = path + ".part"
    run([bins["llama-quantize"], base, tmp, QUANTS[kind], str(args.threads)],
        stdout=subprocess.DEVNULL)
    os.rename(tmp, path)
    return path


def llama_bench(bins, path, args, prompt, output):
    """One sequence: llama-bench's pp (prefill) and tg (decode) tokens per second."""
    res = run([bins["llama-bench"], "-m", path, "-p", str(prompt), "-n", str(output), "-t",
               str(args.threads), "-r", str(args.repetitions), "-o", "json"],
              capture_output=True, text=True)
    rows = json.loads(res.stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return pp, tg


def llama_batched(bins, path, args, batches, prompt, output):
    """llama-batched-bench: per sequence count, prefill and decode tokens per second."""
    ctx = max(batches) * (prompt + output) + 16
    res = run([bins["llama-batched-bench"], "-m", path, "-c", str(ctx), "-b", "2048", "-ub",
               "512", "-npp", str(prompt), "-ntg", str(output), "-npl",
               ",".join(map(str, batches)), "-t", str(args.threads), "--output-format", "jsonl"],
              capture_output=True, text=True)
    out = {}
    for line in (res.stdout + res.stderr).splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            r = json.loads(line)
            out[r["pl"]] = (r["speed_pp"], r["speed_tg"])
    return out


def switchyard_bench(args, path, batches, prompt, output):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "engine.json")
        cmd = [args.switchyard, "bench", "engine", "--model", path, "--batch",
               ",".join(map(str, batches)), "--prompt-len", str(prompt), "--output-len",
               str(output), "--threads", str(max(1, args.threads // args.ranks)),
               "--max-batch-tokens", str(max(prompt, 512)), "--json", out]
        cmd += args.engine_args.split()
        if args.ranks > 1:
            cmd = ["mpirun", "-n", str(args.ranks), "--oversubscribe", "--bind-to", "none"] + cmd
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        run(cmd, env=env, stdout=subprocess.DEVNULL)
        with open(out) as f:
            samples = json.load(f)["samples"]
    return {s["batch"]: (s["prefill_tok_s"], s["decode_tok_s"]) for s in samples}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face Mixtral checkpoint directory")
    p.add_argument("--switchyard", default="build/launch/switchyard")
    p.add_argument("--types", default="f16,q8_0,q4_k_m",
                   help="comma list of " + ", ".join(list(OUTTYPES) + list(QUANTS)))
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for each side")
    p.add_argument("--ranks", type=int, default=1, help="switchyard ranks (mpirun -n)")
    p.add_argument("--repetitions", type=int, default=3, help="llama-bench -r")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of both sides per type, alternating; the table keeps each side's best")
    p.add_argument("--engine-args", default="", help="more flags for `bench engine`")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/switchyard/llama.cpp"))
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="build jobs for llama.cpp")
    p.add_argument("--json", help="write every row here")
    args = p.parse_args()
    types = [t for t in args.types.split(",") if t]
    for t in types:
        if t not in OUTTYPES and t not in QUANTS:
            p.error(f"--types: {t} is not one of {', '.join(list(OUTTYPES) + list(QUANTS))}")
    batches = parse_list(args.batch)
    if not batches or min(batches) < 1:
        p.error("--batch: give sequence counts >= 1")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.threads < 1 or args.ranks < 1 or args.threads < args.ranks:
        p.error("--threads must be >= --ranks >= 1")

    os.makedirs(args.cache, exist_ok=True)
    src = fetch_source(args.cache)
    bins = build_tools(args.cache, src, args.jobs)
    files = {t: gguf_file(args, args.cache, src, bins, t) for t in types}

    P, O = args.prompt_len, args.output_len
    print(f"# switchyard vs llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON} vendored tree), cpu, "
          f"{args.threads} threads each, switchyard on {args.ranks} rank(s) {args.engine_args}")
    print(f"# prefill: {P} prompt tokens per sequence; decode: {O} tokens per sequence; tok/s "
          f"summed over the sequences; best of {args.repeat} alternating runs of each side")
    print(f"# {'type':>7} {'batch':>5} {'llama_pp':>9} {'sy_pp':>9} {'ratio':>6} "
          f"{'llama_tg':>9} {'sy_tg':>9} {'ratio':>6}   (tok/s)")
    rows = []
    for t in types:
        path = files[t]
        ll, sy = {}, {}  # batch -> (prefill, decode), the best of the repeats
        for _ in range(args.repeat):  # the two sides alternate, so both see the same machine
            got = {}
            if 1 in batches:
                got[1] = llama_bench(bins, path, args, P, O)
            more = [b for b in batches if b != 1]
            if more:
                got.update(llama_batched(bins, path, args, more, P, O))
            for side, new in ((ll, got), (sy, switchyard_bench(args, path, batches, P, O))):
                for b, (pp, tg) in new.items():
                    old = side.get(b, (0.0, 0.0))
                    side[b] = (max(old[0], pp), max(old[1], tg))
        for b in batches:
            (lp, lt), (sp, st) = ll[b], sy[b]
            rows.append(dict(type=t, batch=b, prompt_len=P, output_len=O,
                             llama_prefill_tok_s=lp, switchyard_prefill_tok_s=sp,
                             llama_decode_tok_s=lt, switchyard_decode_tok_s=st,
                             gguf_bytes=os.path.getsize(path)))
            print(f"  {t:>7} {b:>5} {lp:>9.1f} {sp:>9.1f} {sp / lp:>6.2f} {lt:>9.1f} {st:>9.1f} "
                  f"{st / lt:>6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
