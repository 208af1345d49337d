#!/usr/bin/env bash
# `lorahub learn --exact-reference` and `lorahub score --exact-reference` end to end on the
# reference fixtures (tests/testdata/ref_tiny): real binary, CPU, fp32.
#   exact_reference_cli_test.sh LORAHUB_BINARY
# Checks:
#  1. learn --exact-reference (COBYLA, budget 12, with and without --batch-size 2) runs, scores
#     every evaluation (trace) and reports the best of its trace; `score --exact-reference` at
#     the returned weights reproduces best_score exactly (same ops, same order, same process
#     kind), and the default engine's score there agrees to 1e-4 relative.
#  2. --out writes the exact composition: `score --exact-reference --adapter OUT` equals the
#     loss at the weights to 1e-5 (the export re-reads the factors; no composition then).
#  3. bad combinations (--method cat, --objective exact_match, --dtype bf16) exit 2 with a
#     message naming --exact-reference.
set -uo pipefail
lorahub=$1
py=/usr/bin/python3
fail() { echo "FAIL: $*" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
json_get() { $py -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1"; }
close() { $py -c "import sys; a,b,t=map(float,sys.argv[1:]); sys.exit(0 if abs(a-b)<=t*max(1,abs(b)) else 1)" "$@"; }

fx=tiny_s0
dir=tests/testdata/ref_tiny/$fx
ad=()
for m in "$dir"/modules/m*; do ad+=(--adapter "$m"); done
common=(--model "$dir/base" "${ad[@]}" --examples "$dir/examples.jsonl" --json)

for bs in all 2; do
  extra=()
  [ "$bs" = all ] || extra=(--batch-size "$bs")
  # 1.
  "$lorahub" learn "${common[@]}" "${extra[@]}" --optimizer cobyla --budget 12 --exact-reference \
    --trace "$tmp/trace.$bs.jsonl" --out "$tmp/out.$bs" >"$tmp/learn.$bs.json" \
    || fail "learn --exact-reference (batch $bs) exit $?"
  j=$tmp/learn.$bs.json
  [ "$(json_get "$j" 'j["evaluations"]')" = 12 ] || fail "evaluations != 12: $(cat "$j")"
  [ "$(json_get "$j" 'j["exact_reference"]')" = True ] || fail "exact_reference not reported: $(cat "$j")"
  [ "$(wc -l <"$tmp/trace.$bs.jsonl")" -eq 12 ] || fail "trace lines"
  best=$(json_get "$j" 'repr(j["best_score"])')
  trace_best=$($py -c "import json,sys; print(repr(min(json.loads(l)['score'] for l in open(sys.argv[1]))))" "$tmp/trace.$bs.jsonl")
  [ "$best" = "$trace_best" ] || fail "best_score $best is not the best of the trace $trace_best"
  weights=$(json_get "$j" '",".join(repr(w) for w in j["weights"])')
  "$lorahub" score --model "$dir/base" "${ad[@]}" "${extra[@]}" --weights "$weights" \
    --examples "$dir/examples.jsonl" --json --exact-reference >"$tmp/score.$bs.json" \
    || fail "score --exact-reference exit $?"
  rescored=$(json_get "$tmp/score.$bs.json" 'repr(j["score"])')
  [ "$rescored" = "$best" ] || fail "batch $bs: score --exact-reference $rescored != best_score $best"
  "$lorahub" score --model "$dir/base" "${ad[@]}" "${extra[@]}" --weights "$weights" \
    --examples "$dir/examples.jsonl" --json >"$tmp/fast.$bs.json" || fail "score exit $?"
  fast=$(json_get "$tmp/fast.$bs.json" 'repr(j["score"])')
  close "$fast" "$best" 1e-4 || fail "batch $bs: default engine $fast vs exact $best"
  # 2.
  loss=$(json_get "$tmp/score.$bs.json" 'repr(j["loss"])')
  "$lorahub" score --model "$dir/base" --adapter "$tmp/out.$bs" "${extra[@]}" \
    --examples "$dir/examples.jsonl" --json --exact-reference >"$tmp/out_score.$bs.json" \
    || fail "score --exact-reference --adapter OUT exit $?"
  out_loss=$(json_get "$tmp/out_score.$bs.json" 'repr(j["loss"])')
  close "$out_loss" "$loss" 1e-5 || fail "batch $bs: exported adapter loss $out_loss != $loss"
  echo "$fx batch=$bs exact best=$best rescored=$rescored default-engine=$fast exported-loss=$out_loss"
done

# 3.
expect_usage() {
  local what=$1; shift
  "$@" >"$tmp/o" 2>"$tmp/e"
  local rc=$?
  [ "$rc" = 2 ] || fail "$what: exit $rc, want 2 ($(cat "$tmp/e"))"
  grep -q -- "--exact-reference" "$tmp/e" || fail "$what: message: $(cat "$tmp/e")"
  [ "$(wc -l <"$tmp/e")" -eq 1 ] || fail "$what: more than one line: $(cat "$tmp/e")"
}
expect_usage "learn --method cat" "$lorahub" learn "${common[@]}" --budget 2 --exact-reference --method cat
expect_usage "learn --objective exact_match" "$lorahub" learn "${common[@]}" --budget 2 --exact-reference --objective exact_match
expect_usage "learn --dtype bf16" "$lorahub" learn "${common[@]}" --budget 2 --exact-reference --dtype bf16
expect_usage "score --method ties" "$lorahub" score "${common[@]}" --weights "$(seq -s, 0 19 | sed 's/[0-9]\+/0.1/g')" --exact-reference --method ties
expect_usage "learn --exact-reference --fast-fp32" "$lorahub" learn "${common[@]}" --budget 2 --exact-reference --fast-fp32
expect_usage "score --exact-reference --fast-fp32" "$lorahub" score "${common[@]}" --weights "$(seq -s, 0 19 | sed 's/[0-9]\+/0.1/g')" --exact-reference --fast-fp32
# On the CPU the fused engine is the default (the exact sequence is the default only on CUDA).
"$lorahub" learn "${common[@]}" --budget 2 >"$tmp/cpu_default.json" || fail "learn on the CPU exit $?"
[ "$(json_get "$tmp/cpu_default.json" 'j["exact_reference"]')" = False ] || fail "CPU default: $(cat "$tmp/cpu_default.json")"
expect_usage "score --dtype bf16" "$lorahub" score "${common[@]}" --weights "$(seq -s, 0 19 | sed 's/[0-9]\+/0.1/g')" --exact-reference --dtype bf16
echo PASS
