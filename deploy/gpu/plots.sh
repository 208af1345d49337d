#!/usr/bin/env bash
# Run ON THE GPU HOST after deploy/gpu/build_and_test.sh (binaries in .gpu/build/bin) with the
# reference script carried as .gpu/bench/ref_lorahub.py. The figures behind docs/BENCHMARKS.md's
# plots (issue 7), then the plots:
#   [BIN=.gpu/build/bin] [FIXTURE=/tmp/lorahub_large] [OUT=.gpu/logs/plots_run] bash deploy/gpu/plots.sh
#  0. the flan-t5-large-shaped fixture (20 modules r=16 on q,v, .bin) unless $FIXTURE has one
#     (python3 .gpu/bench/ref_lorahub.py fixture --size large --format bin, about 1 min)
#  a. `lorahub bench` in bf16 with --gen-sweep 1,8,...,256 x 32 new tokens -> $OUT/bench_sweep.json
#  b. `lorahub learn --trace` on the fixture: cobyla bf16 budget 40, cmaes bf16 budget 640
#     population 64, cobyla fp32 budget 40 --fast-fp32 -> $OUT/traces/<run>.jsonl (+ .json: the
#     final line)
#  c. the reference's COBYLA-40 (fp32, scipy) with every evaluation timed
#     (deploy/gpu/ref_learn_trace.py) -> $OUT/traces/reference_cobyla_fp32.json
#  d. deploy/gpu/plot_bench.py -> $OUT/plots/{score_vs_time.png,tokens_vs_batch.png,plots.md}
# On the device host, write OUT outside the call's $OUT and bring it back as one archive (or run
# it through perf_ab.sh PLOTS=1): a call returns only so many files.
# Everything logs to $OUT/plots.log. Each step has a timeout; a failed step prints FAILED and
# the run goes on (the plots leave out what is missing). Exit code: 1 if any step failed.
# Other environment: REF (reference script), PY (python3), DEVICE (ours: cuda:0), REF_DEVICE
# (the reference: cuda).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
BIN=${BIN:-.gpu/build/bin}
lorahub=$BIN/server/lorahub
fx=${FIXTURE:-/tmp/lorahub_large}
out=${OUT:-.gpu/logs/plots_run}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda:0}
ref=${REF:-.gpu/bench/ref_lorahub.py}
for r in shared/bench/ref_lorahub.py ../shared/bench/ref_lorahub.py; do
  [ -f "$ref" ] || ref=$r
done
mkdir -p "$out/traces" "$out/plots"
exec > >(tee -a "$out/plots.log") 2>&1
export PYTHONUNBUFFERED=1
start=$SECONDS
failures=0
stamp() { echo "== $*  [$((SECONDS - start)) s]"; }
failed() { echo "FAILED: $*"; failures=$((failures + 1)); }
[ -x "$lorahub" ] || failed "no $lorahub (run deploy/gpu/build_and_test.sh first, or set BIN)"
[ -f "$ref" ] || failed "no reference script $ref (carry ../shared/bench as .gpu/bench, or set REF)"

# 0. The fixture.
if [ ! -f "$fx/examples.jsonl" ]; then
  stamp "fixture -> $fx"
  timeout 240 "$PY" "$ref" fixture --out "$fx" --size large --format bin 2>&1 | grep -v Warning | tail -1
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || failed "fixture (exit $rc)"
fi
adapters=()
for m in "$fx"/modules/m*; do [ -d "$m" ] && adapters+=(--adapter "$m"); done
common=(--model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" --device "$DEVICE")

# a. Generation sweep (and the usual bench figures) in bf16.
stamp "a. lorahub bench bf16 --gen-sweep"
timeout 300 "$lorahub" bench "${common[@]}" --prompts "$fx/prompts.jsonl" --dtype bf16 --reps 3 \
  --gen-sweep 1,8,16,32,64,128,256 --gen-tokens 32 --json \
  >"$out/bench_sweep.json" 2>"$out/bench_sweep.err"
rc=$?
[ "$rc" = 0 ] || { failed "a. bench (exit $rc)"; tail -5 "$out/bench_sweep.err"; }
"$PY" - "$out/bench_sweep.json" <<'PY' || true
import json, sys
try:
    j = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
    for p in j["generation_sweep"]:
        print("  batch %4d: base %8.0f  shared %8.0f  distinct %8.0f tokens/s" % (
            p["batch"], p["base_tokens_per_second"], p["shared_adapter_tokens_per_second"],
            p["distinct_adapters_tokens_per_second"]))
except Exception as e:
    print("  no generation_sweep: %s" % str(e)[:120])
PY

# b. Ours, every evaluation traced.
runs=("cobyla_bf16 cobyla bf16 40 64" "cmaes_bf16 cmaes bf16 640 64" "cobyla_fp32_fast cobyla fp32 40 64 --fast-fp32")
for spec in "${runs[@]}"; do
  # shellcheck disable=SC2086  # the spec is split into words on purpose
  set -- $spec
  name=$1 opt=$2 dtype=$3 budget=$4 pop=$5
  shift 5
  extra=("$@")
  popflag=()
  [ "$opt" = cmaes ] && popflag=(--population "$pop")
  stamp "b. lorahub learn $name (budget $budget)"
  timeout 180 "$lorahub" learn "${common[@]}" --optimizer "$opt" --dtype "$dtype" --budget "$budget" \
    "${popflag[@]}" "${extra[@]}" --trace "$out/traces/$name.jsonl" --json \
    >"$out/traces/$name.json" 2>"$out/traces/$name.err"
  rc=$?
  if [ "$rc" = 0 ]; then tail -1 "$out/traces/$name.json" | cut -c1-300; else failed "b. learn $name (exit $rc)"; tail -3 "$out/traces/$name.err"; fi
done

# c. The reference's COBYLA-40 (fp32), every evaluation timed.
stamp "c. reference COBYLA-40 trace"
timeout 180 "$PY" deploy/gpu/ref_learn_trace.py --ref "$ref" --fixture "$fx" --budget 40 --device "${REF_DEVICE:-cuda}" \
  >"$out/traces/reference_cobyla_fp32.json" 2>"$out/traces/reference_cobyla_fp32.err"
rc=$?
if [ "$rc" = 0 ]; then
  "$PY" -c 'import json,sys; j=json.load(open(sys.argv[1])); print("  best %.6f, %d evaluations, %.2f s (load %.2f s)" % (j["best_score"], len(j["evaluations"]), j["evaluations"][-1]["seconds"], j["load_seconds"]))' \
    "$out/traces/reference_cobyla_fp32.json" || true
else
  failed "c. reference trace (exit $rc)"; tail -3 "$out/traces/reference_cobyla_fp32.err"
fi

# d. The plots (whatever came out above).
stamp "d. plots -> $out/plots"
timeout 120 "$PY" deploy/gpu/plot_bench.py --bench "$out/bench_sweep.json" \
  --trace "ours cobyla bf16 (40)=$out/traces/cobyla_bf16.jsonl" \
  --trace "ours cmaes bf16 (640, pop 64)=$out/traces/cmaes_bf16.jsonl" \
  --trace "ours cobyla fp32 --fast-fp32 (40)=$out/traces/cobyla_fp32_fast.jsonl" \
  --trace "reference scipy cobyla fp32 (40)=$out/traces/reference_cobyla_fp32.json" \
  --out "$out/plots"
rc=$?
[ "$rc" = 0 ] || failed "d. plot_bench.py (exit $rc)"
cat "$out/plots/plots.md" 2>/dev/null
stamp "done: $failures failed step(s)"
[ "$failures" = 0 ]
