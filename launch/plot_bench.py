#!/usr/bin/python3
"""Plots of switchyard benchmark JSON files, as PNG files.

  plot_bench.py FILE.json [FILE.json ...] --out DIR

The plots are chosen by what a file holds:

  bench engine --json   throughput against batch (prefill and decode tok/s, one line per prompt
                        and output length), and a heatmap of the tokens routed to each expert of
                        each layer (summed over the samples)
  bench serve --json    TTFT, TPOT and end-to-end latency (p50 and p99) against the request rate
                        or the concurrency

Each PNG is named after the input file and the plot, e.g. run-throughput.png. Prints the paths
written, one a line. Needs matplotlib (Debian: python3-matplotlib).
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def save(fig, out_dir, stem, name):
    path = os.path.join(out_dir, f"{stem}-{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(path)
    return path


def engine_plots(data, out_dir, stem):
    samples = data["samples"]
    title = f"{os.path.basename(str(data.get('model', '')))}, world {data.get('world', 1)}"
    paths = []
    # One line per (prompt_len, output_len): tok/s against batch.
    groups = {}
    for s in samples:
        groups.setdefault((s.get("prompt_len"), s.get("output_len")), []).append(s)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (prompt, output), group in sorted(groups.items(), key=lambda kv: str(kv[0])):
        group = sorted(group, key=lambda s: s["batch"])
        batch = [s["batch"] for s in group]
        axes[0].plot(batch, [s["prefill_tok_s"] for s in group], "o-", label=f"prompt {prompt}")
        axes[1].plot(batch, [s["decode_tok_s"] for s in group], "o-",
                     label=f"prompt {prompt}, output {output}")
    for ax, what in zip(axes, ["prefill", "decode"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (sequences per step)")
        ax.set_ylabel(f"{what} throughput (tok/s)")
        ax.set_title(f"{what}: {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(save(fig, out_dir, stem, "throughput"))

    # Expert load: tokens routed per [layer][expert], summed over the samples.
    load = None
    for s in samples:
        e = s.get("expert_tokens")
        if not e:
            continue
        if load is None:
            load = [[0.0] * len(row) for row in e]
        for l, row in enumerate(e):
            for x, v in enumerate(row):
                load[l][x] += v
    if load:
        n_layers, n_experts = len(load), len(load[0])
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * n_experts + 2), max(3, 0.35 * n_layers + 1.5)))
        im = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_experts))
        ax.set_yticks(range(n_layers))
        ax.set_title(f"tokens routed per expert (prefill + decode, all samples)\n{title}",
                     fontsize=9)
        fig.colorbar(im, ax=ax, label="tokens")
        paths.append(save(fig, out_dir, stem, "expert-load"))
    return paths


def serve_plots(data, out_dir, stem):
    runs = sorted(data["runs"], key=lambda r: r["value"])
    mode = data.get("mode", runs[0]["mode"])
    xlabel = "request rate (req/s, Poisson)" if mode == "rate" else "concurrency (requests in flight)"
    x = [r["value"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, name in zip(axes, ["ttft_ms", "tpot_ms", "e2e_ms"],
                             ["time to first token", "time per output token",
                              "end-to-end latency"]):
        for q, style in [("p50", "o-"), ("p99", "s--")]:
            ax.plot(x, [r[key][q] for r in runs], style, label=q)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(name)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
        if mode != "rate" and len(x) > 1 and max(x) / max(min(x), 1e-9) >= 8:
            ax.set_xscale("log", base=2)
    fig.suptitle(f"bench serve: {data.get('target', '')}, {os.path.basename(str(data.get('model', '')))}",
                 fontsize=10)
    return [save(fig, out_dir, stem, "latency")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="JSON written by bench engine or bench serve --json")
    p.add_argument("--out", default=".", help="directory for the PNG files (made if missing)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    status = 0
    for path in args.files:
        with open(path) as f:
            data = json.load(f)
        stem = os.path.splitext(os.path.basename(path))[0]
        if data.get("benchmark") == "serve" or "runs" in data:
            serve_plots(data, args.out, stem)
        elif "samples" in data and data["samples"] and "decode_tok_s" in data["samples"][0]:
            engine_plots(data, args.out, stem)
        else:
            print(f"{path}: neither bench engine nor bench serve JSON", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
