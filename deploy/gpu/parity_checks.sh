#!/usr/bin/env bash
# Run ON THE GPU HOST (it has transformers, peft, scipy 1.18): the checks that need them, in one call.
#   OUT=/some/dir [BUILD=1] [SKIP_AB=1] [CUDA_TESTS=1] [BENCH=1] bash deploy/gpu/parity_checks.sh
# Carry .gpu/debs (for BUILD=1), .gpu/bench (ref_lorahub.py) and .gpu/peft (when models/ does not
# travel: models/default/base copied to .gpu/peft/base and a few modules to .gpu/peft/modules/<task>).
#  A. scipy's COBYLA on analytic functions, every proposed point (tests/learn/scipy_cobyla_traces.py)
#     -> $OUT/scipy118_cobyla_traces.json                                        (unless SKIP_AB=1)
#  B. golden fixtures: fp32-vs-float64 noise floors of tests/testdata/t5 (make_t5_goldens.py --check)
#     and bf16_sharded regenerated into $OUT/t5_bf16_sharded.tgz                 (unless SKIP_AB=1)
#  C. the reference's COBYLA-40 with every evaluation (deploy/gpu/ref_learn_trace.py) and ours
#     (`lorahub learn --optimizer cobyla --budget 40 --dtype fp32 --trace`) on the five issue-4
#     fixtures (tiny seeds 0-2, base seeds 0-1), ours also with --exact-reference (a second
#     column) -> $OUT/parity.md and $OUT/cobyla_traces.tgz
#  D. PEFT: D1 composition methods vs add_weighted_adapter, D2 adapters exported by `lorahub learn
#     --out` (loss and greedy ids), D3 modules trained by `lorahub train-module` -> $OUT/peft.txt
#  E. (CUDA_TESTS=1) the engine's CUDA tests, golden parity included -> $OUT/ctest.log
#     (OPTIN_TESTS=1: golden/objective tests again with LORAHUB_LORA_BF16=1 LORAHUB_ATTN_BF16=1)
#  F. (BENCH=1) `lorahub bench` in bf16 on the flan-t5-large-shaped fixture -> $OUT/bench_bf16.json;
#     BENCH_AB="separate generic_attn bf16_attn" picks the same-build A/B runs (default: separate;
#     also no_fused small_attn_generic lora_bf16 obj_attn_bf16 obj_bf16 no_encoder_graph
#     no_lora_gemv, see part F)
# The Python-only work (fixtures, the reference's traces, A, B) runs in the background from the
# start, while the build runs. Everything logs to $OUT/log.txt; a failed step prints FAILED and
# the run goes on. Background jobs are waited for by pid (a bare `wait` would also wait for the
# log's tee and never return).
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
LARGE=${LARGE:-/tmp/lorahub_large}
mkdir -p "$WORK/traces"
ref=.gpu/bench/ref_lorahub.py
build_dir=${BUILD_DIR:-$repo/.gpu/build}
lorahub=$build_dir/bin/server/lorahub
start=$SECONDS
stamp() { echo "== $*  [$((SECONDS - start)) s]"; }
failed() { echo "FAILED: $*"; }

# ---- background, from t = 0 ----
bg=()
if [ "${SKIP_AB:-0}" != 1 ]; then
  ( timeout 300 "$PY" tests/learn/scipy_cobyla_traces.py --out "$out/scipy118_cobyla_traces.json" \
      >"$WORK/scipy.log" 2>&1 || echo "FAILED: scipy traces (exit $?)" >>"$WORK/scipy.log" ) &
  bg+=($!)
  ( { timeout 400 "$PY" tests/golden/make_t5_goldens.py --check tests/testdata/t5 || echo "FAILED: --check (exit $?)"
      rm -rf "$WORK/t5new"
      timeout 300 "$PY" tests/golden/make_t5_goldens.py --out "$WORK/t5new" --cases bf16_sharded \
        && tar -C "$WORK/t5new" -czf "$out/t5_bf16_sharded.tgz" bf16_sharded \
        || echo "FAILED: bf16_sharded regeneration (exit $?)"
    } >"$WORK/goldens.log" 2>&1 ) &
  bg+=($!)
fi
# C, reference side: write each fixture (unless present), then the reference's traced learning.
spec=("tiny_s0 tiny 0 safetensors" "tiny_s1 tiny 1 bin" "tiny_s2 tiny 2 safetensors"
      "base_s0 base 0 safetensors" "base_s1 base 1 bin")
declare -A refpid
for s in "${spec[@]}"; do
  read -r name size seed fmt <<<"$s"
  ( if [ ! -f "$WORK/$name/prompts.jsonl" ]; then
      rm -rf "$WORK/$name"
      timeout 300 "$PY" "$ref" fixture --out "$WORK/$name" --size "$size" --seed "$seed" --format "$fmt" \
        >"$WORK/$name.fixture.log" 2>&1 || exit 1
    fi
    timeout 300 "$PY" deploy/gpu/ref_learn_trace.py --ref "$ref" --fixture "$WORK/$name" \
      >"$WORK/traces/$name.ref.json" 2>"$WORK/traces/$name.ref.err" ) &
  refpid[$name]=$!
done
large_pid=
if [ "${BENCH:-0}" = 1 ] && [ ! -f "$LARGE/prompts.jsonl" ]; then
  ( rm -rf "$LARGE"; timeout 400 "$PY" "$ref" fixture --out "$LARGE" --size large --format bin \
      >"$WORK/large.fixture.log" 2>&1 ) &
  large_pid=$!
fi

if [ "${BUILD:-0}" = 1 ]; then
  stamp "build"
  OUT=$WORK/build_logs CTEST_ARGS="-R ^NONE$ --no-tests=ignore" bash deploy/gpu/build_and_test.sh \
    >"$WORK/build.log" 2>&1
  grep '^==' "$WORK/build.log" | grep -E "build|FAILED" | tail -3
fi
[ -x "$lorahub" ] || failed "no $lorahub: parts C (ours), D2, D3, E, F skipped"

# ---- D3 in the background: trained modules in PEFT ----
peft=$out/peft.txt
: >"$peft"
base=models/default/base modules=models/default/modules
[ -f "$base/config.json" ] || { base=.gpu/peft/base; modules=.gpu/peft/modules; }
d3=()
if [ -x "$lorahub" ] && [ -f "$base/config.json" ]; then
  "$build_dir/bin/core/tasks/make_task_data" --out "$WORK/taskdata" --seed 11 \
    --train-per-task 8 --test-per-task 8 --heldout-examples 5 >/dev/null
  for m in $(ls -d "$modules"/*/ | head -n "${MODULES:-3}"); do
    t=$(basename "$m")
    ex=$WORK/taskdata/pool_test/$t.jsonl
    [ -f "$ex" ] || { failed "D3: no test examples for $t"; continue; }
    ( o=$(timeout 150 "$PY" tests/train/peft_parity.py --model "$base" --adapter "$m" --examples "$ex" \
          --lorahub "$lorahub" 2>&1)
      rc=$?
      { echo "### D3 peft_parity.py, module trained by lorahub train-module: $t (exit $rc)"
        echo "$o" | grep -v -i warn | tail -3; } >"$WORK/d3_$t.txt" ) &
    d3+=($!)
  done
else
  failed "D3: no trained base at models/default/base or .gpu/peft/base"
fi

# ---- E: CUDA tests ----
if [ "${CUDA_TESTS:-0}" = 1 ] && [ -x "$lorahub" ]; then
  stamp "E: CUDA tests"
  LORAHUB_TEST_DEVICE=$DEVICE timeout 240 ctest --test-dir "$build_dir" --output-on-failure \
    -R "golden_test|generate_test|static_decoder|static_encoder|decoder_reuse|objective_runner_test|fused_weights_test|decode_attention|exact_reference_loss_test|fused_residual_attention|objective_ops_test|lora_row_gemv" >"$WORK/ctest.log" 2>&1
  echo "ctest exit $?"
  if [ "${OPTIN_TESTS:-0}" = 1 ]; then
    # The numerics-changing opt-ins (bf16 LoRA deltas, bf16 attention) against the goldens.
    LORAHUB_LORA_BF16=1 LORAHUB_ATTN_BF16=1 LORAHUB_TEST_DEVICE=$DEVICE timeout 120 ctest --test-dir "$build_dir" \
      --output-on-failure -R "golden_test|objective_runner_test|objective_ops_test" >"$WORK/ctest_optin.log" 2>&1
    echo "ctest (LORAHUB_LORA_BF16=1 LORAHUB_ATTN_BF16=1) exit $?"
    grep -E "tests passed|tests failed|\(Failed\)" "$WORK/ctest_optin.log" | tail -5
    cat "$WORK/ctest_optin.log" >>"$WORK/ctest.log"
  fi
  grep -E "tests passed|tests failed|\(Failed\)|fp32 .* logits|single vs general|bf16 k/v|greedy:" "$WORK/ctest.log" | tail -30
  cp "$WORK/ctest.log" "$out/ctest.log"
fi

# ---- C, our side ----
echo "| fixture | reference best (scipy $("$PY" -c 'import scipy; print(scipy.__version__)')) | ours --fast-fp32 best | fast - reference | pass (<= +1e-4) | evaluations (ref / ours) | ours --exact-reference best | exact - reference | exact pass |" >"$out/parity.md"
echo "|---|---|---|---|---|---|---|---|---|" >>"$out/parity.md"
for s in "${spec[@]}"; do
  read -r name _ <<<"$s"
  wait "${refpid[$name]}" || failed "C: $name fixture or reference ($(tail -c 300 "$WORK/traces/$name.ref.err" "$WORK/$name.fixture.log" 2>/dev/null | tr '\n' ' '))"
  [ -f "$WORK/$name/examples.jsonl" ] && [ -x "$lorahub" ] || continue
  stamp "C: $name ours cobyla 40"
  adapters=()
  for m in "$WORK/$name"/modules/m*; do adapters+=(--adapter "$m"); done
  timeout 120 "$lorahub" learn --model "$WORK/$name/base" "${adapters[@]}" --examples "$WORK/$name/examples.jsonl" \
    --optimizer cobyla --budget 40 --dtype fp32 --device "$DEVICE" --fast-fp32 --trace "$WORK/traces/$name.ours.jsonl" --json \
    >"$WORK/traces/$name.ours.json" 2>"$WORK/traces/$name.ours.err" || failed "C: $name ours"
  # The exact reference numerics mode (core/model/exact_reference_loss.h): one candidate at a
  # time with the reference's ATen op sequence.
  timeout 300 "$lorahub" learn --model "$WORK/$name/base" "${adapters[@]}" --examples "$WORK/$name/examples.jsonl" \
    --optimizer cobyla --budget 40 --dtype fp32 --device "$DEVICE" --exact-reference \
    --trace "$WORK/traces/$name.exact.jsonl" --json \
    >"$WORK/traces/$name.exact.json" 2>"$WORK/traces/$name.exact.err" || failed "C: $name ours --exact-reference"
  "$PY" - "$name" "$WORK/traces/$name.ref.json" "$WORK/traces/$name.ours.json" "$WORK/traces/$name.ours.jsonl" \
    "$WORK/traces/$name.exact.json" >>"$out/parity.md" <<'PY' || true
import json, sys
name, rf, of, ot, ef = sys.argv[1:6]
try:
    r = json.load(open(rf)); o = json.loads(open(of).read().strip().splitlines()[-1])
    n_ours = sum(1 for _ in open(ot))
    d = o["best_score"] - r["best_score"]
    try:
        e = json.loads(open(ef).read().strip().splitlines()[-1])["best_score"]
        ex = "%.6f | %+.3g | %s" % (e, e - r["best_score"], "yes" if e - r["best_score"] <= 1e-4 else "NO")
    except Exception as err:
        ex = "n/a | n/a | n/a (%s)" % str(err)[:60]
    print("| %s | %.6f | %.6f | %+.3g | %s | %d / %d | %s |" % (name, r["best_score"], o["best_score"], d,
          "yes" if d <= 1e-4 else "NO", len(r["evaluations"]), n_ours, ex))
except Exception as e:
    print("| %s | n/a | n/a | n/a | n/a (%s) | | | | |" % (name, str(e)[:80]))
PY
  tail -1 "$out/parity.md"
done
tar -C "$WORK" -czf "$out/cobyla_traces.tgz" traces tiny_s0 tiny_s1 tiny_s2 2>/dev/null

# ---- D1, D2: composition methods; exported adapters in PEFT (loss, greedy ids) ----
if [ "${SKIP_D1:-0}" != 1 ]; then
  o=$(timeout 180 "$PY" tests/learn/check_composition_vs_peft.py tests/learn/testdata/composition_cases.json 2>&1)
  rc=$?
  { echo "### D1 check_composition_vs_peft.py (exit $rc)"; echo "$o" | grep -v -i warn | tail -8; } >>"$peft"
fi
if [ -x "$lorahub" ]; then
  for s in ${D2_RUNS:-tiny_s0:lorahub tiny_s0:ties base_s0:lorahub}; do
    name=${s%%:*} method=${s#*:}
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
    { echo "### D2 peft_parity.py, adapter exported by learn --out: $name --method $method (exit $rc)"
      echo "$o" | grep -v -i warn | tail -3; } >>"$peft"
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
    o = list(m["output_ids"])
    # transformers keeps generating after a pad (id 0) like any token; compare without trailing pads.
    while g and g[-1] == 0:
        g.pop()
    while o and o[-1] == 0:
        o.pop()
    same += int(g == o)
    if g != o:
        print("differ:", r["input"][:40], "transformers", g, "lorahub", o)
print(json.dumps({"greedy_equal": same, "prompts": len(rows)}))
sys.exit(0 if same == len(rows) and rows else 1)
PY
)
    rc=$?
    { echo "### D2 greedy ids, transformers+peft vs lorahub generate: $name --method $method (exit $rc)"
      echo "$o" | tail -3; } >>"$peft"
  done
fi
for p in "${d3[@]}"; do wait "$p"; done
cat "$WORK"/d3_*.txt >>"$peft" 2>/dev/null
cat "$peft"

# ---- F: bench ----
if [ "${BENCH:-0}" = 1 ] && [ -x "$lorahub" ]; then
  [ -n "$large_pid" ] && { wait "$large_pid" || failed "large fixture ($(tail -c 300 "$WORK/large.fixture.log"))"; }
  adapters=()
  for m in "$LARGE"/modules/m*; do adapters+=(--adapter "$m"); done
  # bench TAG ENV=VALUE [extra flags...]: one bf16 `lorahub bench`, JSON in $WORK/bench/TAG.json
  mkdir -p "$WORK/bench"
  bench() {
    local tag=$1 envspec=$2; shift 2
    stamp "F: lorahub bench bf16 $tag"
    env $envspec timeout 150 "$lorahub" bench --model "$LARGE/base" "${adapters[@]}" --examples "$LARGE/examples.jsonl" \
      --prompts "$LARGE/prompts.jsonl" --device "$DEVICE" --dtype bf16 --reps "${REPS:-10}" \
      --cmaes-budget "${CMAES_BUDGET:-256}" --population 64 --gen-batch 64 --gen-tokens 32 \
      "$@" --json >"$WORK/bench/$tag.json" 2>"$WORK/bench/$tag.err" \
      || failed "F: bench $tag ($(tail -c 300 "$WORK/bench/$tag.err"))"
    tail -c 1200 "$WORK/bench/$tag.json"; echo
  }
  bench fused LORAHUB_NO_FUSED_GEMMS=0 --profile-out "$WORK/bench/profile.json"
  # A/B runs in the same build, each only while there is time. BENCH_AB lists them:
  # separate (the separate GEMMs), generic_attn (decode steps on PyTorch's fp32
  # scaled-dot-product attention instead of the single-query bmm path), bf16_attn (bf16 decode
  # KV caches and bf16 bmm with fp32 accumulation, experimental), no_fused (every fused
  # kernel off), small_attn_generic (short-query attention back on SDPA), lora_bf16 /
  # obj_attn_bf16 / obj_bf16 (the objective's bf16 LoRA, bf16 attention, both; experimental),
  # no_encoder_graph (the eager encoder in generation instead of the pooled CUDA-graph
  # StaticEncoder: the ttft_ms A/B), no_lora_gemv (per-row LoRA of decode steps as batched
  # GEMMs instead of the shrink/expand kernels), decode_attn_bmm (decode steps' attention as
  # the sixth session's batched GEMVs instead of the short-query kernel), small_attn_scalar (the
  # short-query kernel's one-key-per-warp variant), kernel_bf16_kv (bf16 decode KV caches read by
  # the short-query kernel; experimental), no_gemm_float (adapted projections as bf16 GEMMs then
  # widened, instead of GEMMs with fp32 outputs), no_tiled_attn (encoder-length queries on PyTorch's
  # scaled-dot-product attention instead of the tiled kernel), no_batched_up (one LoRA
  # up-projection GEMM per site instead of one batched GEMM per shared down-projection),
  # no_narrow (a bf16 model's one-adapter LoRA down-projections on cuBLAS instead of NarrowGemm).
  for ab in ${BENCH_AB:-separate}; do
    [ $((SECONDS - start)) -lt "${AB_BEFORE_S:-400}" ] || { echo "F: no time left for $ab"; break; }
    case $ab in
      separate) bench separate LORAHUB_NO_FUSED_GEMMS=1 ;;
      generic_attn) bench generic_attn LORAHUB_DECODE_ATTN_GENERIC=1 ;;
      bf16_attn) bench bf16_attn LORAHUB_DECODE_ATTN_BF16=1 ;;
      no_fused) bench no_fused LORAHUB_NO_FUSED=1 ;;
      small_attn_generic) bench small_attn_generic LORAHUB_SMALL_ATTN_GENERIC=1 ;;
      lora_bf16) bench lora_bf16 LORAHUB_LORA_BF16=1 ;;
      obj_attn_bf16) bench obj_attn_bf16 LORAHUB_ATTN_BF16=1 ;;
      obj_bf16) bench obj_bf16 "LORAHUB_LORA_BF16=1 LORAHUB_ATTN_BF16=1" --profile-out "$WORK/bench/profile_obj_bf16.json" ;;
      no_encoder_graph) bench no_encoder_graph LORAHUB_NO_ENCODER_GRAPH=1 ;;
      no_lora_gemv) bench no_lora_gemv LORAHUB_NO_LORA_GEMV=1 ;;
      decode_attn_bmm) bench decode_attn_bmm LORAHUB_DECODE_ATTN_BMM=1 ;;
      small_attn_scalar) bench small_attn_scalar LORAHUB_SMALL_ATTN_SCALAR=1 ;;
      kernel_bf16_kv) bench kernel_bf16_kv LORAHUB_DECODE_ATTN_BF16=1 ;;
      no_gemm_float) bench no_gemm_float LORAHUB_NO_GEMM_FLOAT=1 ;;
      no_tiled_attn) bench no_tiled_attn LORAHUB_NO_TILED_ATTN=1 ;;
      no_batched_up) bench no_batched_up LORAHUB_NO_BATCHED_UP=1 ;;
      no_narrow) bench no_narrow LORAHUB_NO_NARROW_GEMM=1 ;;
      *) failed "F: unknown BENCH_AB entry $ab" ;;
    esac
  done
  tar -C "$WORK" -czf "$out/bench.tgz" bench
fi

if [ ${#bg[@]} -gt 0 ]; then
  stamp "waiting for A and B"
  for p in "${bg[@]}"; do wait "$p"; done
  cat "$WORK/scipy.log"; grep -v -i warn "$WORK/goldens.log" | tail -30
  cp "$WORK/goldens.log" "$out/goldens.log" 2>/dev/null
fi
stamp "done"
