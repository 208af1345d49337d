#!/usr/bin/env bash
# Run ON THE GPU HOST (it has transformers, peft, scipy 1.18): the parity checks that need them,
# after a build (BUILD=1 builds first with deploy/gpu/build_and_test.sh, no tests).
#   OUT=/some/dir [BUILD=1] bash deploy/gpu/parity_checks.sh
# Carry .gpu/debs (for BUILD=1), .gpu/bench (ref_lorahub.py) and .gpu/peft (optional: a copy of
# models/default/base as .gpu/peft/base and some modules as .gpu/peft/modules/<task>, for when
# models/ does not travel; models/default is used when present).
#  A. scipy's COBYLA on analytic functions, every proposed point (tests/learn/scipy_cobyla_traces.py)
#     -> $OUT/scipy118_cobyla_traces.json
#  B. golden fixtures: fp32-vs-float64 noise floors of tests/testdata/t5 (make_t5_goldens.py --check)
#     and bf16_sharded regenerated into $OUT/t5_bf16_sharded.tgz
#  C. the reference's COBYLA-40 with every evaluation (deploy/gpu/ref_learn_trace.py) and ours
#     (`lorahub learn --optimizer cobyla --budget 40 --dtype fp32 --trace`) on the five issue-4 fixtures
#     (tiny seeds 0-2, base seeds 0-1) -> $OUT/cobyla_traces.tgz (with the tiny fixtures)
#  D. PEFT: composition methods vs add_weighted_adapter, adapters exported by `lorahub learn --out`
#     (loss and greedy ids), and modules trained by `lorahub train-module` (the embedded default's)
#     -> $OUT/peft.txt
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
mkdir -p "$WORK"
ref=.gpu/bench/ref_lorahub.py
lorahub=${BUILD_DIR:-$repo/.gpu/build}/bin/server/lorahub
start=$SECONDS
stamp() { echo "== $*  [$((SECONDS - start)) s]"; }
failed() { echo "FAILED: $*"; }

# Background: A, B (unless SKIP_AB=1) and the fixture writers (CPU only, independent of the build).
pid_a= pid_b=
if [ "${SKIP_AB:-0}" != 1 ]; then
stamp "A: scipy COBYLA traces"
( timeout 300 "$PY" tests/learn/scipy_cobyla_traces.py --out "$out/scipy118_cobyla_traces.json" \
    >"$WORK/scipy.log" 2>&1 || echo "FAILED: scipy traces (exit $?)" >>"$WORK/scipy.log" ) &
pid_a=$!
( { timeout 400 "$PY" tests/golden/make_t5_goldens.py --check tests/testdata/t5 || echo "FAILED: --check (exit $?)"
    rm -rf "$WORK/t5new"
    timeout 300 "$PY" tests/golden/make_t5_goldens.py --out "$WORK/t5new" --cases bf16_sharded \
      && timeout 200 "$PY" tests/golden/make_t5_goldens.py --check "$WORK/t5new" --cases bf16_sharded \
      && tar -C "$WORK/t5new" -czf "$out/t5_bf16_sharded.tgz" bf16_sharded \
      || echo "FAILED: bf16_sharded regeneration (exit $?)"
  } >"$WORK/goldens.log" 2>&1 ) &
pid_b=$!
fi
declare -A fxpid
spec=("tiny_s0 tiny 0 safetensors" "tiny_s1 tiny 1 bin" "tiny_s2 tiny 2 safetensors"
      "base_s0 base 0 safetensors" "base_s1 base 1 bin")
for s in "${spec[@]}"; do
  read -r name size seed fmt <<<"$s"
  [ -f "$WORK/$name/examples.jsonl" ] && continue
  ( timeout 300 "$PY" "$ref" fixture --out "$WORK/$name" --size "$size" --seed "$seed" --format "$fmt" \
      >"$WORK/$name.fixture.log" 2>&1 ) &
  fxpid[$name]=$!
done

if [ "${BUILD:-0}" = 1 ]; then
  stamp "build"
  OUT=$WORK/build_logs CTEST_ARGS="-R ^NONE$ --no-tests=ignore" bash deploy/gpu/build_and_test.sh \
    >"$WORK/build.log" 2>&1
  grep '^==' "$WORK/build.log" | tail -4
fi
[ -x "$lorahub" ] || failed "no $lorahub: parts C (ours) and D skipped"

# D1: composition methods vs PEFT (CPU, no fixture).
peft=$out/peft.txt
: >"$peft"
stamp "D1: check_composition_vs_peft.py"
o=$(timeout 180 "$PY" tests/learn/check_composition_vs_peft.py tests/learn/testdata/composition_cases.json 2>&1)
rc=$?
{ echo "### check_composition_vs_peft.py (exit $rc)"; echo "$o" | grep -v -i warn | tail -12; } | tee -a "$peft"

# D3: modules trained by lorahub train-module load in PEFT with the same loss (MODULES: how many of
# them, default 3; run concurrently).
base=models/default/base modules=models/default/modules
[ -f "$base/config.json" ] || { base=.gpu/peft/base; modules=.gpu/peft/modules; }
if [ -x "$lorahub" ] && [ -f "$base/config.json" ]; then
  "${BUILD_DIR:-$repo/.gpu/build}/bin/core/tasks/make_task_data" --out "$WORK/taskdata" --seed 11 \
    --train-per-task 8 --test-per-task 8 --heldout-examples 5 >/dev/null
  stamp "D3: peft_parity.py on trained modules"
  for m in $(ls -d "$modules"/*/ | head -n "${MODULES:-3}"); do
    t=$(basename "$m")
    ex=$WORK/taskdata/pool_test/$t.jsonl
    [ -f "$ex" ] || { failed "D3: no test examples for $t"; continue; }
    ( o=$(timeout 120 "$PY" tests/train/peft_parity.py --model "$base" --adapter "$m" --examples "$ex" \
          --lorahub "$lorahub" 2>&1)
      rc=$?
      { echo "### peft_parity.py trained module $t (exit $rc)"; echo "$o" | grep -v -i warn | tail -3; } >"$WORK/d3_$t.txt" ) &
  done
  wait
  cat "$WORK"/d3_*.txt | tee -a "$peft"
else
  failed "D3: no trained base at models/default/base or .gpu/peft/base"
fi

# C: reference and ours, COBYLA 40, every evaluation.
mkdir -p "$WORK/traces"
for s in "${spec[@]}"; do
  read -r name _ <<<"$s"
  if [ -n "${fxpid[$name]:-}" ]; then wait "${fxpid[$name]}" || failed "fixture $name ($(tail -c 200 "$WORK/$name.fixture.log"))"; fi
  [ -f "$WORK/$name/examples.jsonl" ] || continue
  stamp "C: $name reference trace"
  timeout 200 "$PY" deploy/gpu/ref_learn_trace.py --ref "$ref" --fixture "$WORK/$name" \
    >"$WORK/traces/$name.ref.json" 2>"$WORK/traces/$name.ref.err" || failed "C: $name reference"
  if [ -x "$lorahub" ]; then
    adapters=()
    for m in "$WORK/$name"/modules/m*; do adapters+=(--adapter "$m"); done
    timeout 120 "$lorahub" learn --model "$WORK/$name/base" "${adapters[@]}" --examples "$WORK/$name/examples.jsonl" \
      --optimizer cobyla --budget 40 --dtype fp32 --device "$DEVICE" --trace "$WORK/traces/$name.ours.jsonl" --json \
      >"$WORK/traces/$name.ours.json" 2>"$WORK/traces/$name.ours.err" || failed "C: $name ours"
  fi
  "$PY" - "$WORK/traces/$name.ref.json" "$WORK/traces/$name.ours.json" <<'PY' || true
import json, sys
try:
    r = json.load(open(sys.argv[1])); o = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
    print("   reference best %.6f, ours best %.6f, ours - reference %+.3g" % (r["best_score"], o["best_score"], o["best_score"] - r["best_score"]))
except Exception as e:
    print("   (no comparison: %s)" % e)
PY
done

# D2: adapters exported by learn --out load in PEFT: same loss, same greedy ids.
if [ -x "$lorahub" ]; then
  for s in "tiny_s0 lorahub" "tiny_s0 ties" "base_s0 lorahub"; do
    read -r name method <<<"$s"
    fx=$WORK/$name exp=$WORK/export_${name}_$method
    [ -f "$fx/examples.jsonl" ] || continue
    stamp "D2: $name --method $method: learn --out, then PEFT"
    adapters=()
    for m in "$fx"/modules/m*; do adapters+=(--adapter "$m"); done
    rm -rf "$exp"
    timeout 120 "$lorahub" learn --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
      --optimizer cobyla --budget 20 --method "$method" --dtype fp32 --device "$DEVICE" --out "$exp" --json \
      >"$exp.learn.json" 2>&1 || { failed "D2 $name $method: learn --out"; continue; }
    o=$(timeout 120 "$PY" tests/train/peft_parity.py --model "$fx/base" --adapter "$exp" \
        --examples "$fx/examples.jsonl" --lorahub "$lorahub" 2>&1)
    rc=$?
    { echo "### peft_parity.py exported $name --method $method (exit $rc)"; echo "$o" | grep -v -i warn | tail -3; } | tee -a "$peft"
    head -n 10 "$fx/prompts.jsonl" >"$WORK/prompts_$name.jsonl"
    timeout 60 "$lorahub" generate --model "$fx/base" --adapter "$exp" --input-file "$WORK/prompts_$name.jsonl" \
      --max-new-tokens 16 --device "$DEVICE" --dtype fp32 --json >"$exp.gen.jsonl" 2>"$exp.gen.err" \
      || failed "D2 $name $method: lorahub generate"
    o=$(timeout 120 "$PY" - "$fx/base" "$exp" "$WORK/prompts_$name.jsonl" "$exp.gen.jsonl" <<'PY' 2>&1
import json, sys
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration
from peft import PeftModel
base, adapter, prompts, ours = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(base)
model = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(base, dtype=torch.float32), adapter).eval()
rows = [json.loads(l) for l in open(prompts)]
mine = [json.loads(l) for l in open(ours)]
same = 0
for r, m in zip(rows, mine):
    enc = tok(r["input"], return_tensors="pt")
    with torch.no_grad():
        g = model.generate(**enc, max_new_tokens=16, do_sample=False, num_beams=1)[0].tolist()[1:]
    while g and g[-1] == 0: g.pop()
    same += int(g == m["output_ids"])
    if g != m["output_ids"]: print("differ:", r["input"][:40], g, m["output_ids"])
print(json.dumps({"greedy_equal": same, "prompts": len(rows)}))
sys.exit(0 if same == len(rows) else 1)
PY
)
    rc=$?
    { echo "### greedy ids, transformers+peft vs lorahub generate, $name --method $method (exit $rc)"; echo "$o" | tail -3; } | tee -a "$peft"
  done
fi

tar -C "$WORK" -czf "$out/cobyla_traces.tgz" traces tiny_s0 tiny_s1 tiny_s2 2>/dev/null

# E (CUDA_TESTS=1): the engine's CUDA tests, golden parity included.
if [ "${CUDA_TESTS:-0}" = 1 ]; then
  stamp "E: CUDA tests"
  LORAHUB_TEST_DEVICE=$DEVICE timeout 300 ctest --test-dir "${BUILD_DIR:-$repo/.gpu/build}" --output-on-failure \
    -R "golden_test|generate_test|static_decoder|decoder_reuse|objective_runner_test" >"$WORK/ctest.log" 2>&1
  echo "ctest exit $?"; grep -E "tests passed|Failed|fp32 .*logits|\(Failed\)" "$WORK/ctest.log" | tail -40
  cp "$WORK/ctest.log" "$out/ctest.log"
fi

if [ -n "$pid_a$pid_b" ]; then
  stamp "waiting for A and B"
  wait $pid_a $pid_b
  cat "$WORK/scipy.log"; grep -v -i warn "$WORK/goldens.log" | tail -30
  cp "$WORK/goldens.log" "$out/goldens.log" 2>/dev/null
fi
stamp "done"
