#!/usr/bin/env bash
# Run ON THE GPU HOST from the repository root: one serving figure in the least device time.
# Builds only `lorahub` and `lorahubctl` (no tests), writes the flan-t5-large-shaped fixture
# meanwhile, then runs one deploy/gpu/multi_gpu.sh round on cuda:0 under the caller's
# environment (e.g. WEIGHT_JITTER=1: every request its own composition; DEVICE_CACHE_BYTES).
# About 150 s on an H200 host, against 250-280 s for deploy/gpu/perf_ab.sh with SERVE=1.
# Logs land in $OUT/serve_only.tgz; the summary goes to stdout.
#   OUT=DIR [WEIGHT_JITTER=1] [GEN_REQUESTS=1024] [JOBS=1] bash deploy/gpu/serve_only.sh
# Carry .gpu/debs and .gpu/bench, as for perf_ab.sh.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
work=/tmp/serve_only
rm -rf "$work" && mkdir -p "$work"
trap 'mkdir -p "${OUT:-.gpu/logs}" && tar -C "$work" -czf "${OUT:-.gpu/logs}/serve_only.tgz" .' EXIT
start=$SECONDS
fx=${FIXTURE:-/tmp/lorahub_large}
if [ ! -f "$fx/examples.jsonl" ]; then
  (python3 .gpu/bench/ref_lorahub.py fixture --out "$fx" --size large --format bin \
     >"$work/fixture.log" 2>&1) &
  fixture_pid=$!
fi
OUT=$work/build CTEST_ARGS="-R ^NONE$ --no-tests=ignore" \
  NINJA_TARGETS="server_lorahub client_lorahubctl" \
  bash deploy/gpu/build_and_test.sh >"$work/build.log" 2>&1
echo "== build exit $?  [$((SECONDS - start)) s]"
[ -x .gpu/build/bin/server/lorahub ] && [ -x .gpu/build/bin/client/lorahubctl ] ||
  { grep -E -m 20 -A6 'error|FAILED' "$work/build.log"; tail -30 "$work/build.log"; exit 1; }
if [ -n "${fixture_pid:-}" ]; then
  wait "$fixture_pid" || { tail -20 "$work/fixture.log"; exit 1; }
fi
echo "== fixture ready  [$((SECONDS - start)) s]"
OUT=$work/serve FIXTURE="$fx" DEVICE_SETS=cuda:0 GEN_REQUESTS="${GEN_REQUESTS:-1024}" \
  JOBS="${JOBS:-1}" timeout 300 bash deploy/gpu/multi_gpu.sh |
  grep -E '^\| cuda|gen:|jobs:|failed|did not'
grep -h "lorahub engine" "$work/serve/multi_gpu.log"
echo "== done  [$((SECONDS - start)) s]"
