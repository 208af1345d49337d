#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs lorahub end to end
# on what ships with the project (no GPU, no downloads):
#   1. the gRPC server on 127.0.0.1 with the embedded default (models/default:
#      a 6.7M-parameter T5 instruction-tuned on 16 synthetic tasks, and 25
#      LoRA modules, one per pool task, all trained by lorahub itself);
#      the 25 modules registered through lorahubctl; for each held-out task
#      (never seen by the base or any module) a compose job learns LoraHub
#      weights from 5 examples (COBYLA, 40 evaluations including the warm
#      start: w = 0 and each module alone first; progress streamed),
#      then the composed task answers two test prompts through the server;
#   2. the accuracy table on DEMO_TEST_N (default 30) test examples per
#      held-out task: zero-shot base, best single module (lowest loss on the 5
#      examples), LoraHub composed (the compose job's weights) and 5-shot
#      in-context prompting of the base, scored by `lorahub eval` (the same
#      engine the server runs; task-aware exact match; one `lorahub eval
#      --plan` process per group of cells). The cells that do not need a
#      compose job (zero-shot, best single, 5-shot) are evaluated in the
#      background while part 1 runs, the composed ones after it. Every number
#      comes from this run.
#   3. only with DEMO_REF=1: LoraHub learning on the reference
#      implementation's fixtures (tests/testdata/ref_tiny): COBYLA and batched
#      CMA-ES next to what the reference (transformers + peft + scipy) reached
#      on the same files.
# After the build, parts 1 and 2 take about 45 s on a 2-core machine without a
# GPU (measured 44-46 s while other builds shared the cores; part 3 adds ~12 s).
# The full study (3 seeds, 100 test examples, CMA-ES, recovery) is
# deploy/embedded/study.sh; results in docs/ACCURACY.md.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup_debian.sh
targets=(//server:lorahub //client:lorahubctl //core/tasks:make_task_data)
bazel build "${targets[@]}" >/dev/null 2>&1 || bazel build "${targets[@]}"
# OpenBLAS 0.3.21 does not recognise every virtualised Xeon and falls back to
# its slowest kernels; on an AVX2 machine name a core type that it knows.
if [ -z "${OPENBLAS_CORETYPE:-}" ] && grep -qw avx2 /proc/cpuinfo; then
  export OPENBLAS_CORETYPE=Haswell
fi
# Two processes compute at a time (the server, or the composed cells'
# evaluation, next to the other cells' evaluation in the background), each
# with half the cores as BLAS/OpenMP threads: one each on 2 cores (two
# processes of 2 threads each on 2 cores thrash).
threads=$(( $(nproc) / 2 )); [ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
lorahub=$PWD/bazel-bin/server/lorahub
ctl=$PWD/bazel-bin/client/lorahubctl
make_task_data=$PWD/bazel-bin/core/tasks/make_task_data
py=/usr/bin/python3
test_n=${DEMO_TEST_N:-30}
# In memory where there is a /dev/shm: the server's job store commits (fsyncs)
# once per evaluation, and nothing here outlives the run.
tmp=$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d)
pid=
bg=
fg=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  [ -n "$bg" ] && kill "$bg" 2>/dev/null
  [ -n "$fg" ] && kill "$fg" 2>/dev/null
  wait 2>/dev/null; rm -rf "$tmp"
}
trap cleanup EXIT
t0=$(date +%s%N)
# Seconds since the start, one decimal.
elapsed() { local ms=$(( ($(date +%s%N) - t0) / 1000000 )); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }

model=$PWD/models/default
mapfile -t pool < <(cd "$model/modules" && ls)
modules=$(IFS=,; echo "${pool[*]}")
# Seed 1: the same generator seed the modules were trained with; held-out
# tasks were never generated for training, so their examples are new.
"$make_task_data" --out "$tmp/data" --seed 1 --train-per-task 1 --test-per-task "$test_n" >/dev/null
heldout=$("$make_task_data" --list | awk '$1 == "heldout" { print $3 }')

# The accuracy table's cells: one `lorahub eval` configuration on one held-out
# task's test set each. A cell is a line of an eval plan (`lorahub eval
# --plan`: one process, the model loaded once), its "task kind" in the
# plan's .keys file. plan NAME KIND... writes $tmp/NAME.plan for every held-out
# task and KIND (composed: the compose job's modules and weights, in the
# job's order, from $tmp/task_<task>.json).
plan() {
  local name=$1; shift
  $py - "$tmp" "$model" "$tmp/$name" "$*" $heldout <<'PY'
import json, os, sys
tmp, model, out, kinds, tasks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(), sys.argv[5:]
modules = sorted(os.listdir(model + "/modules"))
with open(out + ".plan", "w") as plan, open(out + ".keys", "w") as keys:
    for kind in kinds:
        for task in tasks:
            d = "%s/data/heldout/%s" % (tmp, task)
            words = ["--data", d + "/test.jsonl", "--task", task]
            if kind == "single":
                for m in modules:
                    words += ["--adapter", model + "/modules/" + m]
                words += ["--loss-examples", d + "/examples5.jsonl", "--pick-min-loss"]
            elif kind == "icl":
                words += ["--shots", d + "/examples5.jsonl", "--k", "5"]
            elif kind == "composed":
                job = json.load(open("%s/task_%s.json" % (tmp, task)))
                for m in job["module_ids"]:
                    words += ["--adapter", model + "/modules/" + m]
                words += ["--weights", ",".join(repr(w) for w in job["weights"])]
            plan.write(json.dumps(words) + "\n")
            keys.write("%s %s\n" % (task, kind))
PY
}
# start_plan NAME: `lorahub eval --plan` in the background (its pid in $!);
# wait_plan NAME PID: its end, or the script's with its error.
start_plan() {
  "$lorahub" eval --model "$model/base" --plan "$tmp/$1.plan" --json >"$tmp/$1.out" 2>"$tmp/$1.err" &
}
wait_plan() {
  wait "$2" || { echo "lorahub eval --plan ($1) failed:" >&2; cat "$tmp/$1.err" >&2; exit 1; }
}
# The cells that need no compose job (5-shot, best single, zero-shot), in the
# background while part 1 runs (a lower priority for them was measured
# slower on a busy machine: they then finish long after part 1); the composed
# cells after part 1.
plan baseline icl single zero
start_plan baseline
bg=$!

echo "== 1. serving: lorahub serve on 127.0.0.1, the embedded default and its 25 LoRA modules"
echo "   (the zero-shot, best-single and 5-shot cells of part 2 are being evaluated in the background)"
mkdir -p "$tmp/server"
"$lorahub" serve --model "$model/base" --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --data-dir "$tmp/server" >"$tmp/out" 2>"$tmp/err" &
pid=$!
for _ in $(seq 300); do grep -q '^listening on' "$tmp/out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on \(.*\)$/\1/p' "$tmp/out")
[ -n "$addr" ] || { cat "$tmp/err" >&2; exit 1; }
c() { "$ctl" --server "$addr" "$@"; }
echo "server at $addr: $(c health)  [$(elapsed) s]"
t_serve=$(elapsed)
for m in "${pool[@]}"; do c modules add --dir "$model/modules/$m" --id "$m" >/dev/null; done
echo "$(c modules list | wc -l) modules registered: ${pool[*]}  [$(elapsed) s]"
t_reg=$(elapsed)
for task in $heldout; do
  dir=$tmp/data/heldout/$task
  echo
  echo "-- compose job: held-out task '$task', 25 modules, 5 examples, COBYLA budget 40 with warm start  [$(elapsed) s]"
  head -2 "$dir/examples5.jsonl" | $py -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line)
    print('   example: %s -> %s' % (d['input'], d['output']))"
  # --json streams one event per evaluation; show them as a progress line.
  c --json compose --task "$task" --modules "$modules" --examples "$dir/examples5.jsonl" \
    --budget 40 --warm-start --wait | $py -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line)
    if d.get('event') == 'evaluation':
        sys.stderr.write('\r   evaluation %2d/40  best score %.4f ' % (d['index'], d['best_score']))
        sys.stderr.flush()
    elif d.get('event') == 'finished':
        sys.stderr.write('\n')
        print('   finished in %.1f s, best score %.4f' % (d['seconds'], d['best_score']))
    elif d.get('event') == 'failed':
        sys.stderr.write('\n')
        print('   FAILED: ' + d.get('reason', '')); sys.exit(1)
"
  c --json tasks get "$task" | tail -1 >"$tmp/task_$task.json"
  $py -c "
import json, sys
d = json.load(open(sys.argv[1]))
top = sorted(zip(d['weights'], d['module_ids']), key=lambda p: -abs(p[0]))[:4]
print('   largest weights: ' + ', '.join('%s %+.2f' % (m, w) for w, m in top))" "$tmp/task_$task.json"
  head -2 "$dir/test.jsonl" | $py -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line)
    print(d['input'] + '\t' + d['output'])" >"$tmp/two.tsv"
  while IFS=$'\t' read -r input want; do
    got=$(c --json generate --task "$task" --text "$input" --max-new-tokens 32 | tail -1 \
      | $py -c "import json,sys; print(json.loads(sys.stdin.read())['text'])")
    echo "   generate --task $task: '$input' -> '$got' (expected '$want')"
  done <"$tmp/two.tsv"
done
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
t_compose=$(elapsed)

echo
echo "== 2. accuracy on held-out tasks ($test_n test examples each, exact match, %)  [$(elapsed) s]"
plan composed composed
start_plan composed
fg=$!
wait_plan composed "$fg"
fg=
wait_plan baseline "$bg"
bg=
t_cells=$(elapsed)
printf '%-18s %10s %12s %17s %11s\n' task zero-shot best-single "LoraHub composed" "5-shot ICL"
$py - "$tmp" $heldout <<'PY'
import json, os, sys
tmp, tasks = sys.argv[1], sys.argv[2:]
tsv = open(tmp + "/table.tsv", "w")
cells = {}
for name in ("baseline", "composed"):
    keys = [l.split() for l in open("%s/%s.keys" % (tmp, name))]
    for line in open("%s/%s.out" % (tmp, name)):
        d = json.loads(line)
        cells[tuple(keys[d["plan_line"] - 1])] = d
for task in tasks:
    acc = ["%.0f" % (100 * cells[(task, k)]["accuracy"]) for k in ("zero", "single", "composed", "icl")]
    print("%-18s %10s %12s %17s %11s   (best single: %s)"
          % tuple([task] + acc + [os.path.basename(cells[(task, "single")]["adapter"])]))
    tsv.write("\t".join(acc) + "\n")
PY
awk -F'\t' '{ z += $1; s += $2; c += $3; i += $4; n++ }
  END { printf "%-18s %10.1f %12.1f %17.1f %11.1f\n", "average", z / n, s / n, c / n, i / n }' "$tmp/table.tsv"
echo "(DEMO_TEST_N=$test_n test examples per task, drawn by make_task_data --seed 1 in this run;"
echo " deploy/embedded/study.sh runs 3 seeds x 100 examples, CMA-ES and the recovery check: docs/ACCURACY.md)"
echo
echo "timings (s since start): server up $t_serve, modules registered $t_reg, compose jobs and generation done $t_compose,"
echo "  accuracy table done $t_cells (its zero-shot/best-single/5-shot cells ran alongside part 1)"

if [ "${DEMO_REF:-0}" = 1 ]; then
echo
echo "== 3. learning (DEMO_REF=1): LoraHub composition weights for 5 examples, 20 modules, budget 40  [$(elapsed) s]"
printf '%-10s %-36s %-14s %-12s %-10s\n' fixture method best_score evaluations seconds
for fx in tests/testdata/ref_tiny/tiny_s0 tests/testdata/ref_tiny/tiny_s1; do
  adapters=()
  for m in "$fx"/modules/m*; do adapters+=(--adapter "$m"); done
  ref=$($py -c "import json; d=json.load(open('$fx/ref_learn.json')); print('%.4f %d %.2f' % (d['best_score'], d['evaluations'], d['learn_s']))")
  set -- $ref
  printf '%-10s %-36s %-14s %-12s %-10s\n' "$(basename "$fx")" "reference (scipy COBYLA)" "$1" "$2" "$3"
  for spec in "cobyla 40" "cmaes 240"; do
    set -- $spec
    out=$("$lorahub" learn --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
      --optimizer "$1" --budget "$2" --json 2>/dev/null | tail -1)
    $py - "$fx" "$1" "$out" <<'PY'
import json, os, sys
fx, opt, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
label = "lorahub %s (%d forward passes)" % (opt, out["forward_passes"])
print("%-10s %-36s %-14.4f %-12d %-10.2f" % (os.path.basename(fx), label, out["best_score"],
                                            out["evaluations"], out["seconds"]))
PY
  done
done
echo
echo "(reference times are on the GPU host's CPU; ours on this machine's CPU)"
fi
echo
echo "demo finished in $(elapsed) s (after the build)"
