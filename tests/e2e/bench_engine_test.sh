#!/usr/bin/env bash
# `switchyard bench engine` on one rank and under mpirun -n 2: the throughput table, the phase
# split, the collective bytes and the expert load are printed; the JSON has one sample per case
# with consistent fields; synthetic weights need no files. Usage: bench_engine_test.sh BIN WORK_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
"$bin" make-tiny-model --out "$work/m" --layers 2 --hidden-size 64 --intermediate-size 96 \
  --heads 4 --kv-heads 2 --head-dim 16 --vocab-size 320 >/dev/null || exit 1

json_ok() {  # json_ok FILE N_SAMPLES N_LAYERS
  /usr/bin/python3 - "$@" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["samples"]
assert len(s) == int(sys.argv[2]), len(s)
for x in s:
    assert x["prefill_tok_s"] > 0 and x["decode_tok_s"] > 0, x
    assert set(x["phases"]) == {"attention", "router", "dispatch", "expert", "combine", "other"}
    assert len(x["expert_tokens"]) == int(sys.argv[3])
    # every timed prefill and decode token is routed to its top-2 experts once, over all ranks
    routed = sum(sum(layer) for layer in x["expert_tokens"]) / len(x["expert_tokens"])
    want = 2 * x["batch"] * (x["prompt_len"] + x["output_len"])
    assert routed == want, (routed, want)
PY
}

out=$("$bin" bench engine --model "$work/m" --batch 1,3 --prompt-len 5,17 --output-len 4 \
      --json "$work/one.json" 2>/dev/null)
check "one rank exit 0" test $? -eq 0
check "table header" grep -q "prefill_tok/s  *decode_tok/s  *step_ms" <<<"$out"
check "four rows" test "$(grep -cE '^ +[0-9]+ +[0-9]+ +[0-9]+ +[0-9.]+' <<<"$out")" -ge 4
check "phase split" grep -q "^  expert " <<<"$out"
check "one rank json" json_ok "$work/one.json" 4 2

out=$(mpirun -n 2 "$bin" bench engine --model "$work/m" --batch 1,4 --prompt-len 9 --output-len 3 \
      --moe-exchange all-to-all --json "$work/two.json" 2>/dev/null)
check "two ranks exit 0" test $? -eq 0
check "dispatch bytes" grep -qE "^  dispatch +[1-9]" <<<"$out"
check "two ranks json" json_ok "$work/two.json" 2 2
check "one table" test "$(grep -c 'bench engine:' <<<"$out")" -eq 1
# The default auto exchange: decode steps take the all-gather path (expert-group all-reduce).
out=$(mpirun -n 2 "$bin" bench engine --model "$work/m" --batch 2 --prompt-len 9 --output-len 3 \
      2>/dev/null)
check "auto decodes by all-gather" grep -qE "^  ep_reduce +[1-9]" <<<"$out"
check "auto does not dispatch decode rows" grep -qE "^  dispatch +0$" <<<"$out"

out=$(mpirun -n 2 "$bin" bench engine --synthetic mixtral-8x7b --layers 1 --batch 1 --prompt-len 2 \
      --output-len 1 --moe-exchange all-gather 2>&1)
check "synthetic 8x7b layer" grep -q "mixtral-8x7b (synthetic), 1 of 32 layers" <<<"$out"
check "bad flag" bash -c "! '$bin' bench engine --model '$work/m' --batch 0 2>/dev/null"

summary "bench engine"
