#!/usr/bin/env bash
# Run ON THE GPU HOST from the repository root: one call that builds, checks the
# engine's numbers on CUDA and measures it against the reference.
#   OUT=... bash deploy/gpu/perf_check.sh
# 1. writes the large fixture in the background (ref_lorahub.py, ~1 min) while
#    deploy/gpu/build_and_test.sh builds (no tests);
# 2. CUDA engine tests: golden, generate and objective-runner tests with
#    LORAHUB_TEST_DEVICE=cuda:0 (issue 3's CUDA parity), log in $OUT/cuda_tests.log;
# 3. deploy/gpu/parity_large.sh (lorahub score vs ref_lorahub.py score);
# 4. deploy/gpu/bench.sh (reference and ours side by side), and, with AB=1, `lorahub
#    bench` again with LORAHUB_NO_FUSED=1 (the ATen fallbacks) for an A/B of the kernels.
# Everything is written under /tmp/perf_out and packed into $OUT/perf.tgz (the device
# tool brings back at most 8 files); the summary goes to stdout.
# Environment: SKIP_TESTS=1, SKIP_PARITY=1, SKIP_BENCH=1, AB=1, REPS, CMAES_BUDGET;
# QUICK=1: instead of bench.sh, only ours (fused kernels on and, unless AB=0, off; fp32
# and bf16).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=/tmp/perf_out
rm -rf "$out" && mkdir -p "$out"
trap 'mkdir -p "${OUT:-.gpu/logs}" && tar -C "$out" -czf "${OUT:-.gpu/logs}/perf.tgz" .' EXIT
start=$SECONDS
fx=${FIXTURE:-/tmp/lorahub_large}
if [ ! -f "$fx/examples.jsonl" ]; then
  (python3 .gpu/bench/ref_lorahub.py fixture --out "$fx" --size large --format bin > "$out/fixture.log" 2>&1) &
  fixture_pid=$!
fi
OUT=/tmp/build_logs CTEST_ARGS="-R ^NONE$ --no-tests=ignore" bash deploy/gpu/build_and_test.sh > "$out/build.log" 2>&1
echo "== build exit $? in $((SECONDS - start)) s"
grep -E "CUDA-only|nvcc|keeps its CPU|does not compile|error" "$out/build.log" | head -20
[ -x .gpu/build/bin/server/lorahub ] || { tail -40 "$out/build.log"; exit 1; }
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  LORAHUB_TEST_DEVICE=cuda:0 ctest --test-dir .gpu/build --output-on-failure \
    -R "golden_test|generate_test|objective_runner_test|model_test|objective_fast_path" \
    > "$out/cuda_tests.log" 2>&1
  echo "== CUDA engine tests exit $? [$((SECONDS - start)) s]"
  grep -E "tests passed|Failed|\*\*\*|FAILED" "$out/cuda_tests.log" | head -20
fi
[ -n "${fixture_pid:-}" ] && wait "$fixture_pid"
if [ "${SKIP_PARITY:-0}" != 1 ]; then
  OUT=$out timeout 180 bash deploy/gpu/parity_large.sh > /dev/null 2>&1
  echo "== parity_large exit $? [$((SECONDS - start)) s]"
  tail -8 "$out/parity_large.log"
fi
ours_bench() {  # ours_bench DTYPE TAG [ENV=VALUE...]: one `lorahub bench`, a summary line
  local dtype=$1 tag=$2; shift 2
  adapters=(); for m in "$fx"/modules/m*; do adapters+=(--adapter "$m"); done
  env "$@" timeout 150 .gpu/build/bin/server/lorahub bench --model "$fx/base" "${adapters[@]}" \
    --examples "$fx/examples.jsonl" --prompts "$fx/prompts.jsonl" --device cuda:0 --dtype "$dtype" \
    --reps "${REPS:-30}" --cmaes-budget "${CMAES_BUDGET:-640}" --population 64 --gen-batch 64 \
    --gen-tokens 32 --json > "$out/ours_${dtype}_$tag.json" 2>&1
  python3 - "$out/ours_${dtype}_$tag.json" "$dtype $tag" <<'PY'
import json, sys
try:
    j = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception as e:
    print(sys.argv[2], "FAILED", open(sys.argv[1]).read()[-800:]); sys.exit()
g = j.get("generation", {})
print("%s: eval %.3f ms (p90 %.3f), cobyla40 %.3f s, cmaes %.0f cand/s, gen base %.0f merged %.0f per-row %.0f tok/s, ttft %.2f ms, compose %.4f s, cold %.2f s, fused %s, engine %s, fast-vs-eager %.2g" % (
    sys.argv[2], j["eval_ms_median"], j["eval_ms_p90"], j["cobyla40_seconds"], j["cmaes_candidates_per_second"],
    g["base"]["tokens_per_second"], g["merged"]["tokens_per_second"], g["per_row"]["tokens_per_second"],
    g["ttft_ms"], j["compose_seconds"], j["cold_start_seconds"], j.get("fused_kernels"), j.get("engine"),
    j.get("fast_vs_eager_rel_diff", -1)))
PY
}
if [ "${QUICK:-0}" = 1 ]; then  # ours only: fused kernels on and off, fp32 and bf16
  for dtype in fp32 bf16; do
    ours_bench $dtype fused
    [ "${AB:-1}" = 1 ] && ours_bench $dtype nofused LORAHUB_NO_FUSED=1
  done
  echo "== quick bench [$((SECONDS - start)) s]"
elif [ "${SKIP_BENCH:-0}" != 1 ]; then
  OUT=$out bash deploy/gpu/bench.sh > /dev/null 2>&1
  echo "== bench [$((SECONDS - start)) s]"
  cat "$out/bench/table.md"
  if [ "${AB:-0}" = 1 ]; then
    for dtype in fp32 bf16; do ours_bench $dtype nofused LORAHUB_NO_FUSED=1; done
  fi
fi
echo "== done in $((SECONDS - start)) s"
