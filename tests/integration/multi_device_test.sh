#!/usr/bin/env bash
# End to end: `lorahub serve --device cpu,cpu` keeps two replicas (two
# engines, two compose workers) and spreads the work: info lists both
# devices; two long compose jobs run at the same time (one per worker; with
# a single worker the second would stay queued); concurrent generate requests
# all complete; a graceful stop leaves nothing behind.
#   multi_device_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2")
fx=$(readlink -f tests/testdata/ref_tiny/tiny_s0)
. "$(dirname "$0")/harness.sh"

start_server --model "$fx/base" --device cpu,cpu --data-dir "$tmp"
c() { timeout 60 "$ctl" --server "127.0.0.1:$port" "$@"; }
json_field() { $py -c "import json,sys; print(json.loads(sys.stdin.readlines()[-1])$1)"; }

c --json info >"$tmp/info" || fail "info"
$py - "$tmp/info" <<'PY' || fail "info devices: $(cat "$tmp/info")"
import json, sys
j = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
assert j["devices"] == ["cpu", "cpu"], j
PY
for m in m00 m01 m02; do
  c --json modules add --dir "$fx/modules/$m" --id "$m" >/dev/null || fail "add $m"
done

# Two long jobs: both must be RUNNING at the same time.
ids=()
for t in ta tb; do
  c --json compose --task "$t" --modules m00,m01,m02 --optimizer random --budget 10000 \
    --examples "$fx/examples.jsonl" >"$tmp/j_$t" || fail "submit $t"
  ids+=("$(json_field '["id"]' <"$tmp/j_$t")")
done
both=0
for _ in $(seq 200); do
  n=$(c --json jobs list --state running | grep -c '"state":"running"')
  [ "$n" = 2 ] && { both=1; break; }
  sleep 0.05
done
[ "$both" = 1 ] || fail "the two jobs never ran at the same time: $(c --json jobs list)"

# Meanwhile, 8 concurrent generate requests all finish (both engines serve).
gpids=()
for i in $(seq 8); do
  c --json generate --modules m00,m01 --weights 0.5,0.5 --max-new-tokens 4 \
    --text "prompt number $i" >"$tmp/g$i" 2>&1 &
  gpids+=($!)
done
for i in $(seq 8); do
  wait "${gpids[$((i - 1))]}" || fail "generate $i: $(cat "$tmp/g$i")"
  grep -q '"finish_reason"' "$tmp/g$i" || fail "generate $i: no end message"
done

for id in "${ids[@]}"; do
  c --json jobs cancel "$id" >/dev/null || fail "cancel $id"
  c --json jobs watch "$id" >"$tmp/w" || true
  [ "$(json_field '["state"]' <"$tmp/w")" = cancelled ] || fail "$id not cancelled"
done

# A short job after that still succeeds (either worker may take it).
c --json compose --task tc --modules m00,m01 --budget 5 --examples "$fx/examples.jsonl" \
  --wait >"$tmp/wc" || fail "compose --wait: $(tail -3 "$tmp/wc")"
[ "$(json_field '["state"]' <"$tmp/wc")" = succeeded ] || fail "tc did not succeed"
c --json generate --task tc --max-new-tokens 4 --text hello | grep -q '"finish_reason"' \
  || fail "generate --task tc"

kill -TERM "$pid"; wait "$pid" || fail "serve exit status $?"; pid=
grep -q "re-queued" "$tmp/err" && fail "a worker re-queued a job of another worker"
echo "PASS (two jobs ran at once on cpu,cpu; 8 concurrent generates done)"
