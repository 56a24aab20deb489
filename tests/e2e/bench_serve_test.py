#!/usr/bin/python3
"""End-to-end test of `switchyard bench serve` against `mpirun -n 2 switchyard serve`.

Starts the server on a tiny model on a free port (always killed at the end), then runs

  bench serve --concurrency 1,4 --duration-s 3 --warmup-s 1 --prompt-len 8 --output-len 8 --json F
  bench serve --rate 20 --duration-s 3 --warmup-s 1 --prompt-len 8 --output-len 8 --channels 3
  bench serve --concurrency 2 --duration-s 3 --warmup-s 1 --prompt-len 40 --output-len 8
              --shared-prefix-len 32
  bench serve --endpoint openai --concurrency 1,4 ... (the HTTP API, a shared prefix of 32)

and checks: both tables carry their columns, every sweep value has completed > 0 and 0 errors,
each request in the JSON received exactly output-len tokens, percentiles are ordered
(p50 <= p90 <= p99); with --channels 3 the bench process holds 3 TCP connections to the server
while it measures (1 without); --channels 0 and a shared prefix longer than the shortest
prompt are refused; with a shared prefix of two whole KV blocks, the server reports most prompt
tokens as cached (the `cached` column and the JSON) and without one none. If matplotlib
imports, launch/plot_bench.py must write PNG files for the serve JSON and for a
`bench engine --json` file.

Usage: bench_serve_test.py --bin SWITCHYARD --work DIR [--ranks N]
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from e2e_common import MPI_ENV, ROOT, check, descendants, free_port, tally

MODEL_FLAGS = ["--seed", "11", "--layers", "2", "--hidden-size", "64", "--intermediate-size", "96",
               "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--vocab-size", "320",
               "--shard-mib", "0.25"]
OUTPUT_LEN = 8


def kill_job(proc):
    for pid in descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


def wait_serving(bin_path, target, proc, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        r = subprocess.run([bin_path, "client", "--target", target, "--timeout-s", "2", "health"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if r.returncode == 0 and "SERVING" in r.stdout:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the server was not SERVING after {timeout} s")


def rows_of(table_text):
    """Data rows (not # lines) of bench serve's output, split into the two tables."""
    tables, current = [], None
    for line in table_text.splitlines():
        if line.startswith("#"):
            if current:
                tables.append(current)
                current = None
            continue
        if current is None:
            current = []
        current.append(line.split())
    if current:
        tables.append(current)
    return tables


def check_output(name, out, n_values):
    for column in ["completed", "req/s", "tok/s", "ttft_p50", "ttft_p99", "tpot_mean", "tpot_p99",
                   "itl_p50", "itl_p99", "e2e_p90", "goodput", "errors", "cached",
                   "errors_by_code"]:
        check(f"{name}: column {column}", f" {column}" in out)
    tables = rows_of(out)
    if not check(f"{name}: two tables of {n_values} rows", len(tables) == 2 and
                 all(len(t) == n_values for t in tables), str(tables)):
        return
    for row in tables[0]:
        check(f"{name}: load {row[0]}: completed > 0", int(row[1]) > 0, str(row))
        ttft = [float(v) for v in row[5:8]]
        tpot = [float(v) for v in row[9:12]]
        check(f"{name}: load {row[0]}: table TTFT and TPOT p50 <= p90 <= p99",
              ttft == sorted(ttft) and tpot == sorted(tpot), str(row))
    for row in tables[1]:
        check(f"{name}: load {row[0]}: errors == 0", int(row[8]) == 0 and row[11] == "-", str(row))
    return tables


def check_json(path, values):
    with open(path) as f:
        data = json.load(f)
    runs = data["runs"]
    check("json: one run per value", [r["value"] for r in runs] == values, str(runs)[:200])
    for r in runs:
        tag = f"json {r['mode']} {r['value']:g}"
        samples = r["samples"]
        check(f"{tag}: samples == completed > 0", len(samples) == r["completed"] > 0,
              f"{len(samples)} samples, completed {r['completed']}")
        check(f"{tag}: no errors", not r["errors"] and all(s["status"] == "OK" for s in samples),
              str(r["errors"]))
        check(f"{tag}: every request got {OUTPUT_LEN} tokens",
              all(s["tokens"] == OUTPUT_LEN for s in samples),
              str(sorted({s["tokens"] for s in samples})))
        check(f"{tag}: itl has tokens - 1 gaps at most",
              all(len(s["itl_ms"]) <= s["tokens"] - 1 for s in samples))
        check(f"{tag}: ttft <= e2e", all(0 < s["ttft_ms"] <= s["e2e_ms"] for s in samples))
        for key in ["ttft_ms", "tpot_ms", "e2e_ms", "itl_ms"]:
            st = r[key]
            check(f"{tag}: {key} p50 <= p90 <= p99", st["p50"] <= st["p90"] <= st["p99"], str(st))


def connections(pid, port):
    """Established TCP connections of process `pid` to `port` (its sockets in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    for table in ["/proc/net/tcp", "/proc/net/tcp6"]:
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                remote_port = int(cols[2].split(":")[1], 16)
                if cols[3] == "01" and remote_port == port and cols[9] in inodes:
                    n += 1
    return n


def run_bench(args, target, extra, name, prompt_len=8):
    """Runs bench serve; returns its stdout and the most connections it held to the server."""
    cmd = [args.bin, "bench", "serve", "--target", target, "--prompt-len", str(prompt_len),
           "--output-len",
           str(OUTPUT_LEN), "--warmup-s", "1", "--duration-s", "3"] + extra
    print(f"# {name}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = int(target.rsplit(":", 1)[1])
    most = 0
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        try:
            most = max(most, connections(proc.pid, port))
        except OSError:  # the process ended meanwhile
            pass
        time.sleep(0.2)
    try:
        out, err = proc.communicate(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    print(out, end="", flush=True)
    check(f"{name}: exit 0", proc.returncode == 0, err[-500:])
    check(f"{name}: progress on stderr", "measuring" in err, err[-300:])
    return out, most


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True, help="the switchyard program")
    p.add_argument("--work", required=True, help="scratch directory (emptied)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--timeout", type=float, default=150, help="seconds before giving up")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    model = os.path.join(args.work, "model")
    subprocess.run([args.bin, "make-tiny-model", "--out", model] + MODEL_FLAGS, check=True,
                   stdout=subprocess.DEVNULL)

    def give_up(signum, frame):
        raise TimeoutError(f"ran past {args.timeout} s")

    signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, args.timeout)
    t0 = time.time()
    target = f"127.0.0.1:{free_port()}"
    http_target = f"127.0.0.1:{free_port()}"
    err = open(os.path.join(args.work, "serve.err"), "w")
    server = subprocess.Popen(["mpirun", "-n", str(args.ranks), "--oversubscribe", args.bin,
                               "serve", "--model", model, "--listen", target,
                               "--http-listen", http_target],
                              stdout=err, stderr=err, env=dict(os.environ, **MPI_ENV),
                              start_new_session=True)
    try:
        wait_serving(args.bin, target, server)
        serve_json = os.path.join(args.work, "serve.json")
        out, most = run_bench(args, target, ["--concurrency", "1,4", "--json", serve_json],
                              "concurrency")
        tables = check_output("concurrency", out, 2)
        check("random prompts: nothing cached",
              tables is not None and all(float(row[10]) == 0 for row in tables[1]), out)
        check_json(serve_json, [1, 4])
        check("one channel: one connection", most == 1, f"{most} connections")
        out, most = run_bench(args, target, ["--rate", "20", "--seed", "3", "--channels", "3"],
                              "rate")
        check_output("rate", out, 1)
        check("three channels: three connections", most == 3, f"{most} connections")
        check("three channels: in the header", "seed 3, 3 channels" in out)
        # Prompts of 40 tokens whose first 32 (two KV blocks of 16) are shared: all but the first
        # request find them in the prefix cache.
        prefix_json = os.path.join(args.work, "prefix.json")
        out, _ = run_bench(args, target, ["--concurrency", "2", "--shared-prefix-len", "32",
                                          "--json", prefix_json], "shared prefix", prompt_len=40)
        tables = check_output("shared prefix", out, 1)
        check("shared prefix: in the header", "every prompt's first 32 shared" in out)
        check("shared prefix: most prompt tokens cached",
              tables is not None and float(tables[1][0][10]) > 60, out)
        with open(prefix_json) as f:
            run = json.load(f)["runs"][0]
        check("shared prefix json: 32 cached tokens per request, the first excepted",
              sum(s["cached_tokens"] == 32 for s in run["samples"]) >= len(run["samples"]) - 1 and
              run["cached_prompt_tokens"] == sum(s["cached_tokens"] for s in run["samples"]),
              str([s["cached_tokens"] for s in run["samples"]][:20]))
        check("shared prefix json: the run's preemptions are its requests'",
              run["preemptions"] == sum(s["preemptions"] for s in run["samples"]), str(run)[:300])
        # The same load over the OpenAI-compatible HTTP API: the same tables, 8 tokens a
        # request counted from the streamed token ids, the cached prompt tokens from the usage.
        http_json = os.path.join(args.work, "http.json")
        out, _ = run_bench(args, http_target, ["--endpoint", "openai", "--concurrency", "1,4",
                                               "--shared-prefix-len", "32", "--json", http_json],
                           "openai endpoint", prompt_len=40)
        tables = check_output("openai endpoint", out, 2)
        with open(http_json) as f:
            http_runs = json.load(f)
        check("openai endpoint: the header names it", http_runs.get("endpoint") == "openai")
        samples = [x for run in http_runs["runs"] for x in run["samples"]]
        check("openai endpoint: every request 8 tokens, no errors",
              samples and all(x["status"] == "OK" and x["tokens"] == OUTPUT_LEN for x in samples),
              str(samples[:3]))
        check("openai endpoint: cached prompt tokens from the usage chunk",
              sum(x["cached_tokens"] == 32 for x in samples) >= len(samples) - 1,
              str([x["cached_tokens"] for x in samples][:20]))
        r = subprocess.run([args.bin, "bench", "serve", "--target", target, "--rate", "1",
                            "--endpoint", "soap"], capture_output=True, text=True, timeout=30)
        check("--endpoint soap refused", r.returncode != 0 and
              "--endpoint 'soap' must be grpc or openai" in r.stderr, r.stderr[-300:])
        r = subprocess.run([args.bin, "bench", "serve", "--target", target, "--rate", "1",
                            "--channels", "0"], capture_output=True, text=True, timeout=30)
        check("--channels 0 refused", r.returncode != 0 and "--channels 0 must be in" in r.stderr,
              r.stderr[-300:])
        r = subprocess.run([args.bin, "bench", "serve", "--target", target, "--rate", "1",
                            "--prompt-len-range", "20:60", "--shared-prefix-len", "32"],
                           capture_output=True, text=True, timeout=30)
        check("a shared prefix longer than the shortest prompt refused",
              r.returncode != 0 and
              "--shared-prefix-len 32 is longer than the shortest prompt (20 tokens)" in r.stderr,
              r.stderr[-300:])

        try:
            import matplotlib  # noqa: F401
            have_matplotlib = True
        except ImportError:
            have_matplotlib = False
            print("# matplotlib does not import: plot_bench.py not checked", flush=True)
        if have_matplotlib:
            engine_json = os.path.join(args.work, "engine.json")
            r = subprocess.run([args.bin, "bench", "engine", "--model", model, "--batch", "1,2",
                                "--prompt-len", "4", "--output-len", "2", "--json", engine_json],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OPENBLAS_NUM_THREADS="1"), timeout=60)
            check("bench engine --json: exit 0", r.returncode == 0, r.stderr[-300:])
            plots = os.path.join(args.work, "plots")
            r = subprocess.run([sys.executable, os.path.join(ROOT, "launch/plot_bench.py"),
                                serve_json, engine_json, "--out", plots],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               timeout=60)
            check("plot_bench.py: exit 0", r.returncode == 0, r.stderr[-500:])
            for png in ["serve-latency.png", "engine-throughput.png", "engine-expert-load.png"]:
                path = os.path.join(plots, png)
                ok = os.path.exists(path) and os.path.getsize(path) > 1000
                if ok:
                    with open(path, "rb") as f:
                        ok = f.read(8) == b"\x89PNG\r\n\x1a\n"
                check(f"plot_bench.py writes {png}", ok)
    except Exception as e:  # one failure, after cleanup
        check("ran to the end", False, f"{type(e).__name__}: {e}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        kill_job(server)
        err.close()
    print(f"bench serve: {tally.n_pass} passed, {tally.n_fail} failed "
          f"({time.time() - t0:.1f} s)", flush=True)
    os._exit(0 if tally.ok() else 1)


if __name__ == "__main__":
    main()
