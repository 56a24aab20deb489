#!/usr/bin/env bash
# End-to-end checks of the switchyard program: make-tiny-model writes a complete, deterministic
# Hugging Face checkpoint; generate streams text, prints ids and a summary, writes logits, runs
# with weights quantized at load and from a GGUF file, and fails cleanly on bad input. Usage: cli_test.sh SWITCHYARD_BINARY WORK_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
fails_with() {  # fails_with MESSAGE COMMAND...: the command exits non-zero, stderr has MESSAGE
  local message=$1
  shift
  local err
  if err=$("$@" 2>&1 >/dev/null); then echo "  exited 0: $*"; return 1; fi
  grep -qF -- "$message" <<<"$err" || { echo "  stderr lacks '$message': $err"; return 1; }
}

# A small model: 2 layers, sharded into several files.
small=(--layers 2 --hidden-size 64 --intermediate-size 96 --heads 4 --kv-heads 2 --head-dim 16
       --vocab-size 320 --shard-mib 0.25)
check "make-tiny-model" "$bin" make-tiny-model --out "$work/m1" --seed 7 "${small[@]}"
check "make-tiny-model again" "$bin" make-tiny-model --out "$work/m2" --seed 7 "${small[@]}"
for f in config.json generation_config.json tokenizer.model model.safetensors.index.json; do
  check "has $f" test -s "$work/m1/$f"
done
check "sharded" test "$(ls "$work"/m1/model-*-of-*.safetensors | wc -l)" -ge 2
check "deterministic" diff -r "$work/m1" "$work/m2"

out=$("$bin" generate --model "$work/m1" --prompt-ids 1,17,42,99 --max-tokens 12 --ignore-eos \
      --print-ids --logits-out "$work/logits.bin" 2>/dev/null)
check "generate exit 0" test $? -eq 0
ids=$(grep '^ids:' <<<"$out" | cut -d: -f2)
check "12 ids" test "$(wc -w <<<"$ids")" -eq 12
check "summary line" grep -q "prompt tokens: 4, generated tokens: 12, prefill: .* tok/s, decode: .* tok/s" <<<"$out"
check "logits size" test "$(stat -c %s "$work/logits.bin")" -eq $((4 * 320 * 4))
out2=$("$bin" generate --model "$work/m1" --prompt-ids 1,17,42,99 --max-tokens 12 --ignore-eos \
       --print-ids --prefill-chunk 1 2>/dev/null)
check "greedy repeatable (token-by-token prefill)" test "$(grep '^ids:' <<<"$out2")" = "ids:$ids"
s1=$("$bin" generate --model "$work/m1" --prompt "the yard" --max-tokens 10 --temperature 1 --seed 5 --print-ids 2>/dev/null | grep '^ids:')
s2=$("$bin" generate --model "$work/m1" --prompt "the yard" --max-tokens 10 --temperature 1 --seed 5 --print-ids 2>/dev/null | grep '^ids:')
check "seeded sampling repeatable" test -n "$s1" -a "$s1" = "$s2"
# +100 on the end-of-sequence token (2) ends at once; min_tokens holds it back for 3 tokens.
b1=$("$bin" generate --model "$work/m1" --prompt-ids 1,17,42 --max-tokens 12 --print-ids \
     --logit-bias 2:100 2>/dev/null | grep '^ids:')
b2=$("$bin" generate --model "$work/m1" --prompt-ids 1,17,42 --max-tokens 12 --print-ids \
     --logit-bias 2:100 --min-tokens 3 2>/dev/null | grep '^ids:')
check "logit bias ends at once" test "$b1" = "ids: 2"
check "min tokens hold it back" test "$(wc -w <<<"$b2")" -eq 5 -a "${b2##* }" = 2

check "missing model" fails_with "cannot open" "$bin" generate --model "$work/none" --prompt hi
check "bad id" fails_with "outside the vocabulary" "$bin" generate --model "$work/m1" --prompt-ids 1,320
check "bad id text" fails_with "is not an integer" "$bin" generate --model "$work/m1" --prompt-ids 1,x
check "bad logit bias" fails_with "--logit-bias: \"7\" is not ID:BIAS" "$bin" generate --model "$work/m1" --prompt hi --logit-bias 7
check "bad logit bias value" fails_with "outside [-100, 100]" "$bin" generate --model "$work/m1" --prompt hi --logit-bias 7:200
check "bad min tokens" fails_with "min_tokens: 90 exceeds max_tokens 64" "$bin" generate --model "$work/m1" --prompt hi --min-tokens 90
check "bad temperature" fails_with "temperature" "$bin" generate --model "$work/m1" --prompt hi --temperature -1
check "too long" fails_with "exceeds the context limit" "$bin" generate --model "$work/m1" --prompt hi --max-tokens 100000
check "bad dtype" fails_with "is not a storage precision" "$bin" generate --model "$work/m1" --prompt hi --dtype f64
check "bf16 on cpu" fails_with "the CPU backend computes in f32 only" "$bin" generate --model "$work/m1" --prompt hi --dtype bf16
# Weights quantized at load, GGUF files, threads.
q=$("$bin" generate --model "$work/m1" --prompt-ids 1,17,42,99 --max-tokens 12 --ignore-eos \
    --print-ids --weights q8_0 --threads 2 2>"$work/q8.err" | grep '^ids:')
check "q8_0 generate" test "$(wc -w <<<"$q")" -eq 13
q1=$("$bin" generate --model "$work/m1" --prompt-ids 1,17,42,99 --max-tokens 12 --ignore-eos \
     --print-ids --weights q8_0 --threads 1 2>/dev/null | grep '^ids:')
check "q8_0 the same on 1 thread" test "$q" = "$q1"
fixtures="$(cd "$(dirname "${BASH_SOURCE[0]}")/../fixtures/gguf" && pwd)"
g=$("$bin" generate --model "$fixtures/tiny_q4_k_m.gguf" --prompt "the yard" --max-tokens 8 \
    --ignore-eos --print-ids 2>/dev/null | grep '^ids:')
check "generate from llama.cpp's Q4_K_M file" test "$(wc -w <<<"$g")" -ge 9
check "bad weights" fails_with "is not one of auto, f32, bf16, f16, q8_0, q4_0, q4_k" "$bin" generate --model "$work/m1" --prompt hi --weights q3_k
check "bad threads" fails_with "--threads 300" "$bin" generate --model "$work/m1" --prompt hi --threads 300
check "quantized on cuda" fails_with "--device cpu" "$bin" generate --model "$work/m1" --prompt hi --device cuda --weights q4_k
check "missing tokenizer" fails_with "no such file" "$bin" make-tiny-model --out "$work/t1" "${small[@]}" --tokenizer "$work/none.model"
check "tokenizer of another size" fails_with "give --vocab-size 320" "$bin" make-tiny-model --out "$work/t2" --layers 1 --hidden-size 64 --intermediate-size 96 --heads 4 --kv-heads 2 --head-dim 16 --vocab-size 256 --tokenizer "$work/m1/tokenizer.model"

cp -r "$work/m1" "$work/broken"
truncate -s 100 "$(ls "$work"/broken/model-*-of-*.safetensors | head -1)"
check "truncated shard" fails_with "safetensors" "$bin" generate --model "$work/broken" --prompt hi

summary "cli"
