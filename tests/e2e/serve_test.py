#!/usr/bin/python3
"""End-to-end tests of `switchyard serve` under mpirun, driven through the gRPC API (grpcio).

Each scenario starts `mpirun -n N switchyard serve` on a tiny model on a free port, runs its
checks, and always kills every process of the job at the end. Python stubs are generated into
the work directory with launch/examples/gen_python_stubs.sh.

  basic      health SERVING, model info, tokenize round trip, 64 concurrent greedy streams equal
             to the same requests served alone, the Python example client, the C++ client,
             presence and frequency penalties through the API and the client, a
             second server on the same port fails cleanly
  faults     cancel, a deadline and a killed client mid-stream: CANCELLED / DEADLINE_EXCEEDED,
             the KV blocks free long before the request's end and a later request succeeds; validation errors
             are INVALID_ARGUMENT naming the field; stop strings
  queue      --max-running 1 --max-queue-requests Q: of Q + X requests sent at once, exactly X
             are refused with RESOURCE_EXHAUSTED at once and the others complete; a request of
             priority 0 preempts a running one of priority 1 and finishes first
  drain      SIGTERM to rank 0 with requests in flight: health NOT_SERVING and new requests
             UNAVAILABLE while draining, the requests finish in full, every rank exits 0
  grace      SIGTERM with a request longer than --grace-period-s: it ends UNAVAILABLE when the
             grace period ends, and every rank exits 0
  rank_kill  SIGKILL to a non-zero rank mid-generation: open streams end UNAVAILABLE, every
             process is gone within 10 s, mpirun exits non-zero

Usage: serve_test.py SCENARIO --bin SWITCHYARD --ranks N --work DIR
"""
import argparse
import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

from e2e_common import MPI_ENV, ROOT, check, children, free_port, tally

VOCAB = 320
MODEL_FLAGS = ["--seed", "11", "--layers", "2", "--hidden-size", "64", "--intermediate-size", "96",
               "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--vocab-size", str(VOCAB),
               "--max-position", "32768", "--sliding-window", "64", "--shard-mib", "0.25"]

grpc = pb = pb_grpc = health_pb2 = health_pb2_grpc = None  # imported once the stubs exist


def log(message):
    print(message, flush=True)


# ---- processes ----------------------------------------------------------------------------------

def world_rank(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                    return int(item.split(b"=", 1)[1])
    except OSError:
        pass
    return None


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    """`mpirun -n N switchyard serve` on a free port; kill() ends every process of the job."""

    def __init__(self, args, name, extra):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.name = name
        self.err_path = os.path.join(args.work, f"{name}.err")
        cmd = ["mpirun", "-n", str(args.ranks), "--oversubscribe", args.bin, "serve", "--model",
               args.model, "--listen", self.target] + args.layout + args.server_args + extra
        log(f"# {name}: {' '.join(cmd[4:])}")
        self.out = open(os.path.join(args.work, f"{name}.out"), "w")
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, env=args.env,
                                     start_new_session=True)
        self.ranks = {}  # world rank -> pid
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.SwitchyardStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def stderr_tail(self, n=6):
        with open(self.err_path) as f:
            return " | ".join(f.read().strip().splitlines()[-n:])

    def find_ranks(self, n, timeout=30):
        end = time.time() + timeout
        while time.time() < end and len(self.ranks) < n:
            for pid in children(self.proc.pid):
                r = world_rank(pid)
                if r is not None:
                    self.ranks[r] = pid
            time.sleep(0.05)
        return self.ranks

    def health_status(self, service=""):
        try:
            r = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        except grpc.RpcError as e:
            return e.code().name

    def wait_serving(self, timeout=90):
        end = time.time() + timeout
        seen = []
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{self.stderr_tail()}")
            status = self.health_status()
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == "SERVING":
                return seen
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not SERVING after {timeout} s (saw {seen}): "
                           f"{self.stderr_tail()}")

    def info(self):
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        pids = set(self.ranks.values()) | set(children(self.proc.pid))
        for pid in pids | {self.proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait()
        self.channel.close()
        self.out.close()
        self.err.close()


# ---- requests -----------------------------------------------------------------------------------

class Result:
    def __init__(self):
        self.ids = []  # every message's, in arrival order (completion 0's when n = 1)
        self.completions = {}  # index -> [ids, finish, usage] of each completion
        self.text = ""
        self.finish = None
        self.usage = None
        self.code = None
        self.details = ""
        self.n_messages = 0
        self.elapsed = 0.0


def generate(stub, request, timeout=None, on_message=None):
    """Runs one Generate call to its end; never raises for an RPC error."""
    r = Result()
    t0 = time.time()
    call = stub.Generate(request, timeout=timeout)
    try:
        for m in call:
            r.n_messages += 1
            r.ids.extend(m.token_ids)
            r.text += m.text
            c = r.completions.setdefault(m.index, [[], None, None])
            c[0].extend(m.token_ids)
            if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                r.finish = pb.FinishReason.Name(m.finish_reason)
                r.usage = m.usage
                c[1], c[2] = r.finish, m.usage
            if on_message is not None:
                on_message(call, r)
        r.code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        r.code = e.code()
        r.details = e.details() or ""
    r.elapsed = time.time() - t0
    return r


def ids_request(ids, max_tokens, **kw):
    req = pb.GenerateRequest(max_tokens=max_tokens, **kw)
    req.token_ids.ids.extend(ids)
    return req


def wait_kv_idle(server, steps0, name, max_steps, timeout=10):
    """Polls until no KV block is used; checks it took at most max_steps steps after steps0.

    A cancel reaches the engine through the transport, so on a loaded machine it can take
    thousands of this tiny model's sub-millisecond steps; the bounds only ask for an end long
    before the request's own (the engine's unit tests cancel without a transport)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        s = server.info()
        if s.kv_blocks_used == 0 and s.running_requests == 0:
            log(f"  {name}: KV blocks free {s.steps - steps0} steps and "
                f"{1000 * (time.time() - t0):.0f} ms later")
            return check(f"{name}: KV blocks free within {max_steps} steps",
                         s.steps - steps0 <= max_steps, f"{s.steps - steps0} steps")
        time.sleep(0.002)
    s = server.info()
    return check(f"{name}: KV blocks free", False,
                 f"still {s.kv_blocks_used} blocks, {s.running_requests} running after {timeout} s")


def counted(server, before, name, completed=0, cancelled=0, deadline_exceeded=0):
    """Checks how many requests ended, by reason, since the ServerInfo `before`; returns now's."""
    now = server.info()
    got = (now.requests_completed - before.requests_completed,
           now.requests_cancelled - before.requests_cancelled,
           now.requests_deadline_exceeded - before.requests_deadline_exceeded)
    check(f"{name}: ended requests counted (completed, cancelled, deadline exceeded)",
          got == (completed, cancelled, deadline_exceeded),
          f"{got}, expected {(completed, cancelled, deadline_exceeded)}")
    return now


def still_works(server, name):
    r = generate(server.stub, ids_request([1, 5, 9], 4, ignore_eos=True), timeout=30)
    check(f"{name}: a later request succeeds", r.code == grpc.StatusCode.OK and len(r.ids) == 4,
          f"{r.code} {r.details} {len(r.ids)} ids")


LONG = 2000  # tokens of a generation that outlasts whatever a test does meanwhile
# Tokens of a request that a cancel or a killed client ends (context 32768): the transport brings
# either to the engine, which on a loaded machine has taken thousands of steps.
ENDED_EARLY = 32000


def start_long_streams(s, n, first_id, timeout):
    """Starts n LONG greedy streams; returns (threads, results) once each has its first token."""
    started = threading.Barrier(n + 1)
    results = [None] * n

    def run(i):
        flag = []

        def on_message(call, r):
            if not flag:
                flag.append(1)
                started.wait()

        results[i] = generate(s.stub, ids_request([1, first_id + i], LONG, ignore_eos=True),
                              timeout=timeout, on_message=on_message)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    return threads, results


# ---- scenarios ----------------------------------------------------------------------------------

def scenario_basic(args):
    s = Server(args, "basic", ["--max-context", "2304", "--kv-blocks", "48"])
    try:
        seen = s.wait_serving()
        log(f"  health while starting: {' -> '.join(seen)}")
        check("health of the service name", s.health_status("switchyard.v1.Switchyard") ==
              "SERVING")
        # Server reflection lists the services (grpcurl relies on it). The request is written
        # by hand: ServerReflectionRequest{list_services: ""} is field 7, an empty string.
        reflect = s.channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            listed = b"".join(reflect(iter([b"\x3a\x00"]), timeout=10))
        except grpc.RpcError as e:
            listed = str(e).encode()
        check("reflection lists the services", b"switchyard.v1.Switchyard" in listed and
              b"grpc.health.v1.Health" in listed, repr(listed[:200]))
        for flag in args.server_args:  # --weights=T: the start-up table names the held type
            if flag.startswith("--weights="):
                want = "experts " + flag.split("=", 1)[1].upper()
                with open(s.err_path) as f:
                    check(f"weights held as {want}", want in f.read(), s.stderr_tail())
        m = s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        check("model info", m.world_size == args.ranks and len(m.ranks) == args.ranks and
              m.vocab_size == VOCAB and m.num_hidden_layers == 2 and
              sorted(e for r in m.ranks for e in r.experts)[:8] == list(range(8)), str(m))
        t = s.stub.Tokenize(pb.TokenizeRequest(text="the yard at dawn", add_bos=True), timeout=10)
        d = s.stub.Detokenize(pb.DetokenizeRequest(ids=t.ids), timeout=10)
        check("tokenize round trip", t.ids[0] == 1 and d.text == "the yard at dawn" and
              len(t.pieces) == len(t.ids), f"{list(t.ids)} -> {d.text!r}")

        # 64 greedy requests of mixed prompt lengths and max_tokens, alone and then together.
        rng = random.Random(5)
        requests = []
        for i in range(64):
            n_prompt = rng.choice([1, 2, 3, 7, 16, 17, 31, 45, 60]) if i % 3 else rng.randint(1, 60)
            max_tokens = rng.randint(1, 40)
            if i % 8 == 7:
                req = pb.GenerateRequest(text="the yard " * rng.randint(1, 6), max_tokens=max_tokens)
            else:
                req = ids_request([rng.randrange(3, VOCAB) for _ in range(n_prompt)], max_tokens,
                                  ignore_eos=i % 2 == 0)
            requests.append(req)
        t0 = time.time()
        alone = [generate(s.stub, req, timeout=60) for req in requests]
        t_alone = time.time() - t0
        check("alone: all OK", all(r.code == grpc.StatusCode.OK for r in alone),
              str([(r.code, r.details) for r in alone if r.code != grpc.StatusCode.OK][:3]))
        busiest = [0]
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                try:
                    busiest[0] = max(busiest[0], s.info().running_requests)
                except grpc.RpcError:
                    pass
                time.sleep(0.002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            together = list(pool.map(lambda req: generate(s.stub, req, timeout=120), requests))
        t_together = time.time() - t0
        stop.set()
        watcher.join()
        bad = [i for i in range(64) if (alone[i].ids, alone[i].text, alone[i].finish) !=
               (together[i].ids, together[i].text, together[i].finish)]
        check("concurrent: all OK", all(r.code == grpc.StatusCode.OK for r in together))
        check("concurrent outputs equal the requests served alone", not bad,
              f"{len(bad)} differ, first #{bad[0] if bad else ''}: "
              f"{alone[bad[0]].ids if bad else ''} vs {together[bad[0]].ids if bad else ''}")
        check("concurrent: batched", busiest[0] > 1, f"at most {busiest[0]} running")
        check("lengths as asked", all(len(r.ids) == req.max_tokens for r, req in
                                      zip(alone, requests) if req.ignore_eos))
        preempted = sum(r.usage.preemptions for r in together if r.usage is not None)
        log(f"  64 requests: {t_alone:.1f} s one by one, {t_together:.1f} s together "
            f"(at most {busiest[0]} running, {preempted} preemptions)")

        # The prefix cache: the same 40-token prompt twice. The second request computes only
        # what follows its two whole blocks of 16 tokens, and gets the same tokens.
        before = s.info()
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(39)]
        first, second = [generate(s.stub, ids_request(prompt, 8, ignore_eos=True), timeout=30)
                         for _ in range(2)]
        after = s.info()
        check("prefix cache: the same tokens", first.code == second.code == grpc.StatusCode.OK and
              first.ids == second.ids and len(first.ids) == 8, f"{first.ids} vs {second.ids}")
        check("prefix cache: 32 prompt tokens cached the second time",
              (first.usage.cached_prompt_tokens, second.usage.cached_prompt_tokens) == (0, 32),
              f"{first.usage.cached_prompt_tokens}, {second.usage.cached_prompt_tokens}")
        check("prefix cache: counted in the server info",
              (after.prefix_cache_queried_tokens - before.prefix_cache_queried_tokens,
               after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens) == (80, 32) and
              after.kv_blocks_cached > 0 and after.kv_blocks_used == 0, str(after))

        # The Python example client prints the tokens the server generates.
        req = ids_request([1, 17, 42], 8, ignore_eos=True)
        ref = generate(s.stub, req, timeout=30)
        p = subprocess.run([sys.executable, os.path.join(ROOT, "launch/examples/python_client.py"),
                            "--stubs", args.stubs, "--target", s.target, "generate",
                            "--prompt-ids", "1,17,42", "--max-tokens", "8", "--ignore-eos",
                            "--print-ids"], capture_output=True, text=True, timeout=60)
        want = "ids: " + " ".join(map(str, ref.ids))
        check("python example client", p.returncode == 0 and want in p.stdout and
              "finish: length" in p.stdout, f"rc {p.returncode}: {p.stdout!r} {p.stderr!r}")
        p = subprocess.run([sys.executable, os.path.join(ROOT, "launch/examples/python_client.py"),
                            "--stubs", args.stubs, "--target", s.target, "info"],
                           capture_output=True, text=True, timeout=60)
        check("python example client info", p.returncode == 0 and
              f"world {args.ranks}" in p.stdout, p.stdout + p.stderr)

        # The C++ client.
        p = subprocess.run([args.bin, "client", "--target", s.target, "generate", "--prompt-ids",
                            "1,17,42", "--max-tokens", "8", "--ignore-eos", "--print-ids"],
                           capture_output=True, text=True, timeout=60)
        check("switchyard client generate", p.returncode == 0 and
              "ids: " + " ".join(map(str, ref.ids)) in p.stdout and
              "finish: length, prompt tokens: 3, completion tokens: 8" in p.stdout,
              f"rc {p.returncode}: {p.stdout!r} {p.stderr!r}")
        # n completions in one call: completion i has the tokens of a call with n = 1 and
        # seed + i; both clients print each one.
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(20)]
        many = generate(s.stub, ids_request(prompt, 8, ignore_eos=True, temperature=0.8, seed=5,
                                            n=3), timeout=60)
        singles = [generate(s.stub, ids_request(prompt, 8, ignore_eos=True, temperature=0.8,
                                                seed=5 + i), timeout=30) for i in range(3)]
        got = [many.completions.get(i, [None])[0] for i in range(3)]
        check("n = 3: completion i is seed + i's", many.code == grpc.StatusCode.OK and
              sorted(many.completions) == [0, 1, 2] and got == [r.ids for r in singles] and
              all(c[1] == "FINISH_REASON_LENGTH" and c[2].completion_tokens == 8
                  for c in many.completions.values()), f"{got} vs {[r.ids for r in singles]}")
        check("n = 3: sampled apart", len({tuple(ids) for ids in got}) > 1, str(got))
        ids_arg = ",".join(map(str, prompt))
        for name, cmd in (("switchyard client", [args.bin, "client"]),
                          ("python example client",
                           [sys.executable, os.path.join(ROOT, "launch/examples/python_client.py"),
                            "--stubs", args.stubs])):
            p = subprocess.run(cmd + ["--target", s.target, "generate", "--prompt-ids", ids_arg,
                                      "--max-tokens", "8", "--ignore-eos", "--print-ids",
                                      "--temperature", "0.8", "--seed", "5", "--n", "3"],
                               capture_output=True, text=True, timeout=60)
            check(f"{name} --n 3", p.returncode == 0 and
                  all(f"[completion {i}]" in p.stdout and
                      "ids: " + " ".join(map(str, singles[i].ids)) in p.stdout for i in range(3))
                  and p.stdout.count("finish: length") == 3,
                  f"rc {p.returncode}: {p.stdout!r} {p.stderr!r}")
        # Prompt logprobs: one per prompt token after the first, on the first message with a
        # token, the same twice (computed afresh each time); the C++ client prints them.
        prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(39)]
        req = ids_request(prompt, 3, ignore_eos=True, prompt_logprobs=2)
        firsts = []
        for _ in range(2):
            first = [m for m in s.stub.Generate(req, timeout=30) if m.token_ids][0]
            firsts.append([(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
                           for lp in first.prompt_logprobs])
        check("prompt logprobs", len(firsts[0]) == 39 and
              [e[0] for e in firsts[0]] == prompt[1:] and firsts[0] == firsts[1] and
              all(len(e[2]) == 2 and e[2][0][1] >= e[1] - 1e-6 for e in firsts[0]),
              str(firsts[0][:3]))
        p = subprocess.run([args.bin, "client", "--target", s.target, "generate", "--prompt-ids",
                            ",".join(map(str, prompt)), "--max-tokens", "3", "--ignore-eos",
                            "--prompt-logprobs", "2"], capture_output=True, text=True, timeout=60)
        lines = p.stdout.split("prompt logprobs (id logprob, then the top ids):\n")[-1]
        check("switchyard client --prompt-logprobs", p.returncode == 0 and
              [int(l.split()[0]) for l in lines.splitlines()[:39]] == prompt[1:],
              f"rc {p.returncode}: {p.stdout[-300:]!r} {p.stderr!r}")
        # Logit biases and min_tokens: +100 on the end-of-sequence token ends generation at once,
        # unless min_tokens holds it back; both clients' flags reach the request.
        eos = json.load(open(os.path.join(args.model, "config.json")))["eos_token_id"]
        forced = generate(s.stub, ids_request([1, 17, 42], 12, logit_bias={eos: 100}),
                          timeout=30)
        held = generate(s.stub, ids_request([1, 17, 42], 12, logit_bias={eos: 100},
                                            min_tokens=3), timeout=30)
        check("logit_bias forces the end token", forced.code == grpc.StatusCode.OK and
              forced.ids == [eos] and forced.finish == "FINISH_REASON_STOP", str(forced.ids))
        check("min_tokens holds it back for 3 tokens", held.code == grpc.StatusCode.OK and
              len(held.ids) == 4 and held.ids[-1] == eos and eos not in held.ids[:3] and
              held.finish == "FINISH_REASON_STOP", str(held.ids))
        for name, cmd in (("switchyard client", [args.bin, "client"]),
                          ("python example client",
                           [sys.executable, os.path.join(ROOT, "launch/examples/python_client.py"),
                            "--stubs", args.stubs])):
            p = subprocess.run(cmd + ["--target", s.target, "generate", "--prompt-ids", "1,17,42",
                                      "--max-tokens", "12", "--print-ids", "--logit-bias",
                                      f"{eos}:100", "--min-tokens", "3"],
                               capture_output=True, text=True, timeout=60)
            check(f"{name} --logit-bias --min-tokens", p.returncode == 0 and
                  "ids: " + " ".join(map(str, held.ids)) in p.stdout,
                  f"rc {p.returncode}: {p.stdout!r} {p.stderr!r}")
        # Presence and frequency penalties: the client's flags reach the request fields, and
        # they change the greedy tokens of a tiny model that repeats itself.
        plain = generate(s.stub, ids_request([1, 17, 42], 24, ignore_eos=True), timeout=30)
        penalised = generate(s.stub, ids_request([1, 17, 42], 24, ignore_eos=True,
                                                 presence_penalty=2, frequency_penalty=1.5),
                             timeout=30)
        check("penalties change the tokens", plain.code == grpc.StatusCode.OK and
              penalised.code == grpc.StatusCode.OK and len(penalised.ids) == 24 and
              penalised.ids != plain.ids, f"{plain.ids} {penalised.ids}")
        p = subprocess.run([args.bin, "client", "--target", s.target, "generate", "--prompt-ids",
                            "1,17,42", "--max-tokens", "24", "--ignore-eos", "--print-ids",
                            "--presence-penalty", "2", "--frequency-penalty", "1.5"],
                           capture_output=True, text=True, timeout=60)
        check("switchyard client penalties", p.returncode == 0 and
              "ids: " + " ".join(map(str, penalised.ids)) in p.stdout,
              f"rc {p.returncode}: {p.stdout!r} {p.stderr!r}")
        p = subprocess.run([sys.executable, os.path.join(ROOT, "launch/examples/python_client.py"),
                            "--stubs", args.stubs, "--target", s.target, "generate",
                            "--prompt-ids", "1,17,42", "--max-tokens", "24", "--ignore-eos",
                            "--print-ids", "--presence-penalty", "2", "--frequency-penalty", "1.5"],
                           capture_output=True, text=True, timeout=60)
        check("python example client penalties", p.returncode == 0 and
              "ids: " + " ".join(map(str, penalised.ids)) in p.stdout,
              f"rc {p.returncode}: {p.stdout!r} {p.stderr!r}")
        p = subprocess.run([args.bin, "client", "--target", s.target, "generate", "--prompt-ids",
                            "1", "--temperature", "-1"], capture_output=True, text=True, timeout=60)
        check("switchyard client error", p.returncode == 1 and
              p.stderr.startswith("INVALID_ARGUMENT: ") and "temperature" in p.stderr,
              f"rc {p.returncode}: {p.stderr!r}")
        p = subprocess.run([args.bin, "client", "--target", s.target, "health"],
                           capture_output=True, text=True, timeout=60)
        check("switchyard client health", p.returncode == 0 and p.stdout.strip() == "SERVING",
              p.stdout + p.stderr)

        # A second server on the same port: a clear error, a non-zero exit, no hang.
        p = subprocess.run(["mpirun", "-n", "1", args.bin, "serve", "--model", args.model,
                            "--listen", s.target], capture_output=True, text=True, timeout=60,
                           env=args.env)
        check("port in use", p.returncode != 0 and f"cannot listen on {s.target}" in p.stderr,
              f"rc {p.returncode}: {p.stderr[-400:]!r}")
        check("the first server still serves", s.health_status() == "SERVING")
    finally:
        s.kill()


def scenario_faults(args):
    s = Server(args, "faults", ["--max-context", "32768", "--kv-blocks", "2560"])
    try:
        s.wait_serving()
        info = s.info()
        check("idle: no KV blocks used", info.kv_blocks_used == 0)
        prompt = [1, 7, 8, 9]
        long_req = ids_request(prompt, LONG, ignore_eos=True)
        early_req = ids_request(prompt, ENDED_EARLY, ignore_eos=True)

        # Cancel mid-stream.
        ended0 = info
        steps0 = [None]

        def cancel_after_5(call, r):
            if r.n_messages == 5:
                call.cancel()
                steps0[0] = s.info().steps

        # The cancel, like a killed client's closed connection below, reaches the engine
        # through the transport: bounded at half a request far longer than that may take.
        r = generate(s.stub, early_req, timeout=120, on_message=cancel_after_5)
        check("cancel: CANCELLED mid-stream", r.code == grpc.StatusCode.CANCELLED and
              5 <= r.n_messages < ENDED_EARLY, f"{r.code} after {r.n_messages} messages")
        if steps0[0] is not None:
            wait_kv_idle(s, steps0[0], "cancel", max_steps=ENDED_EARLY // 2, timeout=60)
        ended0 = counted(s, ended0, "cancel", cancelled=1)
        still_works(s, "cancel")

        # A deadline that expires mid-stream: about a third of the way through a long request
        # at the speed this machine has now.
        t0 = time.time()
        generate(s.stub, ids_request(prompt, 200, ignore_eos=True), timeout=60)
        deadline = max(0.05, (time.time() - t0) * LONG / 200 / 3)
        r = generate(s.stub, long_req, timeout=deadline)
        steps = s.info().steps
        check("deadline: DEADLINE_EXCEEDED mid-stream",
              r.code == grpc.StatusCode.DEADLINE_EXCEEDED and 0 < r.n_messages < LONG,
              f"{r.code} after {r.n_messages} messages, deadline {deadline:.2f} s")
        wait_kv_idle(s, steps, "deadline", max_steps=LONG // 4)
        ended0 = counted(s, ended0, "deadline", completed=2, deadline_exceeded=1)
        still_works(s, "deadline")

        # A client process killed mid-stream.
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import grpc\n"
            "from switchyard.v1 import switchyard_pb2 as pb, switchyard_pb2_grpc as pb_grpc\n"
            "stub = pb_grpc.SwitchyardStub(grpc.insecure_channel(sys.argv[2]))\n"
            f"req = pb.GenerateRequest(max_tokens={ENDED_EARLY}, ignore_eos=True)\n"
            f"req.token_ids.ids.extend({prompt})\n"
            "for m in stub.Generate(req): print(len(m.token_ids), flush=True)\n")
        child = subprocess.Popen([sys.executable, "-c", code, args.stubs, s.target],
                                 stdout=subprocess.PIPE, text=True)
        got = [child.stdout.readline() for _ in range(3)]
        child.kill()
        steps = s.info().steps
        child.wait()
        check("killed client: it was streaming", all(line.strip() for line in got), str(got))
        # The server learns of a killed client only when its transport sees the connection
        # close, milliseconds after the kill; on a loaded 2-core machine that has been 3097 of
        # this tiny model's sub-millisecond steps. The request must end then, cancelled, long
        # before its own end (the bound is five times the slowest seen). The deadline above
        # needs no transport: the engine checks it before every step.
        wait_kv_idle(s, steps, "killed client", max_steps=ENDED_EARLY // 2, timeout=60)
        counted(s, ended0, "killed client", completed=1, cancelled=1)
        still_works(s, "killed client")

        # Validation: INVALID_ARGUMENT naming the field.
        limit = s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).context_limit_tokens
        cases = [
            ("empty prompt", pb.GenerateRequest(text=""), "prompt"),
            ("no prompt", pb.GenerateRequest(max_tokens=4), "prompt"),
            ("empty token_ids", ids_request([], 4), "prompt"),
            ("prompt + max_tokens beyond the context", ids_request([1] * 10, limit - 9),
             "max_tokens"),
            ("temperature -1", ids_request([1], 4, temperature=-1), "temperature"),
            ("top_p 2", ids_request([1], 4, top_p=2), "top_p"),
            ("presence_penalty 2.5", ids_request([1], 4, presence_penalty=2.5),
             "presence_penalty"),
            ("frequency_penalty -3", ids_request([1], 4, frequency_penalty=-3),
             "frequency_penalty"),
            ("unknown token id", ids_request([1, VOCAB], 4), "token_ids"),
            ("huge token id", ids_request([1, 4000000000], 4), "token_ids"),
            ("17 stop strings", ids_request([1], 4, stop=[f"s{i}" for i in range(17)]), "stop"),
            ("logprobs 21", ids_request([1], 4, logprobs=21), "logprobs"),
            ("unknown stop token id", ids_request([1], 4, stop_token_ids=[VOCAB]),
             "stop_token_ids"),
        ]
        for name, req, field in cases:
            r = generate(s.stub, req, timeout=10)
            check(f"validation: {name}", r.code == grpc.StatusCode.INVALID_ARGUMENT and
                  field in r.details and r.n_messages == 0, f"{r.code} {r.details!r}")
        # A prompt of all the context but `tail` tokens, and `tail` more: chunked prefill to
        # the last positions.
        tail = 10
        long_prompt = [1] + [3 + (i * 37) % (VOCAB - 3) for i in range(limit - tail - 1)]
        r = generate(s.stub, ids_request(long_prompt, tail, ignore_eos=True), timeout=120)
        check("exactly the context limit is accepted", r.code == grpc.StatusCode.OK and
              len(r.ids) == tail and r.usage is not None and
              r.usage.prompt_tokens == len(long_prompt), f"{r.code} {r.details} {len(r.ids)}")
        try:
            s.stub.Detokenize(pb.DetokenizeRequest(ids=[1, VOCAB]), timeout=10)
            check("detokenize unknown id", False, "accepted")
        except grpc.RpcError as e:
            check("detokenize unknown id", e.code() == grpc.StatusCode.INVALID_ARGUMENT and
                  "ids" in e.details(), f"{e.code()} {e.details()}")

        # Stop strings end the stream with STOP and are not returned; logprobs come per token.
        ref = generate(s.stub, ids_request([1, 30, 31], 40, ignore_eos=True, logprobs=3))
        check("logprobs", ref.code == grpc.StatusCode.OK and ref.usage is not None)
        text = ref.text
        cuts = [k for k in range(3, len(text) - 1) if text.find(text[k:k + 2]) == k]
        cuts = [k for k in cuts if "\ufffd" not in text[k:k + 2]] or cuts
        if cuts:
            stop = text[cuts[0]:cuts[0] + 2]
            r = generate(s.stub, ids_request([1, 30, 31], 40, ignore_eos=True, stop=[stop]))
            check("stop string", r.code == grpc.StatusCode.OK and r.finish == "FINISH_REASON_STOP"
                  and r.text == text[:cuts[0]] and len(r.ids) < len(ref.ids),
                  f"stop {stop!r}: {r.finish} {r.text!r} vs {text[:cuts[0]]!r}")
        else:
            check("stop string", False, f"no stop string to cut {text!r}")
        check("idle again", s.info().kv_blocks_used == 0)
    finally:
        s.kill()


def scenario_queue(args):
    Q, X = 3, 4
    s = Server(args, "queue", ["--max-context", "2304", "--max-running", "1",
                               "--max-queue-requests", str(Q), "--kv-blocks", "256",
                               "--no-prefix-cache"])
    try:
        s.wait_serving()
        first = threading.Event()
        blocker_result = []

        def blocker():
            blocker_result.append(generate(s.stub, ids_request([1, 2], LONG, ignore_eos=True),
                                           timeout=120, on_message=lambda c, r: first.set()))

        tb = threading.Thread(target=blocker)
        tb.start()
        check("blocker started", first.wait(30))
        barrier = threading.Barrier(Q + X)

        def one(i):
            barrier.wait()
            return generate(s.stub, ids_request([1, 3 + i], 12, ignore_eos=True), timeout=120)

        with concurrent.futures.ThreadPoolExecutor(Q + X) as pool:
            results = list(pool.map(one, range(Q + X)))
        refused = [r for r in results if r.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        done = [r for r in results if r.code == grpc.StatusCode.OK]
        check(f"exactly {X} of {Q + X} refused", len(refused) == X and len(done) == Q,
              str([(r.code, r.details) for r in results]))
        check("refused at once", all(r.elapsed < 2 and r.n_messages == 0 for r in refused),
              str([r.elapsed for r in refused]))
        check("refusal names the queue", all("queue" in r.details for r in refused),
              refused[0].details if refused else "")
        check("accepted ones complete", all(len(r.ids) == 12 for r in done))
        tb.join()
        check("blocker completes", blocker_result and blocker_result[0].code ==
              grpc.StatusCode.OK and len(blocker_result[0].ids) == LONG)
        # Priority: with the one running slot taken by a long request of priority 1, one of
        # priority 0 preempts it and finishes first; the long one is recomputed and still gives
        # the tokens it gave alone.
        first.clear()
        low_result = []

        def low():
            low_result.append(generate(s.stub, ids_request([1, 2], LONG, ignore_eos=True,
                                                           priority=1),
                                       timeout=120, on_message=lambda c, r: first.set()))

        tl = threading.Thread(target=low)
        tl.start()
        check("priority: the long request started", first.wait(30))
        urgent = generate(s.stub, ids_request([1, 3], 12, ignore_eos=True), timeout=60)
        still_running = tl.is_alive()
        tl.join()
        check("priority: the urgent request finishes first", urgent.code == grpc.StatusCode.OK
              and len(urgent.ids) == 12 and urgent.usage.preemptions == 0 and still_running,
              f"{urgent.code} {urgent.details} alive {still_running}")
        check("priority: the preempted one ends with its tokens alone", low_result and
              low_result[0].code == grpc.StatusCode.OK and
              low_result[0].ids == blocker_result[0].ids and low_result[0].usage.preemptions == 1,
              str(low_result[0].usage) if low_result else "no result")
        # --no-prefix-cache: the same prompt twice computes everything twice.
        prompt = [1] + list(range(3, 42))
        twice = [generate(s.stub, ids_request(prompt, 4, ignore_eos=True), timeout=30)
                 for _ in range(2)]
        info = s.info()
        check("no prefix cache: nothing cached", twice[0].ids == twice[1].ids and
              all(r.code == grpc.StatusCode.OK and r.usage.cached_prompt_tokens == 0
                  for r in twice) and info.prefix_cache_hit_tokens == 0 and
              info.kv_blocks_cached == 0 and info.prefix_cache_queried_tokens > 0, str(info))
    finally:
        s.kill()


def scenario_drain(args):
    s = Server(args, "drain", ["--max-context", "2304", "--kv-blocks", "1024"])
    try:
        s.wait_serving()
        ranks = s.find_ranks(args.ranks)
        n = 4
        threads, results = start_long_streams(s, n, 10, timeout=120)
        os.kill(ranks[0], signal.SIGTERM)
        t0 = time.time()
        status = None
        while time.time() - t0 < 10:
            status = s.health_status()
            if status != "SERVING":
                break
            time.sleep(0.01)
        check("health NOT_SERVING while draining", status == "NOT_SERVING", str(status))
        r = generate(s.stub, ids_request([1], 4), timeout=10)
        check("new requests UNAVAILABLE while draining", r.code == grpc.StatusCode.UNAVAILABLE,
              f"{r.code} {r.details}")
        try:
            check("server info says draining", s.info().draining)
        except grpc.RpcError as e:
            check("server info says draining", False, str(e))
        busy = any(t.is_alive() for t in threads)
        check("requests still running after the checks", busy)
        for t in threads:
            t.join()
        check("in-flight requests finish in full", all(
            r.code == grpc.StatusCode.OK and len(r.ids) == LONG and
            r.finish == "FINISH_REASON_LENGTH" for r in results),
            str([(r.code, r.details, len(r.ids)) for r in results]))
        rc = s.wait_exit(30)
        check("mpirun exits 0", rc == 0, f"rc {rc}: {s.stderr_tail()}")
        check("every rank exited", not any(alive(p) for p in ranks.values()))
    finally:
        s.kill()


def scenario_grace(args):
    s = Server(args, "grace", ["--max-context", "4096", "--kv-blocks", "256",
                               "--grace-period-s", "0.3"])
    try:
        s.wait_serving()
        ranks = s.find_ranks(args.ranks)
        first = threading.Event()
        result = []
        req = ids_request([1, 2], 4000, ignore_eos=True)
        t = threading.Thread(target=lambda: result.append(
            generate(s.stub, req, timeout=120, on_message=lambda c, r: first.set())))
        t.start()
        first.wait(30)
        os.kill(ranks[0], signal.SIGTERM)
        t0 = time.time()
        t.join()
        r = result[0]
        check("past the grace period: UNAVAILABLE", r.code == grpc.StatusCode.UNAVAILABLE and
              len(r.ids) < 4000, f"{r.code} {r.details} {len(r.ids)} ids")
        check("stopped about when the grace period ended", 0.2 < time.time() - t0 < 5,
              f"{time.time() - t0:.1f} s")
        rc = s.wait_exit(30)
        check("mpirun exits 0", rc == 0, f"rc {rc}: {s.stderr_tail()}")
    finally:
        s.kill()


def scenario_rank_kill(args):
    s = Server(args, "rank_kill", ["--max-context", "2304", "--kv-blocks", "1024"])
    try:
        s.wait_serving()
        ranks = s.find_ranks(args.ranks)
        check("found every rank", len(ranks) == args.ranks, str(ranks))
        n = 3
        threads, results = start_long_streams(s, n, 20, timeout=60)
        victim = args.ranks - 1
        os.kill(ranks[victim], signal.SIGKILL)
        t0 = time.time()
        rc = s.wait_exit(15)
        while time.time() - t0 < 10 and any(alive(p) for p in ranks.values()):
            time.sleep(0.05)
        gone = time.time() - t0
        left = [p for p in ranks.values() if alive(p)]
        check("every process gone within 10 s", rc is not None and not left and gone <= 10,
              f"{gone:.1f} s, left {left}")
        log(f"  the job ended {gone:.1f} s after the kill")
        check("mpirun exits non-zero", rc not in (None, 0), f"rc {rc}")
        for t in threads:
            t.join(timeout=30)
        check("open streams end UNAVAILABLE", all(
            r is not None and r.code == grpc.StatusCode.UNAVAILABLE and len(r.ids) < LONG
            for r in results), str([(r.code, r.details, len(r.ids)) for r in results if r]))
        log(f"  statuses: {[(r.code.name, r.details[:60]) for r in results if r]}")
    finally:
        s.kill()


def scenario_loading(args):
    """Health is NOT_SERVING while the ranks load their weights, then SERVING."""
    big = os.path.join(args.work, "big")
    subprocess.run([args.bin, "make-tiny-model", "--out", big, "--layers", "8", "--hidden-size",
                    "512", "--intermediate-size", "2048", "--vocab-size", str(VOCAB), "--dtype",
                    "f32", "--shard-mib", "64"], check=True, stdout=subprocess.DEVNULL)
    args.model = big
    s = Server(args, "loading", [])
    try:
        # A fresh channel per poll: a channel refused while the port was closed backs off for a
        # second or more, longer than the load takes.
        seen = []
        end = time.time() + 90
        while time.time() < end and (not seen or seen[-1] != "SERVING"):
            with grpc.insecure_channel(s.target) as channel:
                try:
                    r = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                except grpc.RpcError as e:
                    status = e.code().name
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.02)
        log(f"  health while starting: {' -> '.join(seen)}")
        check("NOT_SERVING while loading, then SERVING",
              "NOT_SERVING" in seen and seen[-1] == "SERVING" and
              seen.index("NOT_SERVING") < len(seen) - 1, " -> ".join(seen))
        still_works(s, "after loading")
    finally:
        s.kill()


SCENARIOS = {"basic": scenario_basic, "loading": scenario_loading, "faults": scenario_faults, "queue": scenario_queue,
             "drain": scenario_drain, "grace": scenario_grace, "rank_kill": scenario_rank_kill}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--bin", required=True, help="the switchyard program")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", required=True, help="scratch directory (emptied)")
    p.add_argument("--timeout", type=float, default=170, help="seconds before giving up")
    p.add_argument("--server-args", default="", help="more flags for serve (e.g. the device)")
    args = p.parse_args()
    prepare(args)
    run_scenario(args, SCENARIOS[args.scenario])


def prepare(args):
    """The work directory, the MPI environment, the gRPC stubs and the tiny model."""
    args.server_args = args.server_args.split()
    # 4 ranks split attention over 2 (the tiny model has 2 KV heads) to cover tensor parallelism.
    args.layout = ["--tp", "2"] if args.ranks % 2 == 0 and args.ranks >= 4 else []
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    args.env = dict(os.environ, **MPI_ENV)
    args.stubs = os.path.join(args.work, "stubs")
    subprocess.run([os.path.join(ROOT, "launch/examples/gen_python_stubs.sh"), args.stubs],
                   check=True, stdout=subprocess.DEVNULL)
    sys.path.insert(0, args.stubs)
    global grpc, pb, pb_grpc, health_pb2, health_pb2_grpc
    import grpc as grpc_module
    from switchyard.v1 import switchyard_pb2, switchyard_pb2_grpc
    import health_pb2 as h
    import health_pb2_grpc as hg
    grpc, pb, pb_grpc, health_pb2, health_pb2_grpc = (grpc_module, switchyard_pb2,
                                                       switchyard_pb2_grpc, h, hg)
    args.model = os.path.join(args.work, "model")
    subprocess.run([args.bin, "make-tiny-model", "--out", args.model] + MODEL_FLAGS, check=True,
                   stdout=subprocess.DEVNULL)


def run_scenario(args, scenario):
    """Runs `scenario` under the time limit, prints the tally and exits."""
    def give_up(signum, frame):
        raise TimeoutError(f"scenario {args.scenario} ran past {args.timeout} s")

    signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, args.timeout)
    t0 = time.time()
    try:
        scenario(args)
    except Exception as e:  # a scenario that cannot go on is one failure, after cleanup
        check(f"{args.scenario} ran to the end", False, f"{type(e).__name__}: {e}")
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(f"serve {args.scenario} on {args.ranks} ranks: {tally.n_pass} passed, "
          f"{tally.n_fail} failed "
          f"({time.time() - t0:.1f} s)", flush=True)
    # grpc's threads may still be winding down; nothing is left to clean up.
    os._exit(0 if tally.ok() else 1)


if __name__ == "__main__":
    main()
