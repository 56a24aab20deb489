#!/usr/bin/python3
"""End-to-end tests of the OpenAI-compatible HTTP API of `switchyard serve` under mpirun, with
the `openai` Python client (PyPI, from launch/pyenv's venv) against a live server.

  completions, streamed and not: the same tokens as gRPC for the same greedy request; n=3
  (choice i is the request with seed + i); logprobs; stream_options.include_usage; echo
  chat completions with the tiny model's Mixtral-Instruct template, streamed and not, logprobs
  64 concurrent streams, each equal to the same request alone
  a client that leaves mid-stream: its KV blocks are freed (visible in /metrics)
  malformed JSON, wrong types, an oversize body, an unknown model, a bad key: the JSON errors,
  and the server keeps serving
  the ranks' reports: with the all-to-all exchange the expert counts summed over the ranks are
  every forwarded token top-k times per layer; each rank's step times; exchange bytes
  /metrics: promtool check metrics (clean with --metrics-prefix switchyard_; with the default
  switchyard: prefix its only complaint is the colon), and a real Prometheus server scrapes it

Usage: openai_test.py --bin SWITCHYARD --ranks N --work DIR
"""
import os
import sys

try:
    import openai
except ImportError:  # the system python: go on in the test venv
    py = os.environ.get("SWITCHYARD_TEST_PYTHON") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
        "switchyard/test-venv/bin/python")
    if os.path.exists(py) and not os.environ.get("SWITCHYARD_IN_TEST_VENV"):
        os.environ["SWITCHYARD_IN_TEST_VENV"] = "1"
        os.execv(py, [py] + sys.argv)
    print("openai_test.py needs the openai package: run launch/pyenv (launch/test does)")
    sys.exit(1)

import argparse
import concurrent.futures
import http.client
import json
import socket
import subprocess
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_test as st  # noqa: E402
from e2e_common import check, free_port, tally  # noqa: E402

KEY = "test-key-7f3a"
MODEL = "tiny-mixtral"


def log(message):
    print(message, flush=True)


class HttpServer(st.Server):
    """The gRPC test server with the HTTP API on a second free port."""

    def __init__(self, args, name, extra=()):
        self.http_port = free_port()
        super().__init__(args, name, ["--http-listen", f"127.0.0.1:{self.http_port}",
                                      "--served-model-name", MODEL, "--api-key", KEY,
                                      "--max-context", "2304", "--kv-blocks", "160",
                                      *extra])
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0,
                                    timeout=60)

    def raw(self, method, path, body=None, headers=None):
        """(status, headers, body bytes) of one request, without the client's checks."""
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        h = {"Authorization": f"Bearer {KEY}"}
        h.update(headers or {})
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        out = (r.status, dict(r.getheaders()), r.read())
        c.close()
        return out

    def metrics(self):
        return self.raw("GET", "/metrics")[2].decode()


def metric(text, name):
    """The value of the first sample of `name` (any labels) in exposition `text`."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def grpc_ids(s, ids, max_tokens):
    r = st.generate(s.stub, st.ids_request(ids, max_tokens, ignore_eos=True), timeout=60)
    return r.ids if r.code == st.grpc.StatusCode.OK else None


def completion_ids(s, prompt, max_tokens, **kw):
    r = s.client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                    temperature=kw.pop("temperature", 0),
                                    extra_body={"ignore_eos": True, "return_token_ids": True,
                                                **kw.pop("extra_body", {})}, **kw)
    return r


def stream_ids(s, prompt, max_tokens):
    ids, text, finish = [], "", None
    stream = s.client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                         temperature=0, stream=True,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    for chunk in stream:
        for c in chunk.choices:
            ids += getattr(c, "token_ids", None) or []
            text += c.text
            finish = c.finish_reason or finish
    return ids, text, finish


def check_completions(s):
    prompt = [1, 21, 34, 55]
    want = grpc_ids(s, prompt, 20)
    r = completion_ids(s, prompt, 20)
    got = r.choices[0].token_ids
    check("completions: the same tokens as gRPC (greedy)", got == want, f"{got} vs {want}")
    check("completions: object, id, usage", r.object == "text_completion" and
          r.id.startswith("cmpl-") and r.usage.completion_tokens == 20 and
          r.usage.prompt_tokens == 4 and r.usage.total_tokens == 24, str(r.usage))
    check("completions: finish_reason length", r.choices[0].finish_reason == "length")
    ids, text, finish = stream_ids(s, prompt, 20)
    check("completions streamed: the same tokens and text", ids == want and
          text == r.choices[0].text and finish == "length", f"{ids} {finish}")

    # include_usage: a last chunk with no choices and the usage; the others carry usage null.
    chunks = list(s.client.completions.create(model=MODEL, prompt="the yard", max_tokens=6,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    last = chunks[-1]
    check("include_usage: the usage chunk is last", last.choices == [] and last.usage is not None
          and last.usage.completion_tokens == 6 and all(c.usage is None for c in chunks[:-1]),
          str(last))

    # n=3: choice i is the request with n=1 and seed + i.
    r3 = s.client.completions.create(model=MODEL, prompt="the yard", max_tokens=8, n=3, seed=40,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
    alone = [s.client.completions.create(model=MODEL, prompt="the yard", max_tokens=8,
                                         seed=40 + i, extra_body={"ignore_eos": True,
                                                                  "return_token_ids": True})
             for i in range(3)]
    check("n=3: three choices, indexed", sorted(c.index for c in r3.choices) == [0, 1, 2])
    check("n=3: choice i equals seed + i alone",
          [c.token_ids for c in sorted(r3.choices, key=lambda c: c.index)] ==
          [a.choices[0].token_ids for a in alone])
    check("n=3: usage counts the prompt once", r3.usage.completion_tokens == 24 and
          r3.usage.prompt_tokens == alone[0].usage.prompt_tokens)

    # logprobs: one entry per token, the chosen token among at most k + 1.
    rl = s.client.completions.create(model=MODEL, prompt="the yard", max_tokens=5, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    lp = rl.choices[0].logprobs
    check("logprobs: one per token", len(lp.tokens) == 5 and len(lp.token_logprobs) == 5 and
          len(lp.top_logprobs) == 5 and len(lp.text_offset) == 5, str(lp))
    check("logprobs: top entries and the chosen one, greedy picks the top",
          all(2 <= len(t) <= 3 and lp.tokens[i] in t and
              abs(max(t.values()) - lp.token_logprobs[i]) < 1e-4
              for i, t in enumerate(lp.top_logprobs)), str(lp.top_logprobs))
    re_ = s.client.completions.create(model=MODEL, prompt="the yard", max_tokens=3, temperature=0,
                                      echo=True, logprobs=1, extra_body={"ignore_eos": True})
    n_prompt = re_.usage.prompt_tokens
    elp = re_.choices[0].logprobs
    check("echo: the prompt's text first, its logprobs (the first null)",
          re_.choices[0].text.startswith("the yard") and len(elp.tokens) == n_prompt + 3 and
          elp.token_logprobs[0] is None and all(v is not None for v in elp.token_logprobs[1:]),
          str(elp))


def check_chat(s):
    messages = [{"role": "user", "content": "the yard"}]
    r = s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
    m = r.choices[0].message
    check("chat: object, role, usage", r.object == "chat.completion" and
          r.id.startswith("chatcmpl-") and m.role == "assistant" and
          r.usage.completion_tokens == 8, str(r))
    tok = json.loads(s.raw("POST", "/tokenize", json.dumps({"messages": messages}))[2])
    ids = tok["tokens"]
    check("chat: the template's prompt: BOS once, [INST] ... [/INST]",
          ids[0] == 1 and ids.count(1) == 1 and r.usage.prompt_tokens == len(ids), str(ids))
    want = grpc_ids(s, ids, 8)
    rc = s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                          temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
    check("chat: the same tokens as gRPC on the rendered prompt",
          rc.choices[0].token_ids == want, f"{rc.choices[0].token_ids} vs {want}")
    text, roles, finish = "", [], None
    for chunk in s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                                  temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    check("chat streamed: a role chunk, the same text", roles == ["assistant"] and
          text == m.content and finish == "length", f"{roles} {text!r} {m.content!r}")
    rl = s.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True})
    content = rl.choices[0].logprobs.content
    check("chat logprobs: one per token with 3 alternatives and bytes",
          len(content) == 4 and all(len(c.top_logprobs) == 3 and c.bytes is not None
                                    for c in content), str(content))
    try:
        s.client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
        check("chat: roles that do not alternate are refused", False)
    except openai.BadRequestError as e:
        check("chat: roles that do not alternate are refused (400, the template's message)",
              "alternate" in str(e.body), str(e.body))


def check_concurrent(s):
    prompts = [[1, 10 + i, 40 + i % 7] for i in range(64)]
    alone = [completion_ids(s, p, 16).choices[0].token_ids for p in prompts]

    def one(i):
        return stream_ids(s, prompts[i], 16)[0]

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        got = list(pool.map(one, range(64)))
    wrong = [i for i in range(64) if got[i] != alone[i]]
    check("64 concurrent streams: each equal to the same request alone", not wrong,
          f"{len(wrong)} differ, e.g. {wrong[:3]}")


def check_disconnect(s):
    body = json.dumps({"model": MODEL, "prompt": [1, 77, 78], "max_tokens": st.LONG,
                       "stream": True, "ignore_eos": True})
    sock = socket.create_connection(("127.0.0.1", s.http_port), timeout=30)
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                  + body).encode())
    seen = b""
    while b"data: " not in seen:
        got = sock.recv(4096)
        if not got or seen.startswith(b"HTTP/1.1 4"):
            break
        seen += got
    check("disconnect: the stream started", b"data: " in seen, seen[:300])
    m = s.metrics()
    check("disconnect: the stream runs (num_requests_running 1, KV in use)",
          metric(m, "switchyard:num_requests_running") == 1 and
          metric(m, "switchyard:kv_cache_usage_perc") > 0, m[:400])
    steps0 = s.info().steps
    sock.close()
    st.wait_kv_idle(s, steps0, "disconnect", st.LONG // 2)
    m = s.metrics()
    check("disconnect: /metrics shows the KV freed and nothing running",
          metric(m, "switchyard:num_requests_running") == 0 and
          metric(m, "switchyard:kv_cache_usage_perc") == 0 and
          metric(m, 'switchyard:request_success_total{model_name="tiny-mixtral",'
                    'finished_reason="abort"}') >= 1, m[:600])


def check_errors(s):
    def error(status, body, **kw):
        code, headers, data = s.raw("POST", "/v1/completions", body, **kw)
        try:
            e = json.loads(data)["error"]
        except (ValueError, KeyError):
            e = None
        ok = (code == status and e is not None and {"message", "type", "param", "code"} <= set(e)
              and headers.get("Content-Type") == "application/json")
        return ok, f"{code} {data[:200]!r}"

    check("malformed JSON: 400 JSON error", *error(400, b'{"prompt": '))
    check("oversize body: 413 JSON error", *error(413, b" " * (9 << 20)))
    try:
        s.client.completions.create(model=MODEL, prompt="a", max_tokens=4,
                                    extra_body={"temperature": "hot"})
        check("wrong type: 400", False)
    except openai.BadRequestError as e:
        check("wrong type: 400 naming the field", e.status_code == 400 and
              e.body.get("param") == "temperature", str(e.body))
    try:
        s.client.completions.create(model="gpt-4", prompt="a", max_tokens=4)
        check("unknown model: 404", False)
    except openai.NotFoundError as e:
        check("unknown model: 404 model_not_found", e.body.get("code") == "model_not_found")
    try:
        openai.OpenAI(base_url=s.base + "/v1", api_key="wrong", max_retries=0).models.list()
        check("bad key: 401", False)
    except openai.AuthenticationError as e:
        check("bad key: 401", e.status_code == 401)
    models = s.client.models.list()
    check("/v1/models lists the served name", [m.id for m in models.data] == [MODEL])
    r = s.client.completions.create(model=MODEL, prompt="a", max_tokens=4,
                                    extra_body={"ignore_eos": True})
    check("after the errors, the server serves on", r.usage.completion_tokens == 4)
    check("/health 200", s.raw("GET", "/health")[0] == 200)


def promtool(text):
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True)
    return p.returncode, [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]


def check_promtool_colon(s):
    code, problems = promtool(s.metrics())
    check("promtool: with the switchyard: prefix, only the colon is flagged",
          code != 1 and problems and
          all("metric names should not contain ':'" in p for p in problems), str(problems[:5]))


def check_prometheus(s, args):
    code, problems = promtool(s.metrics())
    check("promtool check metrics passes (switchyard_ prefix)", code == 0 and not problems,
          str(problems[:5]))
    port = free_port()
    work = tempfile.mkdtemp(dir=args.work)
    config = os.path.join(work, "prometheus.yml")
    with open(config, "w") as f:
        f.write("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: switchyard\n"
                f"    static_configs:\n      - targets: ['127.0.0.1:{s.http_port}']\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={config}",
                             f"--storage.tsdb.path={work}/tsdb",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "err"), "w"))
    value, health = None, None
    try:
        end = time.time() + 60
        while time.time() < end and value is None:
            time.sleep(0.5)
            try:
                q = urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/query?query="
                    "switchyard_generation_tokens_total", timeout=5)
                result = json.loads(q.read())["data"]["result"]
                if result and float(result[0]["value"][1]) > 0:
                    value = float(result[0]["value"][1])
                t = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5)
                health = json.loads(t.read())["data"]["activeTargets"][0]["health"]
            except (OSError, ValueError, KeyError, IndexError):
                pass
    finally:
        prom.kill()
        prom.wait()
    check("a Prometheus server scrapes /metrics", value is not None and health == "up",
          f"value {value}, target {health}")


def check_rank_reports(s, args):
    """With the all-to-all exchange each rank counts the tokens it routes: only the ranks'
    reports summed give every forwarded token top-k times per layer (reported every step here,
    --metrics-interval-s 0)."""
    for i in range(4):
        s.client.completions.create(model=MODEL, prompt=f"yard {i}", max_tokens=6,
                                    extra_body={"ignore_eos": True})
    m = s.metrics()
    p = "switchyard_"
    finished = sum(metric(m, f'{p}request_success_total{{model_name="{MODEL}",'
                             f'finished_reason="{r}"}}') or 0
                   for r in ("stop", "length", "abort", "error"))
    forwarded = metric(m, p + "prompt_tokens_total") + metric(m, p + "generation_tokens_total") \
        - finished
    routed = {}
    for line in m.splitlines():
        if line.startswith(p + "expert_tokens_total{"):
            layer = int(line.split('layer="')[1].split('"')[0])
            routed[layer] = routed.get(layer, 0) + float(line.rsplit(" ", 1)[1])
    check("rank reports: every layer routed each forwarded token top-2 times, over the ranks",
          len(routed) == 2 and all(v == 2 * forwarded for v in routed.values()),
          f"routed {routed}, forwarded {forwarded}")
    ranks = {line.split('rank="')[1].split('"')[0] for line in m.splitlines()
             if line.startswith(p + "step_seconds_count{")}
    check("rank reports: every rank's forward-pass times", ranks == {str(r) for r in
                                                                     range(args.ranks)}, str(ranks))
    check("rank reports: exchange bytes and seconds",
          metric(m, p + "moe_exchange_bytes_total") > 0 and
          metric(m, p + "moe_exchange_seconds_total") > 0, m[-1500:])
    check("rank reports: imbalance per layer at least 1",
          all(float(line.rsplit(" ", 1)[1]) >= 1 for line in m.splitlines()
              if line.startswith(p + "expert_load_imbalance{")))


def scenario_openai(args):
    s = HttpServer(args, "openai")
    try:
        s.find_ranks(args.ranks)
        s.wait_serving()
        for part in (check_completions, check_chat, check_concurrent, check_disconnect,
                     check_errors, check_promtool_colon):
            t0 = time.time()
            part(s)
            log(f"  {part.__name__}: {time.time() - t0:.1f} s")
    finally:
        s.kill()
    p = HttpServer(args, "prometheus", ["--metrics-prefix", "switchyard_", "--moe-exchange",
                                        "all-to-all", "--metrics-interval-s", "0"])
    try:
        p.wait_serving()
        p.client.completions.create(model=MODEL, prompt="a", max_tokens=3)
        check_rank_reports(p, args)
        check_prometheus(p, args)
    finally:
        p.kill()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True, help="the switchyard program")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", required=True, help="scratch directory (emptied)")
    p.add_argument("--timeout", type=float, default=240, help="seconds before giving up")
    p.add_argument("--server-args", default="", help="more flags for serve")
    args = p.parse_args()
    args.scenario = "openai"
    st.prepare(args)
    st.run_scenario(args, scenario_openai)


if __name__ == "__main__":
    main()
