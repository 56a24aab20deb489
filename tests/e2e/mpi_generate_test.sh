#!/usr/bin/env bash
# `switchyard generate` under mpirun on the built-in tiny model architecture: for layouts of
# 1, 2, 3, 4 and 8 ranks (tp up to 8, ep, both MoE exchanges) the greedy ids equal the single-rank
# run and the prompt logits are within 1e-4 of its row maxima. Prompts of 1 and 40 tokens (one
# token on four or eight ranks leaves most ranks with nothing). A bad layout fails cleanly.
# Usage: mpi_generate_test.sh SWITCHYARD_BINARY WORK_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
"$bin" make-tiny-model --out "$work/m" --seed 3 --layers 2 --hidden-size 64 --intermediate-size 80 \
  --heads 8 --kv-heads 8 --head-dim 8 --vocab-size 320 --sliding-window 16 >/dev/null || exit 1

run() {  # run TAG N FLAGS...: generate under mpirun -n N, writing ids and logits
  local tag=$1 n=$2
  shift 2
  for p in 1 2; do
    local ids
    if [ $p = 1 ]; then ids=1; else ids=$(seq -s, 1 8 320 | cut -d, -f1-40); fi
    mpirun -n "$n" "$bin" generate --model "$work/m" --prompt-ids "$ids" --max-tokens 8 \
      --ignore-eos --print-ids --logits-out "$work/$tag.$p.logits" "$@" 2>"$work/$tag.err" |
      grep '^ids:' >"$work/$tag.$p.ids" || { echo "  $tag failed: $(tail -2 "$work/$tag.err")"; return 1; }
  done
}

run single 1 || exit 1
for layout in "2" "2 --tp 2" "2 --moe-exchange all-gather" "2 --moe-exchange all-to-all" "3" "3 --ep 1" "4 --tp 2" \
              "4 --tp 4 --ep 2" "4 --moe-exchange all-gather --tp 2" "8 --tp 8" "8 --tp 2 --ep 4"; do
  set -- $layout
  tag="n$(tr ' ' '_' <<<"$layout" | tr -d '-')"
  ok=1
  run "$tag" "$@" || ok=0
  for p in 1 2; do
    [ $ok = 1 ] && cmp -s "$work/single.$p.ids" "$work/$tag.$p.ids" || { ok=0; echo "  $tag: ids differ"; }
    [ $ok = 1 ] && logits_close "$work/$tag.$p.logits" "$work/single.$p.logits" 320 || ok=0
  done
  if [ $ok = 1 ]; then pass; else fail "$layout"; fi
done

# An impossible layout: a clear error naming the flag, non-zero exit, no hang.
if timeout 60 mpirun -n 4 "$bin" generate --model "$work/m" --prompt-ids 1 --tp 3 2>"$work/bad.err" >/dev/null; then
  fail "--tp 3 on 4 ranks was accepted"
elif grep -q -- "--tp 3 must divide the world size 4" "$work/bad.err"; then
  pass
else
  fail "no clear error for --tp 3: $(head -2 "$work/bad.err")"
fi
# A rank killed mid-generation: the whole job ends within 10 s, non-zero, naming the rank. The
# model is large enough that the generation lasts far longer than the test waits.
"$bin" make-tiny-model --out "$work/long" --layers 4 --hidden-size 256 --intermediate-size 512 \
  --max-position 20000 >/dev/null || exit 1
mpirun -n 3 "$bin" generate --model "$work/long" --prompt-ids 1 --max-tokens 16000 --ignore-eos \
  >/dev/null 2>"$work/kill.err" &
job=$!
victim=""
for _ in $(seq 100); do
  for pid in $(pgrep -f "generate --model $work/long --prompt-ids 1 --max-tokens 16000"); do
    if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx OMPI_COMM_WORLD_RANK=2; then
      victim=$pid
    fi
  done
  [ -n "$victim" ] && break
  sleep 0.1
done
sleep 1
start=$(date +%s)
[ -n "$victim" ] && kill -9 "$victim"
for _ in $(seq 150); do kill -0 "$job" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$job" 2>/dev/null; then
  kill -9 "$job"; fail "the job outlived a killed rank by 15 s"
else
  wait "$job"; rc=$?
  left=$(pgrep -f "generate --model $work/long --prompt-ids 1 --max-tokens 16000" | wc -l)
  if [ -z "$victim" ] || [ "$rc" = 0 ] || [ "$left" != 0 ] || [ $(( $(date +%s) - start )) -gt 10 ] ||
     ! grep -q "rank 2" "$work/kill.err"; then
    fail "killed rank: victim '$victim' rc $rc, $left left: $(head -3 "$work/kill.err")"
  else
    pass
  fi
fi

summary "mpi generate"
