#!/usr/bin/env bash
# `lorahubctl load` against the real `lorahub serve` on 127.0.0.1 (port 0,
# temp data dir) with the modules of tests/testdata/t5/gated_untied:
#  - a module-pool run: every request ok, and each request's ids (--outputs)
#    equal what `lorahubctl generate` gives for its own composition (modules
#    chosen by the documented rule, recomputed here), token count their sum,
#    percentiles ordered, rates positive;
#  - failures: counted per gRPC code (all, and a pool where every third
#    request names an unknown module), exit 1 with the summary printed;
#  - bad flags exit 2; plain-text prompt files and the human summary.
#   load_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2"); round_metrics=$(readlink -f "$3")
case_dir=$(readlink -f tests/testdata/t5/gated_untied)
. "$(dirname "$0")/harness.sh"

start_server --model "$case_dir/model" --data-dir "$tmp" --max-batch-rows 8
for m in m0 m1 m2; do
  c --json modules add --dir "$case_dir/adapters/$m" >/dev/null || fail "add $m"
done
# prompts.jsonl like the fixtures': {"input": ...} per line.
$py -c "
import json, sys
for t in json.load(open(sys.argv[1]))['inputs']: print(json.dumps({'input': t}))
" "$case_dir/golden.json" >"$tmp/prompts.jsonl"
nprompts=$(wc -l <"$tmp/prompts.jsonl")
[ "$nprompts" -ge 2 ] || fail "no prompts"

# 1. Module pool, 2 modules per request, default weights.
c --json load --requests 12 --concurrency 4 --max-new-tokens 4 --warmup 2 \
  --module-pool m0,m1,m2 --per-request 2 --prompts "$tmp/prompts.jsonl" \
  --outputs "$tmp/outputs.jsonl" >"$tmp/load.json" 2>"$tmp/load.err" ||
  fail "load rc $?: $(cat "$tmp/load.err")"
cat "$tmp/load.json"
# Each request's composition, recomputed from the rule in
# client/load_generator.h (slot j from (i + 0|3) mod 3, next free index on a
# clash; weights 2(K-j)/(K(K+1)) as float32), generated one at a time.
$py - "$tmp/prompts.jsonl" >"$tmp/each" <<'PY'
import json, struct, sys
prompts = [json.loads(l)["input"] for l in open(sys.argv[1]) if l.strip()]
pool, k = ["m0", "m1", "m2"], 2
f32 = lambda x: "%.9g" % struct.unpack("f", struct.pack("f", x))[0]
weights = ",".join(f32(2.0 * (k - j) / (k * (k + 1))) for j in range(k))
for i in range(12):
    taken = []
    for j, off in enumerate([0, 3][:k]):
        m = (i + off) % len(pool)
        while m in taken: m = (m + 1) % len(pool)
        taken.append(m)
    print("%s\t%s\t%s" % (",".join(pool[m] for m in taken), weights, prompts[i % len(prompts)]))
PY
want=0
i=0
while IFS=$'\t' read -r mods weights text; do
  c --json generate --modules "$mods" --weights "$weights" --max-new-tokens 4 \
    --text "$text" | tail -1 >"$tmp/one" || fail "generate $mods"
  n=$($py - "$tmp/one" "$tmp/outputs.jsonl" "$i" <<'PY'
import json, sys
ids = json.load(open(sys.argv[1]))["output_ids"]
i = int(sys.argv[3])
got = [json.loads(l) for l in open(sys.argv[2])]
assert len(got) == 12 and [g["index"] for g in got] == list(range(12)), got
assert got[i]["code"] == "OK" and got[i]["ids"] == ids, ("request", i, got[i], "alone", ids)
print(len(ids))
PY
) || fail "request $i's ids differ from its own generate"
  want=$((want + n))
  i=$((i + 1))
done <"$tmp/each"
$py - "$tmp/load.json" "$want" <<'PY' || fail "pool run summary"
import json, sys
r = json.load(open(sys.argv[1])); want = int(sys.argv[2])
assert r["requests"] == 12 and r["ok"] == 12 and r["failed"] == 0, r
assert r["failed_by_code"] == {} and r["failed_indices"] == [], r
assert r["warmup"] == 2 and r["warmup_failed"] == 0, r
assert r["concurrency"] == 4 and r["channels"] == 1, r
assert 0 < r["tokens"] <= 12 * 4, r
assert r["tokens"] == want, ("tokens", r["tokens"], "sum of single generates", want)
assert r["wall_s"] > 0 and r["tokens_per_s"] > 0 and r["requests_per_s"] > 0, r
assert abs(r["tokens_per_s"] - r["tokens"] / r["wall_s"]) < 1e-6 * r["tokens_per_s"], r
t, l = r["ttft_ms"], r["latency_ms"]
assert 0 < t["p50"] <= t["p90"] <= t["p99"], t
assert 0 < l["p50"] <= l["p99"], l
assert t["p50"] <= l["p99"], (t, l)
assert r["inter_token_mean_ms"] is not None and r["inter_token_mean_ms"] >= 0, r
PY
echo "pool run: 12 ok, $want tokens"

# 2. More channels than one, and a fixed composition.
c --json load --requests 8 --concurrency 6 --channels 3 --max-new-tokens 3 \
  --modules m0,m1 --weights 0.5,0.5 --prompts "$tmp/prompts.jsonl" >"$tmp/ch.json" ||
  fail "channels run rc $?"
$py -c "
import json, sys
r = json.load(open(sys.argv[1]))
assert r['ok'] == 8 and r['channels'] == 3 and 0 < r['tokens'] <= 24, r" "$tmp/ch.json" ||
  fail "channels run: $(cat "$tmp/ch.json")"

# 2b. --weight-jitter: every request composes its own adapter (the bank's
# slot loads count one per request), without it one adapter serves all.
slot_loads() {
  curl -s "http://127.0.0.1:$mport/metrics" |
    awk '$1 == "lorahub_adapter_slot_loads_total" {print int($2)}'
}
before=$(slot_loads)
c --json load --requests 5 --concurrency 1 --max-new-tokens 1 --modules m1,m2 \
  --weights 0.4,0.6 --prompts "$tmp/prompts.jsonl" >/dev/null || fail "no-jitter run"
mid=$(slot_loads)
c --json load --requests 5 --concurrency 1 --max-new-tokens 1 --modules m1,m2 \
  --weights 0.4,0.6 --weight-jitter 0.5 --prompts "$tmp/prompts.jsonl" >/dev/null ||
  fail "jitter run"
after=$(slot_loads)
[ -n "$before" ] && [ $((mid - before)) = 1 ] && [ $((after - mid)) = 4 ] ||
  fail "slot loads: $before -> $mid (same weights: want +1) -> $after (jitter: want +4, request 0 as before)"

# 2c. --length-spread: requests ask for fewer tokens, down to (1 - S) of
# --max-new-tokens (request i: 8 (1 - 0.9 ((389 i) mod 1000) / 1000)).
$py "$round_metrics" scrape "$mport" "$tmp/metrics_before" || fail "scrape"
c --json load --requests 6 --concurrency 2 --max-new-tokens 8 \
  --module m0 --length-spread 0.9 --prompts "$tmp/prompts.jsonl" \
  --outputs "$tmp/spread.jsonl" >"$tmp/spread.json" || fail "length spread run"
$py -c "
import json, sys
want = [max(1, round(8 * (1 - 0.9 * ((389 * i) % 1000) / 1000))) for i in range(6)]
ids = {r['index']: r['ids'] for r in map(json.loads, open(sys.argv[1]))}
assert sorted(ids) == list(range(6)), ids
# Each as long as asked, or shorter where it ended at eos (id 1).
for i, w in enumerate(want):
    assert len(ids[i]) == w or (len(ids[i]) < w and ids[i][-1] == 1), (i, ids[i], want)
" "$tmp/spread.jsonl" || fail "length spread: $(cat "$tmp/spread.jsonl")"
# The round's own engine counters, as multi_gpu.sh prints them: its 6 rows
# and their tokens alone, not the runs before (and no graph captures on the
# CPU).
$py "$round_metrics" scrape "$mport" "$tmp/metrics_after" || fail "scrape"
round=$($py "$round_metrics" diff "$tmp/metrics_before" "$tmp/metrics_after")
tokens=$($py -c "
import json, sys
print(sum(len(json.loads(l)['ids']) for l in open(sys.argv[1])))" "$tmp/spread.jsonl")
case "$round" in
  *"; 6 rows admitted)"*"; $tokens tokens; 0 graph captures (0.000 s)") ;;
  *) fail "round's engine: want 6 rows and $tokens tokens: $round" ;;
esac
$py "$round_metrics" diff "$tmp/metrics_before" "$tmp/nowhere" >"$tmp/h" &&
  [ ! -s "$tmp/h" ] || fail "round_metrics without a scrape: $(cat "$tmp/h")"

# 3. Failures by code: an unknown module in every request, then in a third.
c --json load --requests 3 --concurrency 2 --modules m0,nope --weights 0.5,0.5 \
  --prompts "$tmp/prompts.jsonl" >"$tmp/bad.json" 2>"$tmp/bad.err"; rc=$?
[ $rc = 1 ] || fail "unknown module: rc $rc"
$py -c "
import json, sys
r = json.load(open(sys.argv[1]))
assert r['ok'] == 0 and r['failed'] == 3 and r['failed_by_code'] == {'NOT_FOUND': 3}, r
assert 'nope' in r['first_error'] and r['tokens'] == 0 and r['ttft_ms']['p50'] is None, r
" "$tmp/bad.json" || fail "unknown module summary: $(cat "$tmp/bad.json")"
# --per-request 1: request i uses pool[i mod 3]; i = 2, 5 name 'nope'.
c --json load --requests 6 --concurrency 3 --max-new-tokens 2 --module-pool m0,m1,nope \
  --per-request 1 --prompts "$tmp/prompts.jsonl" --outputs "$tmp/mixed.jsonl" \
  >"$tmp/mixed.json"; rc=$?
[ $rc = 1 ] || fail "mixed pool: rc $rc"
$py -c "
import json, sys
r = json.load(open(sys.argv[1]))
assert r['ok'] == 4 and r['failed'] == 2 and r['failed_by_code'] == {'NOT_FOUND': 2}, r
assert r['failed_indices'] == [2, 5], r
assert 0 < r['tokens'] <= 8, r
out = [json.loads(l) for l in open(sys.argv[2])]
assert [o['code'] for o in out] == ['OK', 'OK', 'NOT_FOUND'] * 2, out
assert all(o['ids'] == [] for o in out if o['code'] != 'OK'), out
assert sum(len(o['ids']) for o in out) == r['tokens'], (out, r)" \
  "$tmp/mixed.json" "$tmp/mixed.jsonl" || fail "mixed pool: $(cat "$tmp/mixed.json")"
# --per-request 2 over m0,m1,nope: slot 1 = (i + 3) mod 3 clashes with slot 0
# and moves on: i mod 3 = 0 -> m0,m1 (ok), 1 -> m1,nope, 2 -> nope,m0.
c --json load --requests 6 --concurrency 3 --max-new-tokens 2 --module-pool m0,m1,nope \
  --per-request 2 --prompts "$tmp/prompts.jsonl" >"$tmp/mixed2.json"; rc=$?
[ $rc = 1 ] || fail "mixed pool K=2: rc $rc"
$py -c "
import json, sys
r = json.load(open(sys.argv[1]))
assert r['ok'] == 2 and r['failed_by_code'] == {'NOT_FOUND': 4}, r
assert r['failed_indices'] == [1, 2, 4, 5], r" "$tmp/mixed2.json" ||
  fail "mixed pool K=2: $(cat "$tmp/mixed2.json")"
# multi_gpu.sh's shape: --per-request 3 over a pool of 12 (copies of the
# three adapters under other ids) whose last id is unknown; request i fails
# when one of i, i+3, i+11 (mod 12) is 11.
pool12=""
for k in $(seq 0 10); do
  c modules add --dir "$case_dir/adapters/m$((k % 3))" --id "p$k" >/dev/null || fail "add p$k"
  pool12="${pool12}p$k,"
done
pool12="${pool12}nope"
c --json load --requests 24 --concurrency 8 --max-new-tokens 2 --module-pool "$pool12" \
  --per-request 3 --weights 0.5,0.3,0.2 --prompts "$tmp/prompts.jsonl" >"$tmp/mixed3.json"
rc=$?
[ $rc = 1 ] || fail "mixed pool K=3: rc $rc"
$py -c "
import json, sys
r = json.load(open(sys.argv[1]))
bad = [i for i in range(24) if 11 in {(i + o) % 12 for o in (0, 3, 11)}]
assert r['ok'] == 24 - len(bad) and r['failed_by_code'] == {'NOT_FOUND': len(bad)}, (bad, r)
assert r['failed_indices'] == bad, (bad, r)" \
  "$tmp/mixed3.json" || fail "mixed pool K=3: $(cat "$tmp/mixed3.json")"
# Human output still prints the summary on failure.
c load --requests 2 --module nope --prompts "$tmp/prompts.jsonl" >"$tmp/h" 2>&1; rc=$?
[ $rc = 1 ] && grep -q '0 ok, 2 failed (NOT_FOUND 2)' "$tmp/h" || fail "human failure: rc $rc $(cat "$tmp/h")"

# 4. Plain-text prompts (one per line) and the human summary.
printf 'leap year\n\nborn on the first day of 2001\n' >"$tmp/plain.txt"
c load --requests 3 --concurrency 3 --max-new-tokens 2 base --prompts "$tmp/plain.txt" \
  >"$tmp/h" 2>&1 || fail "plain prompts: $(cat "$tmp/h")"
grep -q '^requests: 3 ok, 0 failed of 3' "$tmp/h" && grep -q '^ttft ms:  p50 ' "$tmp/h" ||
  fail "human summary: $(cat "$tmp/h")"
echo '{"text": "no input field"}' >"$tmp/badp.jsonl"

# 5. Bad flags: exit 2 with a message, no request sent.
usage() {  # PATTERN args...
  local pat=$1; shift
  c load "$@" >/dev/null 2>"$tmp/e"; local rc=$?
  [ $rc = 2 ] && grep -q -- "$pat" "$tmp/e" || fail "load $*: rc $rc, $(cat "$tmp/e")"
}
P=(--prompts "$tmp/prompts.jsonl")
usage "concurrency must be an integer >= 1" --requests 4 --concurrency 0 base "${P[@]}"
usage "cannot open" --requests 4 base --prompts "$tmp/missing.jsonl"
usage "line 1" --requests 4 base --prompts "$tmp/badp.jsonl"
usage "requests is required" base "${P[@]}"
usage "requests must be an integer" --requests x base "${P[@]}"
usage "per-request 4 exceeds" --requests 2 --module-pool m0,m1,m2 --per-request 4 "${P[@]}"
usage "needs --per-request" --requests 2 --module-pool m0,m1 "${P[@]}"
usage "one weight per" --requests 2 --module-pool m0,m1 --per-request 2 --weights 1 "${P[@]}"
usage "excludes" --requests 2 --module-pool m0,m1 --per-request 1 --task t "${P[@]}"
usage "give one of" --requests 2 "${P[@]}"
usage "timeout-s" --requests 2 --timeout-s 0 base "${P[@]}"
usage "requests must be in" --requests 2000000000 base "${P[@]}"
usage "concurrency must be in" --requests 2 --concurrency 100000 base "${P[@]}"
usage "channels must be in" --requests 2 --concurrency 2 --channels 3 base "${P[@]}"
usage "weight jitter must be in" --requests 2 --modules m0,m1 --weights 1,1 --weight-jitter 2 \
  "${P[@]}"
usage "weight-jitter must be a number" --requests 2 base --weight-jitter x "${P[@]}"
usage "length spread must be in" --requests 2 base --length-spread 1 "${P[@]}"
usage "length-spread must be a number" --requests 2 base --length-spread x "${P[@]}"
usage "jitter needs a composition" --requests 2 --module m0 --weight-jitter 0.1 "${P[@]}"
usage "cannot write --outputs" --requests 2 base "${P[@]}" --outputs "$tmp/no/such/dir/o"
echo "PASS"
