#!/usr/bin/env bash
# Every composition method (lorahub, cat, ties, dare_linear) end to end
# through the real server: for each, a fixed-weights compose job (optimizer
# fixed, budget 1, seed 7) on three ref_tiny modules publishes a task that
#  - records its method (tasks get),
#  - scored what `lorahub score --method M --composition-seed 7` scores
#    (job best_score vs offline score, 1e-6 relative),
#  - generates (lorahubctl generate --task) the ids of offline
#    `lorahub generate --method M --composition-seed 7` with the same weights,
#  - exports an adapter whose `lorahub score` loss is the offline loss of the
#    modules + weights + method (1e-6 relative); cat's has rank 3 r.
# Explicit modules + weights + method (Python client, defaults density 0.5,
# mask seed 42) generate the offline ids too, and a bad method value is
# INVALID_ARGUMENT naming the field (Generate and SubmitJob). Generation is
# compared again on the trained default model, where the methods differ.
#   methods_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2")
fx=$(readlink -f tests/testdata/ref_tiny/tiny_s0)
proto_dir=$(readlink -f proto)
. "$(dirname "$0")/harness.sh"

. "$(dirname "$0")/py_stubs.sh"
make_py_stubs "$proto_dir" "$tmp/py" || fail "protoc"

start_server --model "$fx/base" --data-dir "$tmp"
jf() { "$py" -c "import json,sys; print(json.loads(sys.stdin.readlines()[-1])$1)"; }
same() {  # same A B WHAT: |A - B| <= 1e-6 |B|
  "$py" -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); sys.exit(0 if abs(a-b)<=1e-6*abs(b) else 1)" \
    "$1" "$2" || fail "$3: $1 != $2"
  echo "$3: $1 == $2"
}

for m in m00 m01 m02; do
  c --json modules add --dir "$fx/modules/$m" --id "$m" >/dev/null || fail "add $m"
done
W=0.75,-0.5,0.625  # exact in float (the wire weights are float)
mods=(--adapter "$fx/modules/m00" --adapter "$fx/modules/m01" --adapter "$fx/modules/m02")
prompt="Infer the date from context. Q: Yesterday was 12/31/1999. What is the date today? A:"
offline_score() {  # offline_score FIELD ARGS...: a field of `lorahub score --json`
  local f=$1; shift
  "$lorahub" score --model "$fx/base" "$@" --examples "$fx/examples.jsonl" --json \
    2>>"$tmp/err" | jf "[\"$f\"]"
}
offline_ids() {  # offline_ids ARGS...: output_ids of `lorahub generate --json`
  "$lorahub" generate --model "$fx/base" "$@" --text "$prompt" --max-new-tokens 12 \
    --json 2>>"$tmp/err" | jf '["output_ids"]'
}

losses=
for method in lorahub cat ties dare_linear; do
  t="t_$method"
  c --json compose --task "$t" --modules m00,m01,m02 --optimizer fixed --weights "$W" \
    --budget 1 --seed 7 --method "$method" --examples "$fx/examples.jsonl" --wait \
    >"$tmp/watch_$method" 2>>"$tmp/err" || fail "compose $method: $(tail -2 "$tmp/watch_$method")"
  [ "$(jf '["state"]' <"$tmp/watch_$method")" = succeeded ] \
    || fail "$method job: $(tail -1 "$tmp/watch_$method")"
  c --json tasks get "$t" >"$tmp/task_$method" || fail "tasks get $t"
  want=$(echo "$method" | tr a-z A-Z)
  [ "$(jf '["method"]' <"$tmp/task_$method")" = "COMPOSITION_METHOD_$want" ] \
    || fail "task method: $(cat "$tmp/task_$method")"
  # The job scored the offline composition.
  job_score=$(jf '["best_score"]' <"$tmp/watch_$method")
  off_score=$(offline_score score "${mods[@]}" --weights "$W" --method "$method" --composition-seed 7)
  [ -n "$job_score" ] && [ -n "$off_score" ] || fail "$method scores: '$job_score' '$off_score'"
  same "$job_score" "$off_score" "$method job score vs lorahub score"
  # Generate with the task = offline generate.
  c --json generate --task "$t" --max-new-tokens 12 --text "$prompt" >"$tmp/g_$method" \
    2>>"$tmp/err" || fail "generate --task $t"
  served=$(jf '["output_ids"]' <"$tmp/g_$method")
  offline=$(offline_ids "${mods[@]}" --weights "$W" --method "$method" --composition-seed 7)
  [ -n "$offline" ] && [ "$served" = "$offline" ] || fail "$method generate: served $served offline $offline"
  echo "$method generate: $served"
  # Export = offline composition.
  c --json tasks export "$t" --out "$tmp/exp_$method" >/dev/null 2>>"$tmp/err" || fail "export $t"
  a=$(offline_score loss --adapter "$tmp/exp_$method")
  b=$(offline_score loss "${mods[@]}" --weights "$W" --method "$method" --composition-seed 7)
  [ -n "$a" ] && [ -n "$b" ] || fail "$method export scores: '$a' '$b'"
  same "$a" "$b" "$method exported loss vs lorahub score"
  losses="$losses $a"
done
r=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['r'])" "$tmp/exp_cat/adapter_config.json")
[ "$r" = 12 ] || fail "cat export rank $r, want 12"
# The methods compose different adapters (the method is really applied).
"$py" -c "
import sys, itertools
v = [float(x) for x in sys.argv[1:]]
sys.exit(0 if all(abs(a - b) > 1e-6 * abs(b) for a, b in itertools.combinations(v, 2)) else 1)
" $losses || fail "some methods give the same loss:$losses"

# Explicit modules + weights + method (defaults: density 0.5, mask seed 42).
for method in cat ties dare_linear; do
  offline_ids "${mods[@]}" --weights "$W" --method "$method" >"$tmp/off_$method" \
    || fail "offline $method"
done
PYTHONPATH="$tmp/py" "$py" - "$port" "$prompt" "$W" "$tmp" <<'PY' || fail "explicit compositions"
import json, sys
import grpc
from lorahub.v1 import common_pb2, compose_pb2, compose_pb2_grpc, inference_pb2, inference_pb2_grpc
port, prompt, w, tmp = sys.argv[1:5]
ch = grpc.insecure_channel("127.0.0.1:" + port)
inf = inference_pb2_grpc.InferenceServiceStub(ch)
weights = [float(x) for x in w.split(",")]
methods = {"cat": common_pb2.COMPOSITION_METHOD_CAT, "ties": common_pb2.COMPOSITION_METHOD_TIES,
           "dare_linear": common_pb2.COMPOSITION_METHOD_DARE_LINEAR}
def generate(method):
    req = inference_pb2.GenerateRequest(text=prompt)
    req.adapter.composition.module_ids.extend(["m00", "m01", "m02"])
    req.adapter.composition.weights.extend(weights)
    req.adapter.composition.method = method
    req.options.max_new_tokens = 12
    out = None
    for msg in inf.Generate(req, timeout=60):
        if msg.HasField("end"):
            out = list(msg.end.output_ids)
    return out
for name, m in methods.items():
    want = json.loads(open(tmp + "/off_" + name).read().splitlines()[-1])
    got = generate(m)
    assert got == want, (name, got, want)
    assert generate(m) == want, name  # second time from the cache
    print(name, "explicit composition OK", got)
try:
    generate(99)
    raise SystemExit("method 99 accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.code()
    assert "adapter.composition.method" in e.details(), e.details()
cs = compose_pb2_grpc.ComposeServiceStub(ch)
spec = compose_pb2.JobSpec(task="bad", method=99, optimizer=compose_pb2.OPTIMIZER_FIXED, budget=1)
spec.module_ids.ids.extend(["m00"])
spec.examples.add(input="a", output="b")
spec.initial_weights.extend([1.0])
try:
    cs.SubmitJob(compose_pb2.SubmitJobRequest(spec=spec), timeout=10)
    raise SystemExit("job method 99 accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.code()
    assert "spec.method" in e.details(), e.details()
# Composition options a method does not read, or out of range, name the field.
def bad_generate(method, field, **kw):
    req = inference_pb2.GenerateRequest(text=prompt)
    c = req.adapter.composition
    c.module_ids.extend(["m00", "m01", "m02"]); c.weights.extend(weights); c.method = method
    if "density" in kw: c.options.density = kw["density"]
    if "sign" in kw: c.options.majority_sign_method = kw["sign"]
    if "dare_seed" in kw: c.dare_seed = kw["dare_seed"]
    try:
        list(inf.Generate(req, timeout=10))
        raise SystemExit("accepted: %s %s" % (method, kw))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (kw, e.code())
        assert field in e.details(), (field, e.details())
bad_generate(common_pb2.COMPOSITION_METHOD_TIES, "adapter.composition.options.density", density=0.0)
bad_generate(common_pb2.COMPOSITION_METHOD_TIES, "adapter.composition.options.density", density=1.5)
bad_generate(common_pb2.COMPOSITION_METHOD_LORAHUB, "adapter.composition.options.density", density=0.5)
bad_generate(common_pb2.COMPOSITION_METHOD_DARE_LINEAR,
             "adapter.composition.options.majority_sign_method", sign=common_pb2.MAJORITY_SIGN_METHOD_FREQUENCY)
bad_generate(common_pb2.COMPOSITION_METHOD_TIES,
             "adapter.composition.options.majority_sign_method", sign=7)
bad_generate(common_pb2.COMPOSITION_METHOD_TIES, "adapter.composition.dare_seed", dare_seed=3)
spec.method = common_pb2.COMPOSITION_METHOD_CAT
spec.composition_options.density = 0.3
try:
    cs.SubmitJob(compose_pb2.SubmitJobRequest(spec=spec), timeout=10)
    raise SystemExit("density with cat accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.code()
    assert "spec.composition_options.density" in e.details(), e.details()
print("errors OK")
PY

# Offline CLI edge: a bad density names the flag.
"$lorahub" score --model "$fx/base" "${mods[@]}" --weights "$W" --method ties --density 0 \
  --examples "$fx/examples.jsonl" 2>"$tmp/e" >/dev/null && fail "density 0 accepted"
grep -q -- '--density' "$tmp/e" || fail "density error: $(cat "$tmp/e")"

kill -TERM "$pid"; wait "$pid" || fail "server exit code"
pid=

# The tiny fixture's random base generates only pad ids, so generation is
# also checked on the trained default model (models/default in the source
# tree, found through this script's symlink; not a Bazel package).
root=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
dm=$root/models/default
if [ ! -f "$dm/base/model.safetensors" ]; then
  echo "FAIL: $dm not found (the trained default model)" >&2; exit 1
fi
mkdir -p "$tmp/d2"
start_server --model "$dm/base" --data-dir "$tmp/d2"
for m in add double_number reverse_word; do
  c --json modules add --dir "$dm/modules/$m" --id "$m" >/dev/null || fail "add $m"
done
dmods=(--adapter "$dm/modules/add" --adapter "$dm/modules/double_number" --adapter "$dm/modules/reverse_word")
text="Add the two numbers: 12 and 30"
outs=
for method in lorahub cat ties dare_linear; do
  c --json compose --task "d_$method" --modules add,double_number,reverse_word --optimizer fixed \
    --weights "$W" --budget 1 --seed 7 --method "$method" --examples "$fx/examples.jsonl" --wait \
    >"$tmp/dwatch_$method" 2>>"$tmp/err" || fail "compose d_$method"
  c --json generate --task "d_$method" --max-new-tokens 12 --text "$text" >"$tmp/dg_$method" \
    2>>"$tmp/err" || fail "generate --task d_$method"
  served=$(jf '["output_ids"]' <"$tmp/dg_$method")
  offline=$("$lorahub" generate --model "$dm/base" "${dmods[@]}" --weights "$W" --method "$method" \
    --composition-seed 7 --text "$text" --max-new-tokens 12 --json 2>>"$tmp/err" | jf '["output_ids"]')
  [ -n "$offline" ] && [ "$served" = "$offline" ] || fail "default model, $method: served $served offline $offline"
  echo "default model, $method generate: $served"
  outs="$outs $(echo "$served" | tr -d ' ')"
done
[ "$(echo $outs | tr ' ' '\n' | sort -u | wc -l)" -ge 3 ] \
  || fail "the methods generate alike on the default model:$outs"
# Explicit modules + weights + method on the default model (mask seed 42).
for method in cat ties dare_linear; do
  "$lorahub" generate --model "$dm/base" "${dmods[@]}" --weights "$W" --method "$method" \
    --text "$text" --max-new-tokens 12 --json 2>>"$tmp/err" >"$tmp/doff_$method" \
    || fail "offline $method"
done
PYTHONPATH="$tmp/py" "$py" - "$port" "$text" "$W" "$tmp" <<'PY' || fail "explicit compositions (default model)"
import json, sys
import grpc
from lorahub.v1 import common_pb2, inference_pb2, inference_pb2_grpc
port, text, w, tmp = sys.argv[1:5]
inf = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel("127.0.0.1:" + port))
for name, m in (("cat", common_pb2.COMPOSITION_METHOD_CAT), ("ties", common_pb2.COMPOSITION_METHOD_TIES),
                ("dare_linear", common_pb2.COMPOSITION_METHOD_DARE_LINEAR)):
    req = inference_pb2.GenerateRequest(text=text)
    req.adapter.composition.module_ids.extend(["add", "double_number", "reverse_word"])
    req.adapter.composition.weights.extend(float(x) for x in w.split(","))
    req.adapter.composition.method = m
    req.options.max_new_tokens = 12
    got = [list(r.end.output_ids) for r in inf.Generate(req, timeout=60) if r.HasField("end")][-1]
    want = json.loads(open(tmp + "/doff_" + name).read().splitlines()[-1])["output_ids"]
    assert got == want, (name, got, want)
    print("default model,", name, "explicit composition:", got)
PY
# Explicit composition options through lorahubctl generate = offline generate
# with the same --density / --majority-sign / mask seed; a job with
# composition options publishes a task that serves the same ids.
for opts in "ties --density 0.3 --majority-sign frequency" "dare_linear --density 0.7"; do
  read -r method rest <<<"$opts"
  seed_flag=(); [ "$method" = dare_linear ] && seed_flag=(--dare-seed 5)
  c --json generate --modules add,double_number,reverse_word --weights "$W" --method $method $rest \
    "${seed_flag[@]}" --max-new-tokens 12 --text "$text" >"$tmp/dopt" 2>>"$tmp/err" \
    || fail "lorahubctl generate --method $opts"
  served=$(jf '["output_ids"]' <"$tmp/dopt")
  cs=42; [ "$method" = dare_linear ] && cs=5
  offline=$("$lorahub" generate --model "$dm/base" "${dmods[@]}" --weights "$W" --method $method $rest \
    --composition-seed $cs --text "$text" --max-new-tokens 12 --json 2>>"$tmp/err" | jf '["output_ids"]')
  [ -n "$offline" ] && [ "$served" = "$offline" ] || fail "options $opts: served $served offline $offline"
  echo "default model, generate --method $opts: $served"
done
c --json compose --task d_ties_opts --modules add,double_number,reverse_word --optimizer fixed \
  --weights "$W" --budget 1 --seed 7 --method ties --density 0.3 --majority-sign frequency \
  --examples "$fx/examples.jsonl" --wait >"$tmp/dwatch_opts" 2>>"$tmp/err" || fail "compose with options"
c --json generate --task d_ties_opts --max-new-tokens 12 --text "$text" >"$tmp/dg_opts" 2>>"$tmp/err" \
  || fail "generate --task d_ties_opts"
served=$(jf '["output_ids"]' <"$tmp/dg_opts")
offline=$("$lorahub" generate --model "$dm/base" "${dmods[@]}" --weights "$W" --method ties --density 0.3 \
  --majority-sign frequency --composition-seed 7 --text "$text" --max-new-tokens 12 --json 2>>"$tmp/err" \
  | jf '["output_ids"]')
[ -n "$offline" ] && [ "$served" = "$offline" ] || fail "task with options: served $served offline $offline"
# Usage errors: options without --modules, a bad sign name.
c generate --task d_ties_opts --density 0.3 --text x >/dev/null 2>&1; rc=$?
[ "$rc" = 2 ] || fail "--density with --task: exit $rc"
c generate --modules add --weights 1 --method ties --majority-sign most --text x >/dev/null 2>&1; rc=$?
[ "$rc" = 2 ] || fail "--majority-sign most: exit $rc"
kill -TERM "$pid"; wait "$pid" || fail "second server exit code"
pid=
# Retention keeps the jobs of ties and dare_linear tasks (their parameters
# live in the job's spec) and deletes the others; every task still serves
# the same ids. Restarted on the same data with --job-retention-s 1.
sleep 1
"$lorahub" serve --model "$dm/base" --listen 127.0.0.1:0 --job-retention-s 1 \
  --metrics-listen 127.0.0.1:0 --data-dir "$tmp/d2" >"$tmp/out3" 2>>"$tmp/err" &
pid=$!
for _ in $(seq 300); do grep -q '^listening on' "$tmp/out3" && break; sleep 0.1; done
port=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$tmp/out3")
[ -n "$port" ] || fail "third server did not print its port"
for _ in $(seq 100); do
  [ "$(c jobs list | wc -l)" = 3 ] && break; sleep 0.1
done
kept=$(c --json jobs list | "$py" -c "import json,sys; print(' '.join(sorted(json.loads(l)['task'] for l in sys.stdin)))")
[ "$kept" = "d_dare_linear d_ties d_ties_opts" ] || fail "jobs after retention: $kept"
for method in lorahub cat ties dare_linear; do
  c --json generate --task "d_$method" --max-new-tokens 12 --text "$text" >"$tmp/dr_$method" \
    2>>"$tmp/err" || fail "generate --task d_$method after retention"
  [ "$(jf '["output_ids"]' <"$tmp/dr_$method")" = "$(jf '["output_ids"]' <"$tmp/dg_$method")" ] \
    || fail "d_$method serves other ids after retention"
done
ties_job=$(jf '["id"]' <"$tmp/dwatch_ties")
c jobs rm "$ties_job" 2>"$tmp/e"
[ $? = 1 ] && grep -q "FAILED_PRECONDITION.*task 'd_ties'" "$tmp/e" || fail "rm of d_ties's job: $(cat "$tmp/e")"
c tasks rm d_ties || fail "tasks rm d_ties"
# Now the job may go: by this rm, or by a sweep (every 0.25 s here) first.
c jobs rm "$ties_job" 2>"$tmp/e" || grep -q NOT_FOUND "$tmp/e" \
  || fail "rm of d_ties's job after its task: $(cat "$tmp/e")"
c jobs get "$ties_job" 2>"$tmp/e"; grep -q NOT_FOUND "$tmp/e" || fail "d_ties's job is still there"
kill -TERM "$pid"; wait "$pid" || fail "third server exit code"
pid=
echo PASS
