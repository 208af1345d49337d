#!/usr/bin/env bash
# Run ON THE GPU HOST after deploy/gpu/build_and_test.sh (the CMake build):
# regenerates the embedded default with deploy/embedded/make_default.sh on
# cuda:0 and packs it under $OUT so that it comes back to the dev machine.
#
#   bash deploy/gpu/train_default.sh NAME [VAR=VALUE ...]
#
# NAME names the run (output /tmp/default-NAME, archives $OUT/NAME-base.tgz
# (with the logs) and $OUT/NAME-modules.tgz); VAR=VALUE pairs override
# make_default.sh's settings (BASE_FLAGS, MODULE_FLAGS, LORA_FLAGS, CONFIG,
# TRAIN_PER_TASK, VOCAB, SEED, ...). Several runs may share the GPU at once:
#   bash deploy/gpu/train_default.sh a & bash deploy/gpu/train_default.sh b SEED=2 & wait
# On the dev machine: mkdir -p models/default && tar -xzf NAME-base.tgz -C
# models/default && tar -xzf NAME-modules.tgz -C models/default.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=${1:?usage: train_default.sh NAME [VAR=VALUE ...]}
shift
build=${BUILD_DIR:-$PWD/.gpu/build}
out=${OUT:-$PWD/.gpu/logs}
[ -x "$build/bin/server/lorahub" ] || { echo "no $build/bin/server/lorahub: run deploy/gpu/build_and_test.sh first" >&2; exit 2; }
dest=/tmp/default-$name
rm -rf "$dest"
mkdir -p "$out"
start=$(date +%s)
env DEVICE=cuda:0 OUT="$dest" LORAHUB="$build/bin/server/lorahub" \
  MAKE_TASK_DATA="$build/bin/core/tasks/make_task_data" "$@" \
  bash deploy/embedded/make_default.sh > /tmp/make_default-$name.log 2>&1 ||
  { tail -20 "/tmp/make_default-$name.log"; exit 1; }
cp "/tmp/make_default-$name.log" "$dest/make_default.log"
echo "== $name: done in $(( $(date +%s) - start )) s; $(du -sh "$dest" | cut -f1)"
tar -C "$dest" -czf "$out/$name-base.tgz" base tasks.json train_log.jsonl make_default.log
tar -C "$dest" -czf "$out/$name-modules.tgz" modules
