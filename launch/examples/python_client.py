#!/usr/bin/env python3
"""An example client of the switchyard gRPC API in Python (grpcio).

Generate the stubs first, then point PYTHONPATH (or --stubs) at them:

    launch/examples/gen_python_stubs.sh /tmp/switchyard-stubs
    python3 launch/examples/python_client.py --stubs /tmp/switchyard-stubs \\
        --target 127.0.0.1:50051 generate --prompt "The switchyard at dawn" --max-tokens 32

Subcommands:
    generate   streams the text as it is generated, then prints the finish reason and usage
    tokenize   prints the ids and pieces of a text
    info       prints the model, the rank layout and the server's load
    health     prints the standard health status (SERVING / NOT_SERVING)

A call that fails prints "CODE: message" on stderr and exits 1.
"""
import argparse
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    p.add_argument("--stubs", help="directory of the generated stubs (else PYTHONPATH)")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream generated text")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (BOS is added)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, e.g. 1,2,3")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]; 0 = off")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]; 0 = off")
    g.add_argument("--seed", type=int, help="sampling seed (default: the server picks one)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID:BIAS",
                   help="added to a token's logit, in [-100, 100] (repeatable)")
    g.add_argument("--min-tokens", type=int, default=0,
                   help="tokens before an end-of-sequence token or a stop may end generation")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--deadline-s", type=float, help="deadline of the call in seconds")
    g.add_argument("--print-ids", action="store_true", help="print the generated ids")
    g.add_argument("--n", type=int, default=1,
                   help="completions of the prompt (seed + i each); above 1 each is printed "
                        "whole when it ends")
    t = sub.add_parser("tokenize", help="text to token ids")
    t.add_argument("--text", required=True)
    t.add_argument("--add-bos", action="store_true")
    sub.add_parser("info", help="model, layout and server load")
    sub.add_parser("health", help="SERVING or NOT_SERVING")
    return p.parse_args()


def generate(stub, pb, args):
    request = pb.GenerateRequest(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        n=args.n,
        min_tokens=args.min_tokens,
    )
    for item in args.logit_bias:
        token, _, bias = item.partition(":")
        request.logit_bias[int(token)] = float(bias)
    if args.prompt is not None:
        request.text = args.prompt
    else:
        request.token_ids.ids.extend(int(i) for i in args.prompt_ids.split(","))
    if args.seed is not None:
        request.seed = args.seed
    streaming = args.n <= 1
    texts, ids = {}, {}
    # One message per step that produced text for a completion (message.index); each
    # completion's last message carries its finish reason and usage.
    for message in stub.Generate(request, timeout=args.deadline_s):
        i = message.index
        texts[i] = texts.get(i, "") + message.text
        ids.setdefault(i, []).extend(message.token_ids)
        if streaming:
            sys.stdout.write(message.text)
            sys.stdout.flush()
        if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            if streaming:
                print()
            else:
                print(f"[completion {i}]\n{texts[i]}")
            summary(pb, message, ids[i], args.print_ids)


def summary(pb, last, ids, print_ids):
    if print_ids:
        print("ids:", " ".join(str(i) for i in ids))
    u = last.usage
    reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    print(f"finish: {reason}, prompt tokens: {u.prompt_tokens}, "
          f"completion tokens: {u.completion_tokens} (cached prompt tokens: "
          f"{u.cached_prompt_tokens}), first token: "
          f"{u.time_to_first_token_ms:.1f} ms, total: {u.total_time_ms:.1f} ms")


def tokenize(stub, pb, args):
    r = stub.Tokenize(pb.TokenizeRequest(text=args.text, add_bos=args.add_bos), timeout=30)
    print("ids:", ",".join(str(i) for i in r.ids))
    print("pieces:", " ".join(r.pieces))


def info(stub, pb, args):
    m = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    print(f"model {m.model_path}: {m.num_hidden_layers} layers, hidden {m.hidden_size}, "
          f"{m.num_local_experts} experts (top-{m.num_experts_per_tok}), vocab {m.vocab_size}, "
          f"context {m.context_limit_tokens} tokens")
    print(f"layout: world {m.world_size}, tp {m.tp}, ep {m.ep}, {m.moe_exchange}, {m.device}")
    for r in m.ranks:
        print(f"  rank {r.rank}: heads [{r.first_head}, {r.first_head + r.n_heads}), "
              f"experts {list(r.experts)}")
    s = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    print(f"server: {s.running_requests} running, {s.queue_depth} queued, KV blocks "
          f"{s.kv_blocks_used}/{s.kv_blocks_total} ({s.kv_blocks_cached} cached), "
          f"{s.recent_tokens_per_second:.1f} tok/s, "
          f"{s.requests_completed} completed, {s.requests_cancelled} cancelled, "
          f"{s.requests_deadline_exceeded} past their deadline, {s.steps} steps, "
          f"prefix cache {s.prefix_cache_hit_tokens}/{s.prefix_cache_queried_tokens} tokens, "
          f"{'draining' if s.draining else 'admitting'}")


def health(channel):
    import health_pb2
    import health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    print(name)
    return 0 if name == "SERVING" else 1


def main():
    args = parse_args()
    if args.stubs:
        sys.path.insert(0, args.stubs)
    import grpc
    from switchyard.v1 import switchyard_pb2 as pb
    from switchyard.v1 import switchyard_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.SwitchyardStub(channel)
        try:
            if args.command == "generate":
                generate(stub, pb, args)
            elif args.command == "tokenize":
                tokenize(stub, pb, args)
            elif args.command == "info":
                info(stub, pb, args)
            elif args.command == "health":
                return health(channel)
        except grpc.RpcError as e:
            sys.stdout.flush()
            print(f"{e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
