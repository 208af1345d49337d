#!/usr/bin/env bash
# Run ON THE GPU HOST after deploy/gpu/build_and_test.sh (the CMake build):
# retrains ONLY the 25 pool modules of the embedded default against the
# committed base (models/default/base, unchanged) with make_default.sh's
# module recipe, checks one module against transformers+peft, runs the
# accuracy study (deploy/embedded/study.sh) on $device against the new modules
# and packs the results under $OUT.
#
#   bash deploy/gpu/retrain_modules.sh NAME [VAR=VALUE ...]
#
# VAR=VALUE pairs override make_default.sh's settings (MODULE_FLAGS,
# LORA_FLAGS, MODULE_DTYPE, TRAIN_PER_TASK, MODULE_JOBS, TASKS, ...) and this
# script's: STUDY_JOBS (study units at once, default 12), STUDY=0 (skip the
# study), SEEDS/TEST_N/... (passed to study.sh as well).
#
# Output ($OUT, default .gpu/logs; 2 files):
#   NAME-modules.tgz  modules/<task>/ (bf16 safetensors), tasks.json,
#                     train_log.jsonl, make_default.log
#   NAME-study.tgz    study.md (own-task table, held-out, recovery),
#                     study.jsonl, study.log, peft_parity.log
# On the dev machine:
#   rm -rf models/default/modules && tar -xzf NAME-modules.tgz -C models/default
#   (then models/default/train_log.jsonl holds the module lines only).
set -euo pipefail
cd "$(dirname "$0")/../.."
name=${1:?usage: retrain_modules.sh NAME [VAR=VALUE ...]}
shift
build=${BUILD_DIR:-$PWD/.gpu/build}
out=${OUT:-$PWD/.gpu/logs}
lorahub="$build/bin/server/lorahub"
make_task_data="$build/bin/core/tasks/make_task_data"
[ -x "$lorahub" ] || { echo "no $lorahub: run deploy/gpu/build_and_test.sh first" >&2; exit 2; }
# VAR=VALUE pairs this script reads itself (the rest go to the children's env).
for kv in "$@"; do
  case "$kv" in
    STUDY_JOBS=* | STUDY=* | MODULE_JOBS=*) eval "${kv%%=*}=\"\${kv#*=}\"" ;;
  esac
done
base="$PWD/models/default/base"
dest=/tmp/modules-$name
work=/tmp/modules-$name-work
rm -rf "$dest" "$work"
mkdir -p "$out" "$dest"
start=$(date +%s)
device=${DEVICE:-cuda:0}
# A small model on one GPU is bound by kernel launches: one CPU thread per
# process and MODULE_JOBS processes at once use the GPU best.
export OMP_NUM_THREADS=1

echo "== $name: 25 modules on $device against $base"
env DEVICE="$device" BASE_DIR="$base" MODULE_JOBS="${MODULE_JOBS:-13}" KEEP_WORK=1 \
  LORAHUB="$lorahub" MAKE_TASK_DATA="$make_task_data" "$@" \
  OUT="$dest" WORK="$work" bash deploy/embedded/make_default.sh > "$dest/make_default.log" 2>&1 ||
  { tail -20 "$dest/make_default.log"; exit 1; }
t_train=$(( $(date +%s) - start ))
echo "== modules done in $t_train s; $(du -sh "$dest/modules" | cut -f1); models/default would be" \
  "$(( ($(du -sb "$base" | cut -f1) + $(du -sb "$dest/modules" | cut -f1)) / 1000 )) kB + tasks/logs"

# PEFT loads a module as stored (bf16 by default) with the same loss as lorahub.
task=$(ls "$dest/modules" | head -1)
head -n 16 "$work/data/pool_test/$task.jsonl" > "$work/parity.jsonl"
if python3 tests/train/peft_parity.py --model "$base" --adapter "$dest/modules/$task" \
    --examples "$work/parity.jsonl" --lorahub "$lorahub" > "$dest/peft_parity.log" 2>&1; then
  echo "== peft parity ($task): ok $(tail -1 "$dest/peft_parity.log")"
else
  echo "== peft parity ($task): FAILED"; tail -5 "$dest/peft_parity.log"
fi

if [ "${STUDY:-1}" != 0 ]; then
  t0=$(date +%s)
  echo "== study on $device (JOBS ${STUDY_JOBS:-12})"
  env DEVICE="$device" JOBS="${STUDY_JOBS:-12}" LORAHUB="$lorahub" MAKE_TASK_DATA="$make_task_data" \
    "$@" BASE="$base" MODULES="$dest/modules" OUT="$dest/study" \
    bash deploy/embedded/study.sh > "$dest/study.log" 2>&1 ||
    { tail -20 "$dest/study.log"; exit 1; }
  echo "== study done in $(( $(date +%s) - t0 )) s"
  cat "$dest/study/study.md"
fi

tar -C "$dest" -czf "$out/$name-modules.tgz" modules tasks.json train_log.jsonl make_default.log
study_files=(peft_parity.log)
[ -d "$dest/study" ] && { cp "$dest/study.log" "$dest/study/"; study_files+=(study); }
tar -C "$dest" -czf "$out/$name-study.tgz" "${study_files[@]}"
ls -la "$out/$name-modules.tgz" "$out/$name-study.tgz"
echo "== $name: all done in $(( $(date +%s) - start )) s (module training $t_train s)"
