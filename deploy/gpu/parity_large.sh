#!/usr/bin/env bash
# Run ON THE GPU HOST after deploy/gpu/build_and_test.sh (which leaves the
# binaries in .gpu/build). Real-scale parity of `lorahub score` against the
# reference (../shared/bench/ref_lorahub.py, carried as .gpu/bench/) on the
# flan-t5-large-shaped fixture with 20 LoRA modules in .bin format:
#   bash deploy/gpu/parity_large.sh
# Prints one JSON line per measurement and a summary to $OUT/parity_large.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
build=${BUILD_DIR:-$PWD/.gpu/build}
lorahub=$build/bin/server/lorahub
ref=.gpu/bench/ref_lorahub.py
fx=${FIXTURE:-/tmp/lorahub_large}
log=${OUT:-.gpu/logs}/parity_large.log
mkdir -p "$(dirname "$log")"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1

[ -x "$lorahub" ] || { echo "no $lorahub: run deploy/gpu/build_and_test.sh first" >&2; exit 2; }
if [ ! -f "$fx/examples.jsonl" ]; then
  t=$SECONDS
  python3 "$ref" fixture --out "$fx" --size large --format bin 2>&1 | grep -v Warning | tail -1
  echo "fixture written in $((SECONDS - t)) s"
fi
adapters=()
for m in "$fx"/modules/m*; do adapters+=(--adapter "$m"); done
n=${#adapters[@]}; n=$((n / 2))
weights=$(python3 -c "import random; r=random.Random(7); print(','.join('%.3f' % r.uniform(-1.5,1.5) for _ in range($n)))")
zeros=$(python3 -c "print(','.join(['0']*$n))")

# Extra weight vectors (comma-separated, space-separated list) from the caller.
for w in "$zeros" "$weights" ${EXTRA_WEIGHTS:-}; do
  echo "== weights $w"
  python3 "$ref" score --fixture "$fx" --weights="$w" 2>&1 | tail -1
  for dtype in fp32 bf16; do
    /usr/bin/time -f "lorahub score $dtype wall %e s, max rss %M KB" \
      "$lorahub" score --model "$fx/base" "${adapters[@]}" --weights "$w" \
      --examples "$fx/examples.jsonl" --device cuda:0 --dtype $dtype --json
  done
done
