#!/usr/bin/env bash
# deploy/gpu/persistent_decoder_ab.sh's control flow, here, with fakes of what it runs on the GPU
# host (its bench, the CMake build and tests, perf_ab.sh): the numerics gate, a hung variant cut
# off by its time limit, the fastest counted variant's macros as CUDAFLAGS, every engine test run,
# and the A/B list with and without the persistent decoder. A mistake in the script costs a
# session's scarce device time, so it is caught here.
#   persistent_decoder_ab_test.sh SCRIPT
set -uo pipefail
script=$(readlink -f "$1")
real_python=$(command -v python3)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

repo=$tmp/repo
mkdir -p "$repo/deploy/gpu" "$tmp/bin"
cp "$script" "$repo/deploy/gpu/"
# The bench: a time and errors a variant (its --define macros); CTA_CROSS hangs.
cat >"$tmp/bin/python3" <<PY
#!/usr/bin/env bash
[ "\${1:-}" = deploy/gpu/decoder_kernel_bench.py ] || exec "$real_python" "\$@"
[[ " \$* " == *" --compile-only "* ]] && exit 0
us=1200 err=8.1e-02
[[ "\$*" == *INLINE_ALL* ]] && us=1100
[[ "\$*" == *HEAD_COUNTERS* ]] && us=1000
[[ "\$*" == *V_BATCH=24* ]] && us=900 err=9.0e-01
[[ "\$*" == *CTA_CROSS* ]] && sleep 60
echo "kernel  : stream max|err|/max|ref| \$err; final norm out: ..."
echo "torch32 : stream max|err|/max|ref| 7.4e-02; final norm out: ..."
echo "persistent decoder: \$us.0 us a decoder (of which memset+copy 11.7 us)"
PY
chmod +x "$tmp/bin/python3"
# The build: a binary a test it was asked for, which says it passed.
cat >"$repo/deploy/gpu/build_and_test.sh" <<'SH'
for target in $NINJA_TARGETS; do
  name=${target#tests_model_}
  mkdir -p .gpu/build/bin/tests/model
  printf '#!/bin/sh\necho "[  PASSED  ] %s on $LORAHUB_TEST_DEVICE"\n' "$name" \
    >".gpu/build/bin/tests/model/$name"
  chmod +x ".gpu/build/bin/tests/model/$name"
done
SH
cat >"$repo/deploy/gpu/perf_ab.sh" <<'SH'
echo "perf_ab ABS=[$ABS] SKIP_TESTS=$SKIP_TESTS STOP_S=$STOP_S"
SH

run() {  # run OUT [VAR=VALUE...]: the script's output in $tmp/OUT.log
  local out=$1; shift
  (cd "$repo" && env PATH="$tmp/bin:$PATH" OUT="$tmp/$out" VARIANT_S=3 "$@" \
    bash deploy/gpu/persistent_decoder_ab.sh) >"$tmp/$out.log" 2>&1
}

start=$SECONDS
run out1 || fail "exit status $?: $(cat "$tmp/out1.log")"
[ $((SECONDS - start)) -lt 45 ] || fail "the hung variant was not cut off ($((SECONDS - start)) s)"
log=$tmp/out1.log
grep -q '^variant \[LORAHUB_PD_EXP_CTA_CROSS\]: failed us$' "$log" || fail "hung variant: $(cat "$log")"
grep -q '^variant \[LORAHUB_PD_EXP_V_BATCH=24\]: stream error 9.0e-01 > 2 x torch' "$log" ||
  fail "the numerics gate let V_BATCH=24 through"
grep -q '^variant \[LORAHUB_PD_EXP_V_BATCH=24\]: failed us$' "$log" || fail "V_BATCH=24 counted"
grep -q '^variant \[\]: 1200.0 us$' "$log" || fail "the defaults' time"
grep -q '^fastest: \[LORAHUB_PD_EXP_HEAD_COUNTERS\] 1000.0 us$' "$log" || fail "fastest: $(cat "$log")"
grep -q '^CUDAFLAGS= -DLORAHUB_PD_EXP_HEAD_COUNTERS$' "$log" || fail "CUDAFLAGS"
for t in persistent_decoder_test low_rank_merge_test stream_branch_test objective_runner_test; do
  grep -q "^\[  PASSED  \] $t on cuda:0$" "$log" || fail "$t did not run"
done
grep -q '^perf_ab ABS=\[pd LORAHUB_PERSISTENT_DECODER=1 -- --profile-out .*; bm64 LORAHUB_BESIDE_MERGE_BLOCKS=64 .*; pd2 LORAHUB_PERSISTENT_DECODER=1\] SKIP_TESTS=1 STOP_S=300$' \
  "$log" || fail "A/B with the persistent decoder: $(grep perf_ab "$log")"
# $OUT/sweep.txt: the bench's own lines of the 8 variants that did not hang, and the verdicts.
sweep=$tmp/out1/sweep.txt
[ "$(grep -c '^persistent decoder: ' "$sweep")" = 8 ] || fail "bench lines: $(cat "$sweep")"
grep -q '^fastest: \[LORAHUB_PD_EXP_HEAD_COUNTERS\] 1000.0 us$' "$sweep" || fail "sweep.txt"

run out2 AB_BELOW_US=1000 || fail "exit status $? (AB_BELOW_US)"
grep -q '^no persistent decoder A/B: the fastest variant takes 1000.0 us >= 1000 us$' \
  "$tmp/out2.log" || fail "AB_BELOW_US: $(cat "$tmp/out2.log")"
grep -q '^perf_ab ABS=\[bm64 .*pm64b LORAHUB_PIPELINED_MERGE=1 LORAHUB_BESIDE_MERGE_BLOCKS=64\]' \
  "$tmp/out2.log" || fail "A/B without the persistent decoder: $(grep perf_ab "$tmp/out2.log")"
grep -q 'PERSISTENT_DECODER' <(grep '^perf_ab' "$tmp/out2.log") && fail "pd in the A/B"

run out3 VARIANTS="LORAHUB_PD_EXP_SPREAD_TASKS" ABS="only LORAHUB_X=1" ||
  fail "exit status $? (VARIANTS, ABS)"
grep -q '^fastest: \[LORAHUB_PD_EXP_SPREAD_TASKS\] 1200.0 us$' "$tmp/out3.log" || fail "VARIANTS"
grep -q '^perf_ab ABS=\[only LORAHUB_X=1\]' "$tmp/out3.log" || fail "ABS not passed through"
echo "PASS"
