#!/usr/bin/env bash
# Run ON THE GPU HOST after deploy/gpu/perf_ab.sh in the same call (it builds .gpu/build and
# writes the fixture): Nsight Compute on chosen kernels of one `lorahub bench` with as little
# objective work as the bench takes, so that the launches wanted come early.
#
# Why a script: two ad-hoc attempts (thirteenth session) profiled the wrong launches. A regex
# such as "AddRmsNorm" also matches the objective's plain norms, which run long before the
# decode steps; --filter-mode per-launch-config spent its time on the objective's configs.
# Name kernels that run where you want them: AddRmsNormShrinkKernel and LoraShrinkKernel run
# only in per-row decode steps (the bench's per-row generation, after base and merged);
# SplitKeyAttentionKernel runs in every generation's decode steps (the base model's first).
#
#   OUT=DIR [KERNELS="AddRmsNormShrinkKernel SplitKeyAttentionKernel"] [SKIP=100] [COUNT=3] \
#     [TIMEOUT_S=120] [NAME_BASE=demangled] bash deploy/gpu/ncu_kernels.sh
# A name may carry its own skip as NAME@SKIP (e.g. "RegisterTiledAttentionKernel@20
# RegisterTiledAttentionKernel@2000": an objective evaluation's launch and a population pass's);
# reports are named after NAME and SKIP then, each character but letters, digits and _ as _.
# NAME_BASE=demangled matches names against the demangled signature, which ncu writes with
# its template arguments cast (a regex without spaces, e.g. "RunExpandKernel<.int.4,..int.32>"
# for RunExpandKernel<(int)4, (int)32>); ncu's default, function, has the bare name only.
#
# For each kernel name K: ncu --kernel-name regex:K --launch-skip SKIP --launch-count COUNT
# --set full -> $OUT/ncu_K.ncu-rep, its details page in $OUT/ncu_K.txt, its SASS with each
# instruction's executions and stall samples in $OUT/ncu_K_sass.csv, and the lines people read
# first (duration, throughput, occupancy, warp stall reasons) in $OUT/ncu_summary.txt and stdout.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
out=${OUT:-.gpu/logs}
mkdir -p "$out"
ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "no ncu on this host"; exit 2; }
lorahub=.gpu/build/bin/server/lorahub
fx=${FIXTURE:-/tmp/lorahub_large}
[ -x "$lorahub" ] && [ -f "$fx/examples.jsonl" ] ||
  { echo "run deploy/gpu/perf_ab.sh first (no $lorahub or no fixture in $fx)"; exit 2; }
adapters=()
for m in "$fx"/modules/m*; do adapters+=(--adapter "$m"); done
summary=$out/ncu_summary.txt
: >"$summary"
for spec in ${KERNELS:-AddRmsNormShrinkKernel SplitKeyAttentionKernel}; do
  name=${spec%@*}
  skip=${SKIP:-100}
  k=$name
  if [ "$spec" != "$name" ]; then skip=${spec#*@}; k=${name}_$skip; fi
  k=$(printf '%s' "$k" | tr -c 'A-Za-z0-9_' '_')
  echo "== $name (skip $skip, count ${COUNT:-3})" | tee -a "$summary"
  timeout "${TIMEOUT_S:-120}" "$ncu" --kernel-name-base "${NAME_BASE:-function}" \
    --kernel-name "regex:$name" --launch-skip "$skip" \
    --launch-count "${COUNT:-3}" --set full --import-source no -f -o "$out/ncu_$k" \
    "$lorahub" bench --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
    --prompts "$fx/prompts.jsonl" --device cuda:0 --dtype bf16 --reps 1 --cobyla-budget 4 \
    --cmaes-budget 64 --population 64 --gen-batch 64 --gen-tokens 32 --json \
    >"$out/ncu_$k.log" 2>&1
  echo "ncu exit $?" | tee -a "$summary"
  [ -f "$out/ncu_$k.ncu-rep" ] || continue
  "$ncu" --import "$out/ncu_$k.ncu-rep" --page details >"$out/ncu_$k.txt" 2>&1
  # Per SASS instruction: executions and warp stall samples (where the cycles go).
  "$ncu" --import "$out/ncu_$k.ncu-rep" --page source --print-source sass --csv \
    >"$out/ncu_${k}_sass.csv" 2>&1
  grep -E '^  [a-zA-Z_].*\(([0-9]+, ){2}[0-9]+\)x|Duration|DRAM Throughput|L2 Hit Rate|Achieved Occupancy|Registers Per Thread|No Eligible|Warp Cycles Per Issued|Stall' \
    "$out/ncu_$k.txt" | tee -a "$summary"
done
