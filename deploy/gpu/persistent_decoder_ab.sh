#!/usr/bin/env bash
# Run ON THE GPU HOST from the repository root: the persistent decoder's variants in one call.
#  1. deploy/gpu/decoder_kernel_bench.py once per variant of VARIANTS (';'-separated lists of
#     the header's experiment macros, "" the defaults), all compiled at once first: its phase
#     table and us a decoder -> $OUT/sweep.txt;
#  2. the fastest variant's macros become CUDAFLAGS (CMake's initial CMAKE_CUDA_FLAGS) of a
#     fresh build: the engine tests of the kernel and of the merges below on the device
#     (tests/model/ persistent_decoder_test, low_rank_merge_test, stream_branch_test,
#     objective_runner_test -> sweep.txt);
#  3. deploy/gpu/perf_ab.sh without its suites (SKIP_TESTS=1): the engine's A/B, ABS (default:
#     the merges beside the encoder on 64 and 132 blocks, the encoder's merge pipelined, both,
#     and the persistent decoder twice where it is fast enough, against main; STOP_S default
#     300), then three of its runs' evaluation traces place by place (-> sweep.txt).
# About 9-10 minutes on a fresh H100; $OUT keeps what finished if the call's limit cuts it.
# Carry .gpu/debs and .gpu/bench (perf_ab.sh's). Everything perf_ab.sh returns, plus sweep.txt.
#   OUT=DIR [VARIANTS="; LORAHUB_PD_EXP_SPREAD_TASKS"] bash deploy/gpu/persistent_decoder_ab.sh
# VARIANTS' default: the defaults, everything inlined (the code-size A/B), attention tasks spread,
# 24 keys' values loaded at once, the self-attention inside the o phase or inside the q|k|v
# phase, the cross keys and values prefetched into L2, the cross-attention a CTA a (row, head),
# two combinations.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
mkdir -p "$OUT"
# Time limits (s): a variant whose grid barriers or counters never release
# hangs its cooperative launch, and without them it would take the call's
# whole limit with it; `timeout` kills the process and the driver its
# context, and the sweep goes on ("failed").
COMPILE_S=${COMPILE_S:-240} VARIANT_S=${VARIANT_S:-60} TEST_S=${TEST_S:-120}
best="" best_us=""
P=LORAHUB_PD_EXP_
default_variants=(
  ""
  "${P}INLINE_ALL"
  "${P}SPREAD_TASKS"
  "${P}V_BATCH=24"
  "${P}FUSED_SELF_ATTN"
  "${P}HEAD_COUNTERS"
  "${P}PREFETCH_CROSS"
  "${P}CTA_CROSS"
  "${P}HEAD_COUNTERS ${P}CTA_CROSS ${P}PREFETCH_CROSS"
  "${P}FUSED_SELF_ATTN ${P}SPREAD_TASKS ${P}V_BATCH=24 ${P}PREFETCH_CROSS"
)
if [ -n "${VARIANTS+x}" ]; then
  IFS=';' read -ra variants <<<"$VARIANTS"
else
  variants=("${default_variants[@]}")
fi
[ ${#variants[@]} -eq 0 ] && variants=("")
# Every variant compiled at once into CuPy's cache (one nvcc each, on the host's cores), so that
# the timed runs below load their modules.
for v in "${variants[@]}"; do
  flags=()
  for d in $v; do flags+=(--define "$d"); done
  timeout "$COMPILE_S" python3 deploy/gpu/decoder_kernel_bench.py --compile-only \
    ${flags[@]+"${flags[@]}"} >/dev/null 2>&1 &
done
wait
for v in "${variants[@]}"; do
  flags=()
  for d in $v; do flags+=(--define "$d"); done
  log=$(timeout -k 5 "$VARIANT_S" python3 deploy/gpu/decoder_kernel_bench.py \
    ${flags[@]+"${flags[@]}"} 2>&1 |
    grep -v -e DeprecationWarning -e 'run_kernel()' | tee -a "$OUT/sweep.txt")
  us=$(sed -nE 's/^persistent decoder: ([0-9.]+) us.*/\1/p' <<<"$log")
  # A variant counts only where its stream's error against float64 is at most twice torch's
  # fp32 arithmetic's (the defaults: 8.1e-02 against 7.4e-02).
  err=$(sed -nE 's/^kernel *: stream max\|err\|\/max\|ref\| ([0-9.e+-]+);.*/\1/p' <<<"$log")
  err32=$(sed -nE 's/^torch32 *: stream max\|err\|\/max\|ref\| ([0-9.e+-]+);.*/\1/p' <<<"$log")
  if [ -n "$us" ] && ! python3 -c "import sys; sys.exit(not ${err:-1e9} <= 2 * ${err32:-0})"; then
    echo "variant [${v}]: stream error ${err:-?} > 2 x torch's ${err32:-?}: not counted" |
      tee -a "$OUT/sweep.txt"
    us=""
  fi
  echo "variant [${v}]: ${us:-failed} us" | tee -a "$OUT/sweep.txt"
  if [ -n "$us" ] &&
    { [ -z "$best_us" ] || python3 -c "import sys; sys.exit(not $us < $best_us)"; }; then
    best=$v best_us=$us
  fi
done
echo "fastest: [${best}] ${best_us} us" | tee -a "$OUT/sweep.txt"
defines=""
for d in $best; do defines+=" -D$d"; done
export CUDAFLAGS="${CUDAFLAGS:-}$defines"
echo "CUDAFLAGS=$CUDAFLAGS" | tee -a "$OUT/sweep.txt"
# The engine tests of what the A/B switches on first (their build is most of the engine's): the
# kernel's; LowRankMerge's max_blocks; StreamBranch's marks; the objective runner's pipelined
# merge on 3 blocks against the merge in line (the same bits). Then the A/B.
tests="persistent_decoder_test low_rank_merge_test stream_branch_test objective_runner_test"
OUT=/tmp/pd_build CTEST_ARGS="-R ^NONE$ --no-tests=ignore" \
  NINJA_TARGETS="$(for t in $tests; do printf 'tests_model_%s ' "$t"; done)" \
  bash deploy/gpu/build_and_test.sh >/tmp/pd_build.log 2>&1 ||
  tail -20 /tmp/pd_build.log | tee -a "$OUT/sweep.txt"
for test in $tests; do
  test_bin=$(find .gpu/build -type f -name "$test" -perm -u+x 2>/dev/null | head -1)
  if [ -n "$test_bin" ]; then
    LORAHUB_TEST_DEVICE=cuda:0 timeout -k 5 "$TEST_S" "$test_bin" 2>&1 | tail -40 |
      tee -a "$OUT/sweep.txt"
  else
    echo "no $test binary" | tee -a "$OUT/sweep.txt"
  fi
done
# The A/B (ABS overrides) against main: the merges beside the encoder on 64 and 132 blocks
# (LORAHUB_BESIDE_MERGE_BLOCKS), the encoder's merge pipelined block by block beside it
# (LORAHUB_PIPELINED_MERGE), both, the persistent decoder only where the kernel alone beats the
# unfused decoder's 1,152 us (the seventy-ninth session's trace, H100) or AB_BELOW_US.
B=LORAHUB_BESIDE_MERGE_BLOCKS PM=LORAHUB_PIPELINED_MERGE
# bm64, pm64 and pd keep a trace of their evaluation (printed place by place below).
PROF="-- --profile-out /tmp/perf_ab/profile"
ab="bm64 $B=64 $PROF.bm64.json; pm $PM=1; pm64 $PM=1 $B=64 $PROF.pm64.json; bm132 $B=132; main2"
ab="$ab; bm64b $B=64; pm64b $PM=1 $B=64"
if python3 -c "import sys; sys.exit(not ${best_us:-1e9} < ${AB_BELOW_US:-1152})"; then
  ab="pd LORAHUB_PERSISTENT_DECODER=1 $PROF.pd.json; $ab; pd2 LORAHUB_PERSISTENT_DECODER=1"
else
  echo "no persistent decoder A/B: the fastest variant takes ${best_us:-?} us >=" \
    "${AB_BELOW_US:-1152} us" | tee -a "$OUT/sweep.txt"
fi
SKIP_TESTS=1 ABS="${ABS:-$ab}" STOP_S="${STOP_S:-300}" OUT="$OUT" bash deploy/gpu/perf_ab.sh
for tag in bm64 pm64 pd; do
  f=/tmp/perf_ab/profile.$tag.json
  if [ -f "$f" ]; then
    { echo "== $tag"; python3 deploy/gpu/profile_compare.py "$f" --top 0; } |
      tee -a "$OUT/sweep.txt"
  fi
done
