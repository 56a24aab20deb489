#!/usr/bin/env bash
# `switchyard bench all-to-all` under mpirun -n 2 and -n 3: the table has its columns and one row
# per size (1 .. 64 tokens, doubling), every #wrong is 0, the verdict is "all correct", and the
# --json file parses with the same rows. Also bf16 rows, a sweep that starts at an odd size, and
# a clear error (no hang) for a layout with too few experts.
# Usage: mpi_bench_all_to_all_test.sh SWITCHYARD_BINARY WORK_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# check_run TAG N N_ROWS FLAGS...: runs the benchmark on N ranks and checks its table and JSON.
check_run() {
  local tag=$1 n=$2 n_rows=$3
  shift 3
  local out=$work/$tag.out json=$work/$tag.json
  if ! timeout 120 mpirun -n "$n" "$bin" bench all-to-all --json "$json" "$@" >"$out" 2>"$work/$tag.err"; then
    echo "  $tag: exited non-zero: $(tail -3 "$work/$tag.err")"
    return 1
  fi
  grep -q "^# world $n rank(s), backend mpi" "$out" || { echo "  $tag: no header line"; return 1; }
  for col in bytes tokens dtype time_us algbw_GB/s busbw_GB/s '#wrong'; do
    grep '^#' "$out" | grep -qF -- " $col" || { echo "  $tag: no column $col"; return 1; }
  done
  # Rows: 7 fields, the last (#wrong) 0.
  awk -v want="$n_rows" '
    !/^#/ { rows++; if (NF != 7) { print "  bad row: " $0; bad++ } else if ($7 != 0) { print "  wrong: " $0; bad++ } }
    END { if (rows != want) { print "  " rows " rows, expected " want; bad++ } exit bad != 0 }' "$out" ||
    { echo "  $tag: bad table"; cat "$out"; return 1; }
  grep -q '^# avg bus bandwidth: [0-9.]* GB/s$' "$out" || { echo "  $tag: no average line"; return 1; }
  grep -q '^# all correct$' "$out" || { echo "  $tag: no verdict"; return 1; }
  python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$json" || { echo "  $tag: JSON does not parse"; return 1; }
  python3 - "$json" "$n" "$n_rows" <<'PY' || { echo "  $tag: JSON content"; return 1; }
import json, sys
d = json.load(open(sys.argv[1]))
assert d["benchmark"] == "all-to-all" and d["world"] == int(sys.argv[2]), d
assert len(d["rows"]) == int(sys.argv[3]), len(d["rows"])
for r in d["rows"]:
    assert set(r) >= {"bytes", "tokens", "dtype", "time_us", "algbw_gbps", "busbw_gbps", "n_wrong"}, r
    assert r["n_wrong"] == 0 and r["time_us"] > 0, r
    assert r["bytes"] == r["tokens"] * d["top_k"] * d["hidden"] * (4 if r["dtype"] == "f32" else 2), r
assert d["n_wrong"] == 0
PY
}

small=(--max-tokens 64 --hidden 256 --iters 3 --warmup 1)
check "n2 f32" check_run n2 2 7 "${small[@]}"
check "n3 f32" check_run n3 3 7 "${small[@]}"
check "n3 bf16" check_run n3_bf16 3 7 "${small[@]}" --dtype bf16
check "n2 odd sizes" check_run n2_odd 2 3 --min-tokens 3 --max-tokens 20 --hidden 19 --top-k 3 \
  --experts 5 --iters 2 --seed 7

# Too few experts for the ranks: a clear error on every rank, non-zero exit, no hang.
few_experts() {
  if timeout 60 mpirun -n 3 "$bin" bench all-to-all --experts 2 --top-k 1 --max-tokens 4 \
      >/dev/null 2>"$work/few.err"; then
    echo "  --experts 2 on 3 ranks was accepted"; return 1
  fi
  grep -q -- "--experts 2 is fewer than the 3 ranks" "$work/few.err" ||
    { echo "  no clear error: $(head -2 "$work/few.err")"; return 1; }
}
check "too few experts" few_experts

summary "mpi bench all-to-all"
