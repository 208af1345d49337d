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
# Environment: SKIP_TESTS=1, SKIP_PARITY=1, SKIP_BENCH=1, AB=1, REPS, CMAES_BUDGET.
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
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  OUT=$out bash deploy/gpu/bench.sh > /dev/null 2>&1
  echo "== bench [$((SECONDS - start)) s]"
  cat "$out/bench/table.md"
  if [ "${AB:-0}" = 1 ]; then
    adapters=(); for m in "$fx"/modules/m*; do adapters+=(--adapter "$m"); done
    for dtype in fp32 bf16; do
      LORAHUB_NO_FUSED=1 timeout 120 .gpu/build/bin/server/lorahub bench --model "$fx/base" "${adapters[@]}" \
        --examples "$fx/examples.jsonl" --prompts "$fx/prompts.jsonl" --device cuda:0 --dtype $dtype \
        --reps "${REPS:-30}" --cmaes-budget "${CMAES_BUDGET:-640}" --population 64 --gen-batch 64 \
        --gen-tokens 32 --json > "$out/bench/ours_${dtype}_nofused.json" 2>&1
      echo "== no-fused $dtype: $(tail -c 1500 "$out/bench/ours_${dtype}_nofused.json")"
    done
  fi
fi
echo "== done in $((SECONDS - start)) s"
