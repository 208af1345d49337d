#!/usr/bin/env bash
# Run ON THE GPU HOST (2 GPUs) from the repository root, after
# deploy/gpu/build_and_test.sh built .gpu/build/bin (issue 7, item 3):
#   OUT=... bash deploy/gpu/multi_gpu.sh
# For each device set of DEVICE_SETS (default "cuda:0 cuda:0,cuda:1") it starts
# `lorahub serve --device SET --dtype bf16` on loopback with a temp data dir,
# registers the fixture's modules (lorahubctl modules add --dir) and measures
#   gen:  GEN_REQUESTS generate requests (GEN_TOKENS new tokens, greedy; every
#         request its own explicit 3-module composition, weights 0.5,0.3,0.2,
#         modules i, i+3, i+11 mod the module count; prompt i mod the lines of
#         prompts.jsonl) at GEN_CONC concurrent streams: generated tokens / wall
#         time, plus client-side TTFT p50/p99. GEN_CLIENT=load (default): one
#         `lorahubctl load` process with GEN_CONC threads over GEN_CONC/16 gRPC
#         connections; GEN_CLIENT=procs: the old way, one `lorahubctl generate`
#         process per request under xargs -P GEN_CONC (no TTFT; the process
#         spawning itself limited the load: 22-35% GPU utilisation);
#   jobs: JOBS compose jobs (cobyla, BUDGET evaluations, the first 5 examples,
#         all modules) submitted at once: jobs finished / wall time (from the
#         first submit until every job is terminal, polled through jobs list).
# A warm-up round (WARM_REQUESTS requests, default GEN_CONC; one short job per
# device) runs before each measurement. Each device's engine decodes at most MAX_ROWS rows at once
# (--max-batch-rows), so one device serves MAX_ROWS streams and queues the rest.
# Prints and writes $OUT/multi_gpu.md (table with the 2-dev / 1-dev ratios);
# the raw log (server stderr, per-phase lines) goes to $OUT/multi_gpu.log.
# Environment: FIXTURE (default /tmp/lorahub_large, written with
# ref_lorahub.py when missing), BIN (default .gpu/build/bin), DTYPE (bf16),
# DEVICE_SETS, GEN_REQUESTS (1024), GEN_TOKENS (32), GEN_CONC (128),
# GEN_CLIENT (load|procs), MAX_ROWS (64), JOBS (16), BUDGET (40), PY (python3),
# GEN_ROUNDS (1: measured gen rounds, one after another; the table takes the last),
# WEIGHT_JITTER (load's --weight-jitter: every request its own composition),
# LENGTH_SPREAD (load's --length-spread S: request lengths from GEN_TOKENS down to
# (1 - S) of it, mixed; the rounds' token counts then fall below requests x GEN_TOKENS),
# LOGPROBS (load's --logprobs N: each token's log-probabilities in outputs_N.jsonl),
# DEVICE_CACHE_BYTES (serve's --device-cache-bytes; default 1 GiB, which holds
# the fixture's 20 fp32 modules and about 34 compositions of 18.9 MB),
# MODULE_PREFETCH=1 (`lorahubctl modules prefetch` each module after registering
# it, before the warm-up: no request then loads a module from disk).
# Each gen round's generated ids go to $OUT/outputs_N.jsonl (N devices).
# SERVE_PROFILE=1: the server runs with --profile-out $OUT/trace_N.json (gzipped after), and
# deploy/gpu/serve_trace.py's reading of it goes to $OUT/trace_N.md (profiling slows the host).
# Expected run time on an nvidia-h200-x2 host: about 3-5 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."
export NCCL_NVLS_ENABLE=0  # the host requires NVLink multicast off (no NCCL used)
bin=${BIN:-.gpu/build/bin}
lorahub=$(readlink -f "$bin/server/lorahub"); ctl=$(readlink -f "$bin/client/lorahubctl")
fx=${FIXTURE:-/tmp/lorahub_large}
out=${OUT:-.gpu/logs}
py=${PY:-python3}
dtype=${DTYPE:-bf16}
device_sets=${DEVICE_SETS:-"cuda:0 cuda:0,cuda:1"}
gen_requests=${GEN_REQUESTS:-1024}; gen_tokens=${GEN_TOKENS:-32}; gen_conc=${GEN_CONC:-128}
gen_client=${GEN_CLIENT:-load}
max_rows=${MAX_ROWS:-64}; jobs=${JOBS:-16}; budget=${BUDGET:-40}
case $gen_client in load|procs) ;; *) echo "GEN_CLIENT: load or procs" >&2; exit 2 ;; esac
mkdir -p "$out"
log=$out/multi_gpu.log; md=$out/multi_gpu.md
: >"$log"
tmp=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null; sleep 2; kill -9 "$pid" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
say() { echo "$*" | tee -a "$log"; }
start=$SECONDS
[ -x "$lorahub" ] && [ -x "$ctl" ] || { say "missing $bin/server/lorahub or $bin/client/lorahubctl"; exit 1; }
if [ ! -f "$fx/examples.jsonl" ]; then
  say "== writing the fixture $fx"
  timeout 300 "$py" .gpu/bench/ref_lorahub.py fixture --out "$fx" --size large --format bin \
    >>"$log" 2>&1 || { say "fixture failed"; exit 1; }
fi
mods=(); for d in "$fx"/modules/m*; do mods+=("$(basename "$d")"); done
nmods=${#mods[@]}
all_mods=$(IFS=,; echo "${mods[*]}")
head -5 "$fx/examples.jsonl" >"$tmp/ex5.jsonl"
# One file per prompt (texts hold newlines); request i uses prompt i mod N.
mkdir -p "$tmp/p"
"$py" - "$fx/prompts.jsonl" "$tmp/p" <<'PY' || { say "cannot read prompts.jsonl"; exit 1; }
import json, sys
n = 0
for line in open(sys.argv[1]):
    if line.strip():
        open("%s/%d.txt" % (sys.argv[2], n), "w").write(json.loads(line)["input"]); n += 1
print(n, file=open(sys.argv[2] + "/count", "w"))
PY
nprompts=$(cat "$tmp/p/count")
say "== fixture $fx: $nmods modules, $nprompts prompts; dtype $dtype; gen client $gen_client"
[ "$nmods" -ge 3 ] || { say "the fixture needs at least 3 modules"; exit 1; }

gen_one() {  # gen_one I DIR: one generate request, its JSON lines in DIR/I.json
  local i=$1 dir=$2 mods
  IFS=, read -r -a mods <<<"$all_mods"
  local a=$(( i % nmods )) b=$(( (i + 3) % nmods )) c=$(( (i + 11) % nmods ))
  timeout 120 "$ctl" --server "127.0.0.1:$port" --json generate \
    --modules "${mods[$a]},${mods[$b]},${mods[$c]}" --weights 0.5,0.3,0.2 \
    --max-new-tokens "$gen_tokens" --timeout-s 110 \
    --text "$(cat "$tmp/p/$(( i % nprompts )).txt")" >"$dir/$i.json" 2>&1
}
export -f gen_one
export ctl tmp nmods nprompts gen_tokens all_mods
# gen_round N DIR: N requests at gen_conc concurrency with GEN_CLIENT's
# client; prints "tokens seconds failed ttft_p50_ms ttft_p99_ms" ("-" for a
# figure the client does not measure).
gen_round() {
  if [ "$gen_client" = load ]; then gen_round_load "$@"; else gen_round_procs "$@"; fi
}

# One `lorahubctl load` process: request i composes the modules i, i+3, i+11
# (mod nmods) at 0.5,0.3,0.2 (--per-request 3, see client/load_generator.h),
# i.e. the same requests as gen_one; prompt i mod the lines of prompts.jsonl.
gen_round_load() {
  local n=$1 dir=$2
  mkdir -p "$dir"
  timeout 900 "$ctl" --server "127.0.0.1:$port" --json load --requests "$n" \
    --concurrency "$gen_conc" --max-new-tokens "$gen_tokens" --timeout-s 300 \
    --module-pool "$all_mods" --per-request 3 --weights 0.5,0.3,0.2 \
    --prompts "$fx/prompts.jsonl" --outputs "$dir/outputs.jsonl" \
    ${WEIGHT_JITTER:+--weight-jitter "$WEIGHT_JITTER"} ${LOGPROBS:+--logprobs "$LOGPROBS"} \
    ${LENGTH_SPREAD:+--length-spread "$LENGTH_SPREAD"} \
    >"$dir/load.json" 2>"$dir/load.err"
  echo "   load ($n requests): $(cat "$dir/load.json") $(head -3 "$dir/load.err")" >>"$log"
  cp "$dir/load.err" "$out/load_$(basename "$dir").err" 2>/dev/null
  "$py" - "$dir/load.json" "$n" <<'PY'
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except (OSError, ValueError, IndexError):
    print(0, "0.000", sys.argv[2], "-", "-")  # the client failed: all failed
    sys.exit(0)
f = lambda v: "-" if v is None else "%.1f" % v
print(r["tokens"], "%.3f" % r["wall_s"], r["failed"], f(r["ttft_ms"]["p50"]), f(r["ttft_ms"]["p99"]))
PY
}

gen_round_procs() {
  local n=$1 dir=$2
  mkdir -p "$dir"
  local t0 t1
  t0=$(date +%s.%N)
  seq 0 $((n - 1)) | timeout 240 xargs -P "$gen_conc" -I{} bash -c "gen_one {} $dir"
  t1=$(date +%s.%N)
  "$py" - "$dir" "$n" "$t0" "$t1" <<'PY'
import json, os, sys
d, n, t0, t1 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
tokens = failed = 0
for i in range(n):
    end = None
    try:
        for line in open(os.path.join(d, "%d.json" % i)):
            try:
                j = json.loads(line)
            except ValueError:
                continue
            if "finish_reason" in j:
                end = j
    except OSError:
        pass
    if end is None:
        failed += 1
    else:
        tokens += len(end["output_ids"])
print(tokens, "%.3f" % (t1 - t0), failed, "-", "-")
PY
}

# jobs_round N BUDGET PREFIX: N compose jobs at once; prints "succeeded seconds failed".
jobs_round() {
  local n=$1 b=$2 prefix=$3 t0 t1 k
  t0=$(date +%s.%N)
  for k in $(seq 1 "$n"); do
    timeout 60 "$ctl" --server "127.0.0.1:$port" --json compose --task "${prefix}_$k" \
      --modules "$all_mods" --examples "$tmp/ex5.jsonl" --optimizer cobyla --budget "$b" \
      >>"$tmp/submit_$prefix" 2>>"$log" &
  done
  wait
  local ok=0 bad=0
  for _ in $(seq 1500); do  # 0.1 s polls: at most ~150 s
    timeout 30 "$ctl" --server "127.0.0.1:$port" --json jobs list >"$tmp/jobs" 2>>"$log"
    ok=$(grep "\"task\":\"${prefix}_" "$tmp/jobs" | grep -c '"state":"succeeded"')
    bad=$(grep "\"task\":\"${prefix}_" "$tmp/jobs" | grep -c -E '"state":"(failed|cancelled)"')
    [ $((ok + bad)) -ge "$n" ] && break
    sleep 0.1
  done
  t1=$(date +%s.%N)
  grep "\"task\":\"${prefix}_" "$tmp/jobs" | grep '"error"' | head -3 >>"$log"
  echo "$ok $("$py" -c "print('%.3f' % ($t1 - $t0))") $((n - ok))"
}

# job_times PREFIX: the server's own times of the last jobs_round's jobs (lorahubctl's
# queued_seconds and run_seconds), free of the 0.1 s polls and the clients' start-up; then,
# from each job's event times (lorahubctl jobs watch), where a run went: its setup (start to
# the first evaluation: modules, examples, the objective runner and its graph), its search
# (first to last evaluation, and per evaluation after the first) and its finish (the last
# evaluation to the result stored).
job_times() {
  grep "\"task\":\"${1}_" "$tmp/jobs" | "$py" -c '
import datetime, json, statistics, subprocess, sys
ctl, server = sys.argv[1], sys.argv[2]
jobs = [json.loads(l) for l in sys.stdin if l.strip()]
q = [j["queued_seconds"] for j in jobs if "queued_seconds" in j]
r = [j["run_seconds"] for j in jobs if "run_seconds" in j]
if not r:
    print("job times: none reported"); sys.exit()
print("job times (server): queued p50 %.3f s max %.3f s, ran p50 %.3f s max %.3f s, %d jobs" % (
    statistics.median(q) if q else float("nan"), max(q) if q else float("nan"),
    statistics.median(r), max(r), len(r)))
def when(e):
    return datetime.datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
setup, search, each, finish = [], [], [], []
for j in jobs:
    if j.get("state") != "succeeded":
        continue
    out = subprocess.run([ctl, "--server", server, "--json", "jobs", "watch", j["id"]],
                         capture_output=True, text=True, timeout=30).stdout
    ev = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    ev = [e for e in ev if "time" in e]
    started = [when(e) for e in ev if e.get("event") == "started"]
    evals = [when(e) for e in ev if e.get("event") == "evaluation"]
    done = [when(e) for e in ev if e.get("event") == "finished"]
    if not (started and len(evals) >= 2 and done):
        continue
    setup.append(evals[0] - started[0])
    search.append(evals[-1] - evals[0])
    each.append((evals[-1] - evals[0]) / (len(evals) - 1))
    finish.append(done[0] - evals[-1])
if setup:
    m = statistics.median
    print("job phases (server, p50 of %d): setup %.3f s, search %.3f s (%.2f ms an evaluation), "
          "finish %.3f s" % (len(setup), m(setup), m(search), 1e3 * m(each), m(finish)))
else:
    print("job phases: no event times")' "$ctl" "127.0.0.1:$port"
}

# gpu_snapshot TAG: after 1 s, one nvidia-smi line per GPU into the log
# (utilisation while a phase runs: did both devices work?).
gpu_snapshot() {
  command -v nvidia-smi >/dev/null || return 0
  ( sleep 1; timeout 10 nvidia-smi --query-gpu=index,utilization.gpu,memory.used \
      --format=csv,noheader | sed "s/^/   [$1] gpu /" >>"$log" ) &
}

# engine_mark before a round, engine_since LABEL after it: the engine's
# counters over that round alone (its exit line counts every round), from the
# metrics endpoint $mport of the server for $ndev devices.
engine_mark() {
  "$py" deploy/gpu/round_metrics.py scrape "$mport" "$tmp/metrics_before_$ndev" 2>>"$log"
}
engine_since() {
  "$py" deploy/gpu/round_metrics.py scrape "$mport" "$tmp/metrics_after_$ndev" 2>>"$log"
  local engine
  engine=$("$py" deploy/gpu/round_metrics.py diff "$tmp/metrics_before_$ndev" \
    "$tmp/metrics_after_$ndev" | sed "s/round's engine:/$1's engine:/")
  [ -z "$engine" ] || say "$engine"
}

results=$tmp/results
: >"$results"
for set in $device_sets; do
  ndev=$(awk -F, '{print NF}' <<<"$set")
  data=$tmp/data_$ndev; mkdir -p "$data"
  say "== --device $set [$((SECONDS - start)) s]"
  "$lorahub" serve --model "$fx/base" --device "$set" --dtype "$dtype" \
    --max-batch-rows "$max_rows" --max-queue 4096 --listen 127.0.0.1:0 \
    --metrics-listen 127.0.0.1:0 --data-dir "$data" \
    ${DEVICE_CACHE_BYTES:+--device-cache-bytes "$DEVICE_CACHE_BYTES"} \
    ${SERVE_PROFILE:+--profile-out "$out/trace_$ndev.json"} >"$tmp/out_$ndev" 2>>"$log" &
  pid=$!
  port=
  for _ in $(seq 1200); do  # up to 120 s to load the base on every device
    port=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$tmp/out_$ndev")
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$port" ] || { say "server did not start (see $log)"; exit 1; }
  mport=$(sed -n 's/^metrics listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$tmp/out_$ndev")
  export port
  say "   server up [$((SECONDS - start)) s]"
  for m in "${mods[@]}"; do
    timeout 60 "$ctl" --server "127.0.0.1:$port" --json modules add --dir "$fx/modules/$m" \
      --id "$m" >/dev/null 2>>"$log" || { say "modules add $m failed"; exit 1; }
  done
  say "   $nmods modules registered [$((SECONDS - start)) s]"
  if [ "${MODULE_PREFETCH:-0}" = 1 ]; then
    for m in "${mods[@]}"; do
      timeout 60 "$ctl" --server "127.0.0.1:$port" --json modules prefetch "$m" >/dev/null \
        2>>"$log" || { say "modules prefetch $m failed"; exit 1; }
    done
    say "   $nmods modules prefetched [$((SECONDS - start)) s]"
  fi
  engine_mark
  read -r wt ws wf _ _ < <(gen_round "${WARM_REQUESTS:-$gen_conc}" "$tmp/warm_$ndev")
  say "   warm-up: $wt tokens in $ws s ($wf failed)"
  engine_since warm-up
  read -r _ _ jf < <(jobs_round "$ndev" 5 "warm$ndev")
  say "   warm-up jobs: $jf failed [$((SECONDS - start)) s]"
  gpu_snapshot "gen $set"
  # GEN_ROUNDS measured rounds of the same requests, one after another (are
  # the first-time costs gone after the warm-up?); the table takes the last.
  for round in $(seq 1 "${GEN_ROUNDS:-1}"); do
    engine_mark
    rm -rf "$tmp/gen_$ndev"
    read -r gt gs gf gp50 gp99 < <(gen_round "$gen_requests" "$tmp/gen_$ndev")
    say "   gen: $gt tokens in $gs s ($gf failed), TTFT p50 $gp50 ms p99 $gp99 ms [$((SECONDS - start)) s]"
    engine_since round
  done
  # Every request's generated ids (gen_client load), for comparing runs.
  cp "$tmp/gen_$ndev/outputs.jsonl" "$out/outputs_$ndev.jsonl" 2>/dev/null
  gpu_snapshot "jobs $set"
  engine_mark
  read -r jo js jfail < <(jobs_round "$jobs" "$budget" "bench$ndev")
  say "   jobs: $jo succeeded in $js s ($jfail not) [$((SECONDS - start)) s]"
  say "   $(job_times "bench$ndev")"
  engine_since jobs  # with "compose work on the engine": how long its closures held it
  echo "$set $ndev $gt $gs $gf $jo $js $jfail $gp50 $gp99" >>"$results"
  # A profiled server writes its trace as it stops (tens of seconds for a round's events).
  stop_wait=30; [ -n "${SERVE_PROFILE:-}" ] && stop_wait=240
  kill -TERM "$pid"; timeout "$stop_wait" tail --pid="$pid" -f /dev/null
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null; pid=
  if [ -n "${SERVE_PROFILE:-}" ] && [ -f "$out/trace_$ndev.json" ]; then
    "$py" deploy/gpu/serve_trace.py "$out/trace_$ndev.json" >"$out/trace_$ndev.md" 2>&1 \
      || say "serve_trace.py failed (trace_$ndev.md)"
    gzip -f "$out/trace_$ndev.json"
  fi
done

"$py" - "$results" "$md" <<PY
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
out = ["# lorahub serve on several devices (issue 7, item 3)", "",
       "fixture: $fx ($nmods modules), dtype $dtype; gen: $gen_requests requests x $gen_tokens new "
       "tokens (greedy, per-request 3-module composition) at $gen_conc concurrent streams "
       "(client: $gen_client), "
       "--max-batch-rows $max_rows per device; jobs: $jobs compose jobs at once (cobyla, budget "
       "$budget, 5 examples, $nmods modules). With more streams than one device's "
       "--max-batch-rows, a second device adds decoding capacity; with fewer, one device "
       "already batches every stream and decoding is latency-bound.", "",
       "| devices | gen tokens | gen s | gen tok/s | TTFT p50 ms | TTFT p99 ms | jobs done | jobs s "
       "| jobs/s | failures |",
       "|---|---|---|---|---|---|---|---|---|---|"]
rate = {}
for dev, n, gt, gs, gf, jo, js, jf, p50, p99 in rows:
    tps = int(gt) / max(float(gs), 1e-9); jps = int(jo) / max(float(js), 1e-9)
    rate[int(n)] = (tps, jps)
    out.append("| %s | %s | %s | %.0f | %s | %s | %s | %s | %.3f | gen %s, jobs %s |" % (
        dev, gt, gs, tps, p50, p99, jo, js, jps, gf, jf))
if 1 in rate and 2 in rate:
    g = rate[2][0] / rate[1][0] if rate[1][0] else float("nan")
    j = rate[2][1] / rate[1][1] if rate[1][1] else float("nan")
    out += ["", "scaling 2-dev / 1-dev: gen tokens/s %.2fx, jobs/s %.2fx (target >= 1.8x: %s)" % (
        g, j, "met" if g >= 1.8 and j >= 1.8 else "NOT met")]
open(sys.argv[2], "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
say "== done in $((SECONDS - start)) s"
