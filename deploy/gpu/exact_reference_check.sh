#!/usr/bin/env bash
# Run ON THE GPU HOST after deploy/gpu/build_and_test.sh has built $BUILD_DIR/bin/server/lorahub:
# the "exact reference" numerics mode (core/model/exact_reference_loss.h) against the reference
# (bench/ref_lorahub.py: transformers + PEFT on the same LibTorch), in one call.
#   OUT=/some/dir [BUILD=1] bash deploy/gpu/exact_reference_check.sh
# Carry .gpu/bench (ref_lorahub.py) and, for BUILD=1 (build first, no tests), .gpu/debs. Fixtures are written into $WORK (default
# /tmp/lorahub_parity, shared with parity_checks.sh) unless present.
#  1. single scores: our `score --exact-reference` at the weights of the recorded op traces
#     (/work/notes/gpu/s5/c1/ops_*.tsv) next to the reference's scores printed there:
#       tiny_s0 w0 -> 100.0866455078125, tiny_s0 w1 -> 99.765600585937506,
#       base_s0 w1 -> 27.691635131835938  (w1 = 0.5,-0.25,0.125,0.3,-0.7,0,...,0)
#     and the reference's score recomputed now (ref_lorahub.py score); every run of ours with
#     LORAHUB_EXACT_TRACE -> $OUT/exact_trace_<fixture>_<w>.tsv (compare them with the op
#     traces: python3 deploy/gpu/compare_exact_trace.py OURS.tsv ops_*.tsv).
#  2. learning: `learn --optimizer cobyla --budget 40 --dtype fp32 --exact-reference` on the five
#     issue-4 fixtures (tiny seeds 0-2, base seeds 0-1) vs the reference's COBYLA-40
#     (ref_learn_trace.py) -> $OUT/exact_parity.md (and the default engine's run next to it).
# Everything logs to $OUT/log.txt; a failed step prints FAILED and the run goes on.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
repo=$PWD
out=${OUT:-.gpu/logs}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda:0}
WORK=${WORK:-/tmp/lorahub_parity}
mkdir -p "$WORK/traces" "$WORK/exact"
ref=.gpu/bench/ref_lorahub.py
build_dir=${BUILD_DIR:-$repo/.gpu/build}
lorahub=$build_dir/bin/server/lorahub
start=$SECONDS
stamp() { echo "== $*  [$((SECONDS - start)) s]"; }
failed() { echo "FAILED: $*"; }
if [ "${BUILD:-0}" = 1 ]; then
  stamp "build"
  OUT=$WORK/build_logs CTEST_ARGS="-R ^NONE$ --no-tests=ignore" bash deploy/gpu/build_and_test.sh \
    >"$WORK/build.log" 2>&1
  grep '^==' "$WORK/build.log" | grep -E "build|FAILED" | tail -3
fi
[ -x "$lorahub" ] || { failed "no $lorahub (run deploy/gpu/build_and_test.sh first, or BUILD=1)"; exit 1; }

spec=("tiny_s0 tiny 0 safetensors" "tiny_s1 tiny 1 bin" "tiny_s2 tiny 2 safetensors"
      "base_s0 base 0 safetensors" "base_s1 base 1 bin")
# Fixtures, then the reference's traced learning (reused when parity_checks.sh left it).
declare -A refpid
for s in "${spec[@]}"; do
  read -r name size seed fmt <<<"$s"
  ( if [ ! -f "$WORK/$name/prompts.jsonl" ]; then
      rm -rf "$WORK/$name"
      timeout 300 "$PY" "$ref" fixture --out "$WORK/$name" --size "$size" --seed "$seed" --format "$fmt" \
        >"$WORK/$name.fixture.log" 2>&1 || exit 1
    fi
    if [ ! -s "$WORK/traces/$name.ref.json" ] || [ -n "${REF_AGAIN:-}" ]; then
      timeout 300 "$PY" deploy/gpu/ref_learn_trace.py --ref "$ref" --fixture "$WORK/$name" \
        >"$WORK/traces/$name.ref.json" 2>"$WORK/traces/$name.ref.err"
    fi ) &
  refpid[$name]=$!
done

adapters_of() { local a=(); for m in "$WORK/$1"/modules/m*; do a+=(--adapter "$m"); done; echo "${a[@]}"; }
n_modules() { ls -d "$WORK/$1"/modules/m* | wc -l; }
# w1 of the op traces, padded with zeros to the module count.
w1_of() { "$PY" -c "import sys; n=int(sys.argv[1]); w=[0.5,-0.25,0.125,0.3,-0.7]+[0.0]*n; print(','.join(repr(x) for x in w[:n]))" "$1"; }
w0_of() { "$PY" -c "import sys; print(','.join(['0.0']*int(sys.argv[1])))" "$1"; }

# ---- 1. single scores ----
echo "| fixture | weights | recorded reference | reference now | ours (exact) | ours - recorded | ours - now | ours (--fast-fp32) |" >"$out/exact_scores.md"
echo "|---|---|---|---|---|---|---|---|" >>"$out/exact_scores.md"
for run in "tiny_s0 w0 100.0866455078125" "tiny_s0 w1 99.765600585937506" "base_s0 w1 27.691635131835938"; do
  read -r name wname recorded <<<"$run"
  wait "${refpid[$name]}" 2>/dev/null
  [ -f "$WORK/$name/examples.jsonl" ] || { failed "1: no fixture $name"; continue; }
  stamp "1: $name $wname"
  n=$(n_modules "$name")
  if [ "$wname" = w0 ]; then w=$(w0_of "$n"); else w=$(w1_of "$n"); fi
  read -ra ad <<<"$(adapters_of "$name")"
  trace=$out/exact_trace_${name}_$wname.tsv
  rm -f "$trace"
  LORAHUB_EXACT_TRACE=$trace timeout 300 "$lorahub" score --model "$WORK/$name/base" "${ad[@]}" --weights "$w" \
    --examples "$WORK/$name/examples.jsonl" --dtype fp32 --device "$DEVICE" --exact-reference --json \
    >"$WORK/exact/$name.$wname.ours.json" 2>"$WORK/exact/$name.$wname.ours.err" || failed "1: $name $wname ours ($(tail -c 300 "$WORK/exact/$name.$wname.ours.err"))"
  timeout 300 "$lorahub" score --model "$WORK/$name/base" "${ad[@]}" --weights "$w" \
    --examples "$WORK/$name/examples.jsonl" --dtype fp32 --device "$DEVICE" --fast-fp32 --json \
    >"$WORK/exact/$name.$wname.fast.json" 2>/dev/null || failed "1: $name $wname default engine"
  timeout 300 "$PY" "$ref" score --fixture "$WORK/$name" --weights "$w" \
    >"$WORK/exact/$name.$wname.ref.json" 2>"$WORK/exact/$name.$wname.ref.err" || failed "1: $name $wname reference score"
  "$PY" - "$name" "$wname" "$recorded" "$WORK/exact/$name.$wname.ref.json" "$WORK/exact/$name.$wname.ours.json" \
    "$WORK/exact/$name.$wname.fast.json" >>"$out/exact_scores.md" <<'PY' || true
import json, sys
name, wname, recorded, rf, of, ff = sys.argv[1:7]
recorded = float(recorded)
def last(path, key):
    try:
        return json.loads(open(path).read().strip().splitlines()[-1])[key]
    except Exception:
        return float("nan")
now, ours, fast = last(rf, "score"), last(of, "score"), last(ff, "score")
print("| %s | %s | %.17g | %.17g | %.17g | %+.3g | %+.3g | %.17g |" % (name, wname, recorded, now, ours, ours - recorded, ours - now, fast))
PY
  tail -1 "$out/exact_scores.md"
done

# ---- 2. learning ----
echo "| fixture | reference best | ours exact best | exact - reference | pass (<= +1e-4) | same path (first differing evaluation) | ours --fast-fp32 best | fast - reference |" >"$out/exact_parity.md"
echo "|---|---|---|---|---|---|---|---|" >>"$out/exact_parity.md"
for s in "${spec[@]}"; do
  read -r name _ <<<"$s"
  wait "${refpid[$name]}" 2>/dev/null || failed "2: $name fixture or reference ($(tail -c 300 "$WORK/traces/$name.ref.err" 2>/dev/null | tr '\n' ' '))"
  [ -f "$WORK/$name/examples.jsonl" ] || continue
  read -ra ad <<<"$(adapters_of "$name")"
  stamp "2: $name learn --exact-reference"
  timeout 580 "$lorahub" learn --model "$WORK/$name/base" "${ad[@]}" --examples "$WORK/$name/examples.jsonl" \
    --optimizer cobyla --budget 40 --dtype fp32 --device "$DEVICE" --exact-reference \
    --trace "$WORK/traces/$name.exact.jsonl" --json \
    >"$WORK/traces/$name.exact.json" 2>"$WORK/traces/$name.exact.err" || failed "2: $name ours exact ($(tail -c 300 "$WORK/traces/$name.exact.err"))"
  if [ ! -s "$WORK/traces/$name.ours.json" ]; then
    timeout 120 "$lorahub" learn --model "$WORK/$name/base" "${ad[@]}" --examples "$WORK/$name/examples.jsonl" \
      --optimizer cobyla --budget 40 --dtype fp32 --device "$DEVICE" --fast-fp32 --trace "$WORK/traces/$name.ours.jsonl" --json \
      >"$WORK/traces/$name.ours.json" 2>"$WORK/traces/$name.ours.err" || failed "2: $name ours default"
  fi
  "$PY" - "$name" "$WORK/traces/$name.ref.json" "$WORK/traces/$name.exact.json" "$WORK/traces/$name.exact.jsonl" \
    "$WORK/traces/$name.ours.json" >>"$out/exact_parity.md" <<'PY' || true
import json, sys
name, rf, ef, et, of = sys.argv[1:6]
def last(path):
    return json.loads(open(path).read().strip().splitlines()[-1])
try:
    r = json.load(open(rf)); e = last(ef)
    ours = [json.loads(l) for l in open(et)]
    first = "identical (%d)" % len(ours)
    for i, (a, b) in enumerate(zip(r["evaluations"], ours)):
        if a["score"] != b["score"]:
            first = "#%d: ref %.17g ours %.17g" % (i, a["score"], b["score"])
            break
    try:
        o = last(of)["best_score"]
    except Exception:
        o = float("nan")
    d = e["best_score"] - r["best_score"]
    print("| %s | %.17g | %.17g | %+.3g | %s | %s | %.9g | %+.3g |" % (
        name, r["best_score"], e["best_score"], d, "yes" if d <= 1e-4 else "NO", first, o, o - r["best_score"]))
except Exception as ex:
    print("| %s | n/a | n/a | n/a | n/a (%s) | | | |" % (name, str(ex)[:80]))
PY
  tail -1 "$out/exact_parity.md"
done
tar -C "$WORK" -czf "$out/exact_traces.tgz" traces exact 2>/dev/null
stamp "done"
