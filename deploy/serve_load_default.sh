#!/usr/bin/env bash
# Serving throughput with many distinct compositions, on any machine: starts
# `lorahub serve` on 127.0.0.1 with models/default (on the CPU unless
# DEVICE is set), adds its modules, and runs `lorahubctl load` with a
# 3-module composition per request drawn from all of them. Prints a line of
# TAG and the load summary (ok, failed, tokens, wall_s, tokens_per_s,
# requests_per_s), then the engine's time split. Used for the serving figures of
# docs/BENCHMARKS.md.
#   deploy/serve_load_default.sh LORAHUB LORAHUBCTL [TAG]
#   env: ROWS (--max-batch-rows, 32), REQ (256), CONC (32), TOK (16), K (3),
#        DEVICE (e.g. cuda:0; default: the server's default), JITTER (--weight-jitter:
#        1 gives every request its own composition)
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2"); tag=${3:-run}
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
dev=(); [ -n "${DEVICE:-}" ] && dev=(--device "$DEVICE")
"$lorahub" serve --model models/default/base "${dev[@]}" --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --data-dir "$tmp" --max-batch-rows "${ROWS:-32}" \
  >"$tmp/out" 2>"$tmp/err" &
pid=$!
for _ in $(seq 300); do grep -q '^listening on' "$tmp/out" && break; sleep 0.1; done
port=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$tmp/out")
[ -n "$port" ] || { echo "server did not start: $(tail -3 "$tmp/err")" >&2; exit 1; }
c() { "$ctl" --server "127.0.0.1:$port" "$@"; }
pool=""
for m in models/default/modules/*/; do
  n=$(basename "$m")
  c --json modules add --dir "$PWD/$m" --id "$n" >/dev/null || { echo "add $n failed" >&2; exit 1; }
  pool="$pool,$n"
done
/usr/bin/python3 -c "
import json
for i in range(40):
    print(json.dumps({'input': 'reverse the word %s please and then count %d items' % ('abcdefgh'[i % 8:], i)}))
" >"$tmp/prompts.jsonl"
c --json load --requests "${REQ:-256}" --concurrency "${CONC:-32}" --max-new-tokens "${TOK:-16}" \
  --warmup 8 --module-pool "${pool#,}" --per-request "${K:-3}" --prompts "$tmp/prompts.jsonl" \
  ${JITTER:+--weight-jitter "$JITTER"} \
  >"$tmp/load.json" 2>"$tmp/load.err" || { echo "load failed: $(tail -3 "$tmp/load.err")" >&2; exit 1; }
/usr/bin/python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(sys.argv[2], {k: r[k] for k in ['ok', 'failed', 'tokens', 'wall_s', 'tokens_per_s', 'requests_per_s']})
" "$tmp/load.json" "$tag"
# The engine thread's time split (printed by the server on shutdown).
kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid=
grep -h 'lorahub engine' "$tmp/err"
