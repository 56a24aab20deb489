#!/usr/bin/env bash
# `switchyard bench engine --device cuda` on the CUDA emulator's build of the program, the path
# launch/gpu_check takes on a GPU: on one rank every timed decode step is a graph launch (the
# untimed warm-up records them); on 2 ranks sharing the device (MPI host staging) the steps run
# eagerly and the auto exchange decodes by all-gather (the experts' partial sums all-reduced, no
# rows dispatched). Given --mem-bandwidth-gbs and --peak-gflops nothing is measured (a 4096^3 GEMM takes minutes on the emulator), and the header says so.
# Usage: emu_bench_engine_test.sh SWITCHYARD_BINARY WORK_DIR SWITCHYARD_EMU_BINARY
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
emu=$3
"$bin" make-tiny-model --out "$work/m" --layers 2 --hidden-size 64 --intermediate-size 96 \
  --heads 4 --kv-heads 2 --head-dim 16 --vocab-size 320 >/dev/null || exit 1
given=(--mem-bandwidth-gbs 3350 --peak-gflops 989000)

json_ok() {  # json_ok FILE N_SAMPLES GRAPH_STEPS_PER_SAMPLE
  /usr/bin/python3 - "$@" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["samples"]
assert len(s) == int(sys.argv[2]), len(s)
assert d["memory_bandwidth_gbs"] == 3350 and d["peak_gflops"] == 989000, d
for x in s:
    assert x["prefill_tok_s"] > 0 and x["decode_tok_s"] > 0, x
    graphs = int(sys.argv[3]) if sys.argv[3] != "all" else x["output_len"]
    assert x["decode_graph_steps"] == graphs, (x["decode_graph_steps"], graphs)
    routed = sum(sum(layer) for layer in x["expert_tokens"]) / len(x["expert_tokens"])
    want = 2 * x["batch"] * (x["prompt_len"] + x["output_len"])
    assert routed == want, (routed, want)
PY
}

out=$("$emu" bench engine --model "$work/m" --device cuda --batch 1,5 --prompt-len 7 \
      --output-len 3 "${given[@]}" --json "$work/one.json" 2>"$work/one.err")
check "one rank exit 0" test $? -eq 0 || tail -3 "$work/one.err"
check "names the emulated device" grep -q "cuda:0 CUDA emulator" <<<"$out"
check "figures given, not measured" grep -q "memory 3350.0 GB/s (given).*(given; all ranks)" <<<"$out"
check "two rows, every decode step a graph" \
  test "$(grep -cE '^ +[0-9]+ +7 +3 +.* 100%$' <<<"$out")" -eq 2
check "one rank json" json_ok "$work/one.json" 2 all

out=$(mpirun -n 2 "$emu" bench engine --model "$work/m" --device cuda --batch 2 --prompt-len 40 \
      --output-len 3 "${given[@]}" --json "$work/two.json" 2>"$work/two.err")
check "two ranks on one device exit 0" test $? -eq 0 || tail -3 "$work/two.err"
check "host staging" grep -q "mpi" <<<"$(grep 'bench engine:' <<<"$out")"
check "decode all-reduces expert sums" grep -qE "^  ep_reduce +[1-9]" <<<"$out"
check "decode dispatches nothing" grep -qE "^  dispatch +0$" <<<"$out"
check "two ranks json (host staging records no graph)" json_ok "$work/two.json" 1 0

check "negative peak refused" bash -c \
  "'$emu' bench engine --model '$work/m' --peak-gflops -1 2>&1 | grep -q 'peak-gflops -1 must be >= 0'"

summary "bench engine on the CUDA emulator"
