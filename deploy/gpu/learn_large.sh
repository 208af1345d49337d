#!/usr/bin/env bash
# Run ON THE GPU HOST after deploy/gpu/build_and_test.sh and
# deploy/gpu/parity_large.sh (which writes the large fixture). LoraHub learning
# on the flan-t5-large-shaped fixture, ours and the reference's, same run:
#   bash deploy/gpu/learn_large.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
lorahub=${BUILD_DIR:-$PWD/.gpu/build}/bin/server/lorahub
ref=.gpu/bench/ref_lorahub.py
fx=${FIXTURE:-/tmp/lorahub_large}
log=${OUT:-.gpu/logs}/learn_large.log
mkdir -p "$(dirname "$log")"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1
[ -f "$fx/examples.jsonl" ] || { echo "no fixture at $fx: run parity_large.sh first" >&2; exit 2; }
adapters=()
for m in "$fx"/modules/m*; do adapters+=(--adapter "$m"); done

echo "== reference (scipy COBYLA, budget 40, fp32)"
python3 "$ref" learn --fixture "$fx" 2>/dev/null | tail -1
for spec in "cobyla fp32 40" "cobyla bf16 40" "cmaes bf16 400" "cmaes bf16 2000" "random bf16 400"; do
  set -- $spec
  echo "== ours: $1 $2 budget $3"
  "$lorahub" learn --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
    --optimizer "$1" --dtype "$2" --budget "$3" --device cuda:0 --json 2>&1 | tail -1
done
