#!/usr/bin/env python3
"""switchyard against Hugging Face transformers on the same checkpoint, prompts and lengths.

Runs both in the same invocation, one after the other on the same machine, and prints the
switchyard/transformers ratios of prefill and decode tokens per second.

  python3 launch/bench_transformers.py --model DIR --switchyard build/launch/switchyard \
      --batch 1,8 --prompt-len 128 --output-len 32 --ranks 2 --threads 2 \
      [--engine-args "--tp 2"] [--device cuda]

transformers runs with `--threads` torch threads; switchyard runs `bench engine` under
`mpirun -n RANKS` with one BLAS thread per rank, so both use the same number of cores.
Needs torch and transformers (not needed by the rest of the project).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def parse_list(text):
    return [int(x) for x in text.split(",") if x]


def transformers_case(model, torch, batch, prompt, output, device, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, prompt), generator=gen)
    ids[:, 0] = 1
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        model(ids[:, : min(prompt, 4)], use_cache=True)  # warm-up
        sync()
        t = time.perf_counter()
        model(ids, attention_mask=mask, use_cache=True)
        sync()
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=output, min_new_tokens=output,
                       do_sample=False, pad_token_id=0)
        sync()
        total_s = time.perf_counter() - t
    decode_s = max(total_s - prefill_s, 1e-9)
    return batch * prompt / prefill_s, batch * output / decode_s


def switchyard_case(args, batch, prompt, output):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "engine.json")
        cmd = [args.switchyard, "bench", "engine", "--model", args.model, "--batch", str(batch),
               "--prompt-len", str(prompt), "--output-len", str(output), "--json", out]
        cmd += args.engine_args.split()
        if args.ranks > 1:
            cmd = ["mpirun", "-n", str(args.ranks), "--oversubscribe"] + cmd
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(max(1, args.threads // args.ranks)),
                   OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                   OMPI_MCA_mpi_yield_when_idle="1")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        with open(out) as f:
            sample = json.load(f)["samples"][0]
    return sample["prefill_tok_s"], sample["decode_tok_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face Mixtral checkpoint directory")
    p.add_argument("--switchyard", default="build/launch/switchyard")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt-len", default="128")
    p.add_argument("--output-len", default="32")
    p.add_argument("--ranks", type=int, default=1, help="switchyard ranks (mpirun -n)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for each side")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--engine-args", default="",
                   help="more flags for `bench engine`, e.g. '--tp 2 --moe-exchange all-gather'")
    p.add_argument("--json", help="write every row here")
    args = p.parse_args()

    import torch
    import transformers
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model = model.to(args.device).eval()
    vocab = model.config.vocab_size

    print(f"# switchyard vs transformers {transformers.__version__} (torch {torch.__version__}), "
          f"{args.device}, {args.threads} threads, switchyard on {args.ranks} rank(s) "
          f"{args.engine_args}")
    print(f"# {'batch':>5} {'prompt':>6} {'output':>6} {'hf_prefill':>11} {'sy_prefill':>11} "
          f"{'ratio':>6} {'hf_decode':>10} {'sy_decode':>10} {'ratio':>6}   (tok/s)")
    rows = []
    for batch in parse_list(args.batch):
        for prompt in parse_list(args.prompt_len):
            for output in parse_list(args.output_len):
                hf_p, hf_d = transformers_case(model, torch, batch, prompt, output, args.device,
                                               vocab, args.seed)
                sy_p, sy_d = switchyard_case(args, batch, prompt, output)
                rows.append(dict(batch=batch, prompt_len=prompt, output_len=output,
                                 transformers_prefill_tok_s=hf_p, switchyard_prefill_tok_s=sy_p,
                                 transformers_decode_tok_s=hf_d, switchyard_decode_tok_s=sy_d))
                print(f"  {batch:>5} {prompt:>6} {output:>6} {hf_p:>11.1f} {sy_p:>11.1f} "
                      f"{sy_p / hf_p:>6.2f} {hf_d:>10.1f} {sy_d:>10.1f} {sy_d / hf_d:>6.2f}")
                sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
