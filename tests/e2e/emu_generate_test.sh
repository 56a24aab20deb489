#!/usr/bin/env bash
# `switchyard generate --device cuda` through the command line, on the CUDA emulator's build of
# the program: with --dtype f32 the greedy ids equal the CPU backend's and the prompt logits are
# within 1e-4 of its row maxima, on one rank, on 2 ranks sharing the device (--comm auto picks
# MPI host staging) and with --tp 2, and on 2 ranks with a device each (--comm auto picks the
# emulated NCCL), with the all-gather exchange and with --tp 2; seeded sampling gives the CPU's
# ids (device sampling); the default bf16 run names its device and precision; --comm nccl on a
# shared device is refused.
# Usage: emu_generate_test.sh SWITCHYARD_BINARY WORK_DIR SWITCHYARD_EMU_BINARY
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
emu=$3
"$bin" make-tiny-model --out "$work/m" --seed 5 --layers 2 --hidden-size 64 --intermediate-size 80 \
  --heads 8 --kv-heads 4 --head-dim 8 --vocab-size 320 --sliding-window 16 >/dev/null || exit 1
ids=$(seq -s, 1 7 320 | cut -d, -f1-30)

run() {  # run TAG LAUNCHER... -- FLAGS...: ids to $work/TAG.ids, logits to $work/TAG.logits
  local tag=$1
  shift
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  shift
  "${launcher[@]}" generate --model "$work/m" --prompt-ids "$ids" --max-tokens 10 --ignore-eos \
    --print-ids --logits-out "$work/$tag.logits" "$@" 2>"$work/$tag.err" |
    grep '^ids:' >"$work/$tag.ids" || { echo "  $tag failed: $(tail -2 "$work/$tag.err")"; return 1; }
}

same() {  # same TAG REF: ids identical and logits close
  cmp -s "$work/$1.ids" "$work/$2.ids" || { echo "  $1: ids differ from $2"; return 1; }
  logits_close "$work/$1.logits" "$work/$2.logits" 320
}

run cpu "$bin" -- || exit 1
check "f32 one rank" run f32 "$emu" -- --device cuda --dtype f32
check "f32 matches cpu" same f32 cpu
check "f32 two ranks" run f32n2 mpirun -n 2 "$emu" -- --device cuda --dtype f32
check "f32 two ranks match cpu" same f32n2 cpu
check "f32 tp 2" run f32tp2 mpirun -n 2 "$emu" -- --device cuda --dtype f32 --tp 2
check "f32 tp 2 matches cpu" same f32tp2 cpu
grep -q "mpi host staging" "$work/f32n2.err" && pass || fail "two ranks on one device did not stage"
# A device per rank (SY_CUDA_EMU_DEVICES): --comm auto picks NCCL; the all-gather exchange's
# decode steps record into graphs with the collectives in them.
check "f32 nccl two ranks" run f32nccl mpirun -n 2 -x SY_CUDA_EMU_DEVICES=2 "$emu" -- \
  --device cuda --dtype f32 --moe-exchange all-gather
check "f32 nccl two ranks match cpu" same f32nccl cpu
grep -q "(nccl)" "$work/f32nccl.err" && pass || fail "a device per rank did not pick nccl"
check "f32 nccl tp 2" run f32nccltp2 mpirun -n 2 -x SY_CUDA_EMU_DEVICES=2 "$emu" -- \
  --device cuda --dtype f32 --tp 2
check "f32 nccl tp 2 matches cpu" same f32nccltp2 cpu

sampling=(--temperature 0.8 --top-k 40 --top-p 0.9 --seed 11)
check "sampled cpu" run scpu "$bin" -- "${sampling[@]}"
check "sampled f32" run sf32 "$emu" -- --device cuda --dtype f32 "${sampling[@]}"
cmp -s "$work/scpu.ids" "$work/sf32.ids" && pass || fail "sampled ids differ from the cpu's"

check "bf16" run bf16 "$emu" -- --device cuda
grep -q "device: cuda:0 CUDA emulator (CPU) bf16" "$work/bf16.err" && pass ||
  fail "the bf16 run does not name its device: $(head -2 "$work/bf16.err")"

if timeout 120 mpirun -n 2 "$emu" generate --model "$work/m" --prompt-ids 1 --device cuda \
  --comm nccl >/dev/null 2>"$work/nccl.err"; then
  fail "--comm nccl on a shared device was accepted"
elif grep -q "ranks share a GPU" "$work/nccl.err"; then
  pass
else
  fail "no clear error for --comm nccl: $(head -3 "$work/nccl.err")"
fi
summary "emu generate"
