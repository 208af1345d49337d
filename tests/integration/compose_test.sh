#!/usr/bin/env bash
# End to end: compose jobs on the real `lorahub serve` (127.0.0.1, port 0,
# temp data dir) with the tiny reference fixture, driven by the real
# lorahubctl: validation errors, a COBYLA job (budget 10) watched to the end,
# its best_score checked against `lorahub score` at the returned weights, the
# published task served by generate --task, the scoring passes of COBYLA and
# of a CMA-ES job under --compose-max-rows, cancellation, a restart that
# keeps the job and its task, deleting an ended job (jobs rm), and a restart
# with --job-retention-s 1 that deletes every ended job but keeps the tasks.
#   compose_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2")
fx=$(readlink -f tests/testdata/ref_tiny/tiny_s0)
. "$(dirname "$0")/harness.sh"

serve_fixture() {  # serve_fixture [EXTRA SERVE FLAGS]
  start_server --model "$fx/base" --data-dir "$tmp" --compose-max-rows 32 "$@"
}
metric() {  # metric NAME_WITH_LABELS -> its value (empty if absent)
  curl -s "http://127.0.0.1:$mport/metrics" | awk -v n="$1" '$1 == n {print $2}'
}
json_field() { $py -c "import json,sys; print(json.loads(sys.stdin.readlines()[-1])$1)"; }

serve_fixture
for m in m00 m01 m02 m03; do
  c --json modules add --dir "$fx/modules/$m" --id "$m" >/dev/null || fail "add $m"
done

# Validation: each error names its field.
c compose --task t1 --modules m00,m01 --examples "$fx/examples.jsonl" --budget -3 2>"$tmp/e"
[ $? = 1 ] && grep -q 'INVALID_ARGUMENT: spec.budget' "$tmp/e" || fail "budget: $(cat "$tmp/e")"
c compose --task t1 --modules m00,nope --examples "$fx/examples.jsonl" 2>"$tmp/e"
grep -q 'NOT_FOUND: spec.module_ids.ids\[1\]' "$tmp/e" || fail "unknown module: $(cat "$tmp/e")"
c compose --task 'bad/name' --modules m00 --examples "$fx/examples.jsonl" 2>"$tmp/e"
grep -q 'INVALID_ARGUMENT: spec.task' "$tmp/e" || fail "task name: $(cat "$tmp/e")"
c compose --task t1 --modules m00,m00 --examples "$fx/examples.jsonl" 2>"$tmp/e"
grep -q 'INVALID_ARGUMENT: spec.module_ids.ids\[1\]: duplicate' "$tmp/e" || fail "dup: $(cat "$tmp/e")"
c compose --task t1 --sample 9 --examples "$fx/examples.jsonl" 2>"$tmp/e"
grep -q 'FAILED_PRECONDITION: spec.sample.count' "$tmp/e" || fail "sample: $(cat "$tmp/e")"
# Every method is served now (methods_test.sh); an unknown name is a usage
# error of lorahubctl and an unknown enum value INVALID_ARGUMENT (methods_test).
c compose --task t1 --modules m00 --method nope --examples "$fx/examples.jsonl" 2>"$tmp/e"
[ $? = 2 ] || fail "unknown method name: $(cat "$tmp/e")"
c jobs get job-nope 2>"$tmp/e"
grep -q NOT_FOUND "$tmp/e" || fail "unknown job: $(cat "$tmp/e")"

# A real job, watched to the end.
c --json compose --task t1 --modules m00,m01,m02 --examples "$fx/examples.jsonl" \
  --budget 10 --wait >"$tmp/watch" 2>>"$tmp/err" || fail "compose --wait: $(tail -3 "$tmp/watch")"
[ "$(grep -c '"event":"evaluation"' "$tmp/watch")" = 10 ] || fail "want 10 evaluation events"
grep -q '"event":"finished"' "$tmp/watch" || fail "no finished event"
state=$(json_field '["state"]' <"$tmp/watch")
[ "$state" = succeeded ] || fail "job state $state"
best=$(json_field '["best_score"]' <"$tmp/watch")
weights=$(json_field '["weights"]' <"$tmp/watch" | tr -d '[] ')
job=$(json_field '["id"]' <"$tmp/watch")
"$lorahub" score --model "$fx/base" --adapter "$fx/modules/m00" --adapter "$fx/modules/m01" \
  --adapter "$fx/modules/m02" --weights "$weights" --examples "$fx/examples.jsonl" --json \
  >"$tmp/score" || fail "lorahub score"
score=$(json_field '["score"]' <"$tmp/score")
$py -c "import sys; b,s=float(sys.argv[1]),float(sys.argv[2]); sys.exit(0 if abs(b-s)<=1e-4*max(abs(s),1e-12) else 1)" \
  "$best" "$score" || fail "job best_score $best != lorahub score $score at $weights"

# The job and its task are listed; the task serves.
c --json jobs get "$job" >"$tmp/job" || fail "jobs get"
grep -q '"state":"succeeded"' "$tmp/job" || fail "jobs get: $(cat "$tmp/job")"
# Its times: created <= started <= finished (RFC 3339, UTC), and the seconds
# it queued and ran, which are their differences.
$py - "$tmp/job" <<'PY' || fail "job times: $(cat "$tmp/job")"
import datetime, json, sys
j = json.loads(open(sys.argv[1]).read().splitlines()[-1])
t = {k: datetime.datetime.strptime(j[k], "%Y-%m-%dT%H:%M:%S.%fZ")
     for k in ("created_at", "started_at", "finished_at")}
assert t["created_at"] <= t["started_at"] <= t["finished_at"], t
for name, a, b in (("queued_seconds", "created_at", "started_at"),
                   ("run_seconds", "started_at", "finished_at")):
    assert abs(j[name] - (t[b] - t[a]).total_seconds()) < 2e-6, (name, j[name])
assert j["run_seconds"] > 0, j
PY
# Every watched event carries the server's time, in order, within the job's
# run: started, then the evaluations, then finished.
$py - "$tmp/watch" "$tmp/job" <<'PY' || fail "event times: $(head -3 "$tmp/watch")"
import datetime, json, sys
when = lambda s: datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ")
ev = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{") and '"event"' in l]
job = json.loads(open(sys.argv[2]).read().splitlines()[-1])
t = [when(e["time"]) for e in ev]
assert t == sorted(t), t
kinds = [e["event"] for e in ev]
assert kinds.index("started") < kinds.index("evaluation") and kinds[-1] == "finished", kinds
assert when(job["started_at"]) <= t[kinds.index("started")], (job, ev[:2])
assert t[-1] <= when(job["finished_at"]), (job, ev[-1])
PY
c --json jobs list --state succeeded | grep -q "$job" || fail "jobs list --state"
c --json tasks get t1 >"$tmp/task" || fail "tasks get"
grep -q '"module_ids":\["m00","m01","m02"\]' "$tmp/task" || fail "task modules: $(cat "$tmp/task")"
[ "$(c tasks list | wc -l)" = 1 ] || fail "tasks list"
c --json generate --task t1 --max-new-tokens 4 --text "hello" >"$tmp/g" || fail "generate --task"
grep -q '"finish_reason"' "$tmp/g" || fail "generate --task: no end message"
c generate --task nosuch --text hi 2>"$tmp/e"
grep -q NOT_FOUND "$tmp/e" || fail "generate unknown task: $(cat "$tmp/e")"
evals=$(metric lorahub_compose_evaluations_total)
[ "${evals%.*}" = 10 ] || fail "lorahub_compose_evaluations_total is '$evals', want 10"
[ "$(metric 'lorahub_compose_jobs{state="succeeded"}')" = 1 ] || fail "jobs{succeeded} gauge"
[ "$(metric 'lorahub_compose_jobs{state="running"}')" = 0 ] || fail "jobs{running} gauge"
# Scoring passes: COBYLA scores one candidate a call, one pass each. A CMA-ES
# population of 8 candidates x 5 examples goes to the device in pieces of
# --compose-max-rows 32 / 5 = 6 candidates, one pass each: 2 generations x 2.
passes=$(metric lorahub_compose_forward_passes_total)
[ "${passes%.*}" = 10 ] || fail "lorahub_compose_forward_passes_total is '$passes', want 10"
# Each pass was one closure of device work on the engine's thread.
work=$(metric lorahub_engine_device_work_seconds_count)
[ "${work%.*}" = 10 ] || fail "lorahub_engine_device_work_seconds_count is '$work', want 10"
c --json compose --task t1c --modules m00,m01,m02 --examples "$fx/examples.jsonl" \
  --optimizer cmaes --population 8 --budget 16 --wait >"$tmp/wc" 2>>"$tmp/err" \
  || fail "cmaes compose --wait: $(tail -3 "$tmp/wc")"
[ "$(json_field '["state"]' <"$tmp/wc")" = succeeded ] || fail "cmaes job state"
# Each generation's evaluations are written together (ProgressWriter), every one of them.
[ "$(grep -c '"event":"evaluation"' "$tmp/wc")" = 16 ] || fail "want 16 cmaes evaluation events"
passes=$(metric lorahub_compose_forward_passes_total)
[ "${passes%.*}" = 14 ] || fail "lorahub_compose_forward_passes_total is '$passes' after CMA-ES, want 14"
work=$(metric lorahub_engine_device_work_seconds_count)
[ "${work%.*}" = 14 ] || fail "lorahub_engine_device_work_seconds_count is '$work' after CMA-ES, want 14"
c compose --task t1 --modules m00 --examples "$fx/examples.jsonl" 2>"$tmp/e"
grep -q 'ALREADY_EXISTS: spec.task' "$tmp/e" || fail "task exists: $(cat "$tmp/e")"
c jobs cancel "$job" 2>"$tmp/e"
grep -q FAILED_PRECONDITION "$tmp/e" || fail "cancel finished job: $(cat "$tmp/e")"

# Cancellation of a long job.
c --json compose --task t2 --sample 3 --sample-seed 7 --optimizer random \
  --examples "$fx/examples.jsonl" --budget 5000 >"$tmp/j2" || fail "submit t2"
job2=$(json_field '["id"]' <"$tmp/j2")
sleep 0.5
c jobs rm "$job2" 2>"$tmp/e"
[ $? = 1 ] && grep -q FAILED_PRECONDITION "$tmp/e" || fail "rm of an active job: $(cat "$tmp/e")"
c --json jobs cancel "$job2" >/dev/null || fail "cancel"
c --json jobs watch "$job2" >"$tmp/w2"
grep -q '"event":"cancelled"' "$tmp/w2" || fail "no cancelled event"
[ "$(json_field '["state"]' <"$tmp/w2")" = cancelled ] || fail "t2 not cancelled"

# Crash during a job: kill -9 while it runs; after a restart the job is
# re-queued, completes, and its task serves; the earlier job and task remain.
c --json compose --task t3 --modules m01,m02,m03 --optimizer random --budget 200 \
  --examples "$fx/examples.jsonl" >"$tmp/j3" || fail "submit t3"
job3=$(json_field '["id"]' <"$tmp/j3")
for _ in $(seq 100); do
  c --json jobs get "$job3" | grep -q '"state":"running"' && break; sleep 0.1
done
c --json jobs get "$job3" | grep -q '"state":"running"' || fail "t3 never ran"
# Let it checkpoint a few evaluations, then crash.
for _ in $(seq 200); do
  done3=$(c --json jobs get "$job3" | json_field '["evaluations"]')
  [ "${done3:-0}" -ge 3 ] && break; sleep 0.05
done
[ "${done3:-0}" -ge 3 ] || fail "t3 made no progress"
kill -9 "$pid"; wait "$pid" 2>/dev/null; pid=
serve_fixture
grep -q "re-queued" "$tmp/err" || fail "no re-queue message after the crash"
c --json jobs watch "$job3" >"$tmp/w3" || fail "t3 after restart: $(tail -2 "$tmp/w3")"
[ "$(json_field '["state"]' <"$tmp/w3")" = succeeded ] || fail "t3 did not succeed"
# Resumed, not restarted: it says so, the evaluation numbers of both
# attempts are exactly 1..200 once each (the budget is not exceeded and the
# spent evaluations are not repeated), and the result counts 200.
grep -q "job $job3 resumes after" "$tmp/err" || fail "t3 did not resume: $(grep "$job3" "$tmp/err")"
$py - "$tmp/w3" <<'PY' || fail "t3 evaluation numbering after resume"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
idx = [l["index"] for l in lines if l.get("event") == "evaluation"]
assert sorted(idx) == list(range(1, 201)), (len(idx), idx[:5], idx[-5:])
end = lines[-1]
assert end["state"] == "succeeded", end
print("t3 resumed; evaluations", len(idx))
PY
[ "$(c --json jobs get "$job3" | json_field '["evaluations"]')" = 200 ] || fail "t3 evaluations"
c --json generate --task t3 --max-new-tokens 4 --text "hello" >/dev/null || fail "t3 serve"
c --json jobs get "$job" | grep -q '"state":"succeeded"' || fail "job lost on restart"
c --json tasks get t1 >/dev/null || fail "task lost on restart"
[ "$(metric 'lorahub_compose_jobs{state="succeeded"}')" = 3 ] || fail "gauge after restart"
[ "$(metric 'lorahub_compose_jobs{state="cancelled"}')" = 1 ] || fail "cancelled gauge"
# Deleting an ended job: its events go, its task stays and serves.
c jobs rm job-nope 2>"$tmp/e"
[ $? = 1 ] && grep -q NOT_FOUND "$tmp/e" || fail "rm of an unknown job: $(cat "$tmp/e")"
c --json jobs rm "$job" | grep -q "\"deleted\":\"$job\"" || fail "jobs rm"
c jobs get "$job" 2>"$tmp/e"; grep -q NOT_FOUND "$tmp/e" || fail "deleted job still there"
c jobs watch "$job" 2>"$tmp/e"; grep -q NOT_FOUND "$tmp/e" || fail "deleted job's events still there"
c --json tasks get t1 | grep -q '"job_id":""' || fail "task t1 after its job went: $(c --json tasks get t1)"
c --json generate --task t1 --max-new-tokens 4 --text "hello" >/dev/null || fail "t1 serves after rm"
[ "$(metric 'lorahub_compose_jobs{state="succeeded"}')" = 2 ] || fail "gauge after rm"
[ "$(metric 'lorahub_compose_jobs_deleted_total{reason="request"}')" = 1 ] || fail "deleted counter"
# A graceful stop still works with the worker running.
kill -TERM "$pid"; wait "$pid" || fail "serve exit status $?"; pid=
# Retention: restarted with --job-retention-s 1, the server deletes every
# ended job (all ended more than a second ago); the tasks stay and serve.
serve_fixture --job-retention-s 1
for _ in $(seq 100); do
  [ -z "$(c jobs list)" ] && break; sleep 0.1
done
[ -z "$(c jobs list)" ] || fail "jobs left after retention: $(c jobs list)"
grep -q "job retention: deleted [0-9]* finished jobs older than 1s" "$tmp/err" || fail "no retention log line"
[ "$(metric 'lorahub_compose_jobs_deleted_total{reason="retention"}')" = 3 ] || fail "retention counter"
[ "$(metric 'lorahub_compose_jobs{state="succeeded"}')" = 0 ] || fail "gauge after retention"
[ "$(c tasks list | wc -l)" = 3 ] || fail "tasks after retention: $(c tasks list)"
c --json generate --task t3 --max-new-tokens 4 --text "hello" >/dev/null || fail "t3 after retention"
"$lorahub" serve --model "$fx/base" --listen 127.0.0.1:0 --data-dir "$tmp" --job-retention-s -1 \
  >/dev/null 2>"$tmp/e"
[ $? = 2 ] && grep -q "job-retention-s" "$tmp/e" || fail "negative retention: $(cat "$tmp/e")"
kill -TERM "$pid"; wait "$pid" || fail "serve exit status $?"; pid=
echo "PASS (job best_score $best, lorahub score $score, weights $weights)"
