#!/usr/bin/env bash
# The accuracy study of the embedded default (issue 6, "Done when"), on CPU,
# through the lorahub CLI only (make_task_data, eval, learn):
#
# (a) held-out: for each of the 8 held-out tasks x SEEDS, with the seed's data
#     (make_task_data --seed s: heldout/<task>/examples5.jsonl, the 5 examples a
#     user gives, and heldout/<task>/test.jsonl, TEST_N examples none of which
#     has an example's input), the exact-match accuracy on the test set of
#       zero-shot     the base alone
#       best single   the pool module with the lowest loss on the 5 examples
#                     (what a user can pick without test labels)
#       oracle single the pool module with the best accuracy on the first
#                     ORACLE_N test examples (ties: lower loss), scored on all
#                     of them (reported apart: it needs test labels; a subset
#                     keeps the study fast)
#       cobyla        LoraHub, all 25 modules, COBYLA from w = 0 (the paper's
#                     setting), BUDGET evaluations
#       cobyla warm   the same with --warm-start: the first objective call
#                     scores w = 0 and each module alone (26 of the BUDGET
#                     evaluations), COBYLA starts from the best of them
#       cmaes         LoraHub, all 25 modules, CMA-ES, CMAES_BUDGET evaluations
#       5-shot ICL    the base with the 5 examples prepended (lorahub eval
#                     --shots: "<in>\n<out>\n\n" per example, then the input)
# (b) recovery: for RECOVERY_TASKS x SEEDS, a pool of the task's own module and
#     9 others (drawn by the seed), COBYLA BUDGET evaluations (from 0, and with
#     --warm-start) on 5 examples of
#     the task (make_task_data --seed s: the first 5 lines of pool/<task>.jsonl
#     whose input is not in the test set); composed accuracy vs the own
#     module's accuracy on TEST_N pool_test/<task>.jsonl examples of seed s
#     (fresh draws; the modules were trained on seed 1's pool/ files).
#
# (c) own task: each pool module on TEST_N pool_test/<module>.jsonl examples
#     of the first seed (the table of docs/ACCURACY.md), with the base alone
#     on the same examples.
#
# Writes OUT/study.jsonl (one JSON line per measurement), OUT/study.md (the
# tables) and prints the tables and the wall time.
#
# Usage (repository root):  deploy/embedded/study.sh
# Environment: MODEL (models/default), BASE (MODEL/base), MODULES
#   (MODEL/modules), DEVICE (cpu | cuda:N, default cpu), JOBS (units of work
#   run at once, default 1: a unit is one held-out task x seed, one recovery
#   task x seed or one own-task eval; on a GPU 8-16 pay off, each unit is a
#   few short processes), OUT (/tmp/lorahub-study), SEEDS
#   ("1 2 3"), TEST_N (100), BUDGET (40), CMAES_BUDGET (40: about cobyla's
#   search time here), RECOVERY_TASKS
#   (5 pool tasks, below), HELDOUT_TASKS (all 8), ORACLE_N (20), PARTS
#   ("heldout recovery own"), LORAHUB and MAKE_TASK_DATA (built with bazel if
#   unset).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:-$ROOT/models/default}"
OUT="${OUT:-/tmp/lorahub-study}"
SEEDS="${SEEDS:-1 2 3}"
TEST_N="${TEST_N:-100}"
BUDGET="${BUDGET:-40}"
CMAES_BUDGET="${CMAES_BUDGET:-40}"
ORACLE_N="${ORACLE_N:-20}"
DEVICE="${DEVICE:-cpu}"
JOBS="${JOBS:-1}"
PARTS="${PARTS:-heldout recovery own}"
# The pool task with the strongest module of each family (own accuracy on seed
# 1's pool_test, docs/ACCURACY.md): string_edit, ordering, arithmetic,
# formatting, classification.
RECOVERY_TASKS="${RECOVERY_TASKS:-drop_vowels sort_digits double_number wrap_brackets vowel_first}"
py=/usr/bin/python3

if [ -z "${LORAHUB:-}" ] || [ -z "${MAKE_TASK_DATA:-}" ]; then
  bazel build //server:lorahub //core/tasks:make_task_data >&2
  LORAHUB="${LORAHUB:-$ROOT/bazel-bin/server/lorahub}"
  MAKE_TASK_DATA="${MAKE_TASK_DATA:-$ROOT/bazel-bin/core/tasks/make_task_data}"
fi
base="${BASE:-$MODEL/base}"
mods="${MODULES:-$MODEL/modules}"
mapfile -t pool < <(cd "$mods" && ls)
[ "${#pool[@]}" -gt 10 ] || { echo "study: want > 10 modules in $mods" >&2; exit 1; }
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$OUT/study.jsonl"
: >"$log"
start=$(date +%s.%N)
# record PART TASK SEED METHOD JSON: appends one line to the log.
record() {
  $py -c "
import json, sys
d = json.loads(sys.argv[5]); d.update(part=sys.argv[1], task=sys.argv[2], seed=int(sys.argv[3]), method=sys.argv[4])
print(json.dumps(d))" "$@" >>"$unit_log"
}
all_adapters=()
for m in "${pool[@]}"; do all_adapters+=(--adapter "$mods/$m"); done
heldout="${HELDOUT_TASKS:-$("$MAKE_TASK_DATA" --list | awk '$1 == "heldout" { print $3 }')}"

# learn_to DIR ARGS...: lorahub learn --out DIR; prints learn's JSON line.
learn_to() {
  local out=$1
  shift
  "$LORAHUB" learn --model "$base" --device "$DEVICE" "$@" --out "$out" --json | tail -1
}
# record_each PART TASK SEED "METHOD..." EVAL_LINES LEARN_JSON...: one record
# per --each-adapter line, named by METHOD in order; a learn JSON (or "{}")
# per method adds its search time, evaluations and weights.
record_each() {
  $py - "$@" >>"$unit_log" <<'PY'
import json, sys
part, task, seed, methods, lines = sys.argv[1:6]
learns = sys.argv[6:]
for m, line, l in zip(methods.split(), lines.splitlines(), learns):
    d = json.loads(line)
    l = json.loads(l)
    if l:
        d.update(learn_seconds=l["seconds"], evaluations=l["evaluations"],
                 best_loss=l["best_loss"], weights=l["weights"])
    d.update(part=part, task=task, seed=int(seed), method=m)
    print(json.dumps(d))
PY
}

# heldout_unit TASK SEED: the held-out measurements of one task and seed.
heldout_unit() {
  local task=$1 seed=$2 t0 data ex test picks best oracle l_cobyla l_warm l_cmaes lines
  local w="$work/heldout-$task-$seed"
  local unit_log="$w.jsonl"
  mkdir -p "$w"
  t0=$(date +%s)
  data="$work/data$seed"
  ex="$data/heldout/$task/examples5.jsonl"
  test="$data/heldout/$task/test.jsonl"
  local ev=("$LORAHUB" eval --model "$base" --device "$DEVICE" --data "$test" --task "$task" --json)
  record heldout "$task" "$seed" zero_shot "$("${ev[@]}")"
  record heldout "$task" "$seed" icl_5shot "$("${ev[@]}" --shots "$ex" --k 5)"
  # Every module on the first ORACLE_N test examples, with its loss on the
  # 5 examples: best single = lowest loss; oracle = best accuracy there.
  head -n "$ORACLE_N" "$test" >"$w/oracle.jsonl"
  picks=$("$LORAHUB" eval --model "$base" --device "$DEVICE" --data "$w/oracle.jsonl" \
    --task "$task" --json "${all_adapters[@]}" --each-adapter --loss-examples "$ex" | $py -c "
import json, sys
r = [json.loads(l) for l in sys.stdin]
print(min(r, key=lambda d: d['loss'])['adapter'])
print(max(r, key=lambda d: (d['accuracy'], -d['loss']))['adapter'])")
  best=$(echo "$picks" | sed -n 1p)
  oracle=$(echo "$picks" | sed -n 2p)
  l_cobyla=$(learn_to "$w/cobyla" "${all_adapters[@]}" --examples "$ex" \
    --optimizer cobyla --budget "$BUDGET")
  l_warm=$(learn_to "$w/cobyla_warm" "${all_adapters[@]}" --examples "$ex" \
    --optimizer cobyla --budget "$BUDGET" --warm-start)
  l_cmaes=$(learn_to "$w/cmaes" "${all_adapters[@]}" --examples "$ex" \
    --optimizer cmaes --budget "$CMAES_BUDGET" --seed "$seed")
  lines=$("${ev[@]}" --each-adapter --adapter "$best" --adapter "$oracle" \
    --adapter "$w/cobyla" --adapter "$w/cobyla_warm" --adapter "$w/cmaes")
  record_each heldout "$task" "$seed" "best_single oracle_single cobyla cobyla_warm cmaes" \
    "$lines" "{}" "{}" "$l_cobyla" "$l_warm" "$l_cmaes"
  echo "heldout $task seed $seed: $(( $(date +%s) - t0 )) s" >&2
}

# recovery_unit TASK SEED: the task's own module and 9 others, composed on 5
# examples, against the own module alone.
recovery_unit() {
  local task=$1 seed=$2 t0 data test ex l_cobyla l_warm lines m
  local w="$work/recovery-$task-$seed"
  local unit_log="$w.jsonl"
  mkdir -p "$w"
  t0=$(date +%s)
  data="$work/data$seed"
  test="$data/pool_test/$task.jsonl"
  ex="$w/recovery_examples.jsonl"
  $py - "$data/pool/$task.jsonl" "$test" "$ex" <<'PY'
import json, sys
test = {json.loads(l)["input"] for l in open(sys.argv[2]) if l.strip()}
few = [l for l in open(sys.argv[1]) if l.strip() and json.loads(l)["input"] not in test][:5]
assert len(few) == 5, "fewer than 5 examples outside the test set"
open(sys.argv[3], "w").writelines(few)
PY
  # The own module and 9 others, in an order drawn by the seed.
  local chosen adapters=()
  mapfile -t chosen < <($py -c "
import random, sys
task, seed, pool = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rng = random.Random('%s/%d' % (task, seed))
chosen = rng.sample([m for m in pool if m != task], 9) + [task]
rng.shuffle(chosen)
print('\n'.join(chosen))" "$task" "$seed" "${pool[@]}")
  for m in "${chosen[@]}"; do adapters+=(--adapter "$mods/$m"); done
  l_cobyla=$(learn_to "$w/cobyla" "${adapters[@]}" --examples "$ex" \
    --optimizer cobyla --budget "$BUDGET")
  l_warm=$(learn_to "$w/cobyla_warm" "${adapters[@]}" --examples "$ex" \
    --optimizer cobyla --budget "$BUDGET" --warm-start)
  lines=$("$LORAHUB" eval --model "$base" --device "$DEVICE" --data "$test" --task "$task" \
    --json --each-adapter \
    --adapter "$mods/$task" --adapter "$w/cobyla" --adapter "$w/cobyla_warm")
  record_each recovery "$task" "$seed" "own_module cobyla cobyla_warm" "$lines" \
    "{}" "$l_cobyla" "$l_warm"
  echo "recovery $task seed $seed: $(( $(date +%s) - t0 )) s" >&2
}

# own_unit MODULE SEED: the module and the base alone on the module's own
# pool_test examples.
own_unit() {
  local task=$1 seed=$2
  local unit_log="$work/own-$task-$seed.jsonl"
  local ev=("$LORAHUB" eval --model "$base" --device "$DEVICE" --task "$task" --json
    --data "$work/data$seed/pool_test/$task.jsonl")
  record own "$task" "$seed" base "$("${ev[@]}")"
  record own "$task" "$seed" own_module "$("${ev[@]}" --adapter "$mods/$task")"
}

for seed in $SEEDS; do
  "$MAKE_TASK_DATA" --out "$work/data$seed" --seed "$seed" --train-per-task 20 \
    --test-per-task "$TEST_N" >/dev/null
done
# The units, in the order their lines go into the log; JOBS at once.
units=()
for seed in $SEEDS; do
  if [[ " $PARTS " == *" heldout "* ]]; then
    for task in $heldout; do units+=("heldout $task $seed"); done
  fi
  if [[ " $PARTS " == *" recovery "* ]]; then
    for task in $RECOVERY_TASKS; do units+=("recovery $task $seed"); done
  fi
done
if [[ " $PARTS " == *" own "* ]]; then
  first_seed=${SEEDS%% *}
  for m in "${pool[@]}"; do units+=("own $m $first_seed"); done
fi
running=0
failed=0
for u in "${units[@]}"; do
  read -r part task seed <<<"$u"
  "${part}_unit" "$task" "$seed" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || failed=$((failed + 1))
    running=$((running - 1))
  fi
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=$((failed + 1))
  running=$((running - 1))
done
[ "$failed" -eq 0 ] || { echo "study: $failed unit(s) failed" >&2; exit 1; }
for u in "${units[@]}"; do
  read -r part task seed <<<"$u"
  cat "$work/$part-$task-$seed.jsonl" >>"$log"
done
seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')

$py - "$log" "$OUT/study.md" "$seconds" "$SEEDS" "$TEST_N" "$BUDGET" "$CMAES_BUDGET" "$DEVICE" "$JOBS" <<'PY'
import collections, json, sys
log, md_path, seconds, seeds, test_n, budget, cmaes_budget, device, jobs = sys.argv[1:]
rows = [json.loads(l) for l in open(log)]
nseeds = len(seeds.split())
out = []
own_acc = collections.defaultdict(dict)
for r in rows:
    if r["part"] == "own":
        own_acc[r["task"]][r["method"]] = 100.0 * r["accuracy"]
if own_acc:
    seed = next(r["seed"] for r in rows if r["part"] == "own")
    out.append("### Each pool module on its own task: exact match (%%) on %s pool_test examples of seed %d (base alone in brackets)"
               % (test_n, seed))
    out.append("")
    out.append("| module | acc | base |")
    out.append("|---|---:|---:|")
    order = sorted(own_acc, key=lambda t: (-own_acc[t].get("own_module", 0), t))
    for t in order:
        out.append("| %s | %.0f | (%.0f) |" % (t, own_acc[t].get("own_module", float("nan")),
                                             own_acc[t].get("base", float("nan"))))
    accs = [own_acc[t]["own_module"] for t in own_acc if "own_module" in own_acc[t]]
    out.append("")
    out.append("- mean own-task accuracy %.1f over %d modules; %d at >= 50, %d below 20"
               % (sum(accs) / len(accs), len(accs), sum(a >= 50 for a in accs),
                  sum(a < 20 for a in accs)))
    out.append("")
methods = [("zero_shot", "zero-shot"), ("best_single", "best single (min loss on 5)"),
           ("oracle_single", "oracle single (best on test)"),
           ("cobyla", "LoraHub cobyla %s" % budget),
           ("cobyla_warm", "LoraHub cobyla %s warm-start" % budget),
           ("cmaes", "LoraHub cmaes %s" % cmaes_budget),
           ("icl_5shot", "5-shot ICL")]
acc = collections.defaultdict(list)
secs = collections.defaultdict(list)
for r in rows:
    if r["part"] == "heldout":
        acc[(r["task"], r["method"])].append(100.0 * r["accuracy"])
        if "learn_seconds" in r:
            secs[r["method"]].append(r["learn_seconds"])
tasks = sorted({r["task"] for r in rows if r["part"] == "heldout"})
if tasks:
    out.append("### Held-out tasks: exact-match accuracy (%%), mean over seeds %s, %s test examples each"
               % (seeds.replace(" ", ", "), test_n))
    out.append("")
    out.append("| task | " + " | ".join(m[1] for m in methods) + " |")
    out.append("|---|" + "---:|" * len(methods))
    means = {m: [] for m, _ in methods}
    for t in tasks:
        cells = []
        for m, _ in methods:
            v = acc[(t, m)]
            cells.append("%.1f" % (sum(v) / len(v)) if v else "-")
            if v:
                means[m].append(sum(v) / len(v))
        out.append("| %s | %s |" % (t, " | ".join(cells)))
    avg = {m: (sum(v) / len(v) if v else float("nan")) for m, v in means.items()}
    out.append("| **average** | %s |" % " | ".join("**%.1f**" % avg[m] for m, _ in methods))
    out.append("")
    for m in ("cobyla", "cobyla_warm", "cmaes"):
        if secs[m]:
            out.append("- %s: mean search time %.2f s over %d runs (learn's `seconds`, loading excluded)"
                       % (m, sum(secs[m]) / len(secs[m]), len(secs[m])))
    out.append("- composed minus zero-shot: cobyla %+.1f, cobyla warm-start %+.1f, cmaes %+.1f points"
               % (avg["cobyla"] - avg["zero_shot"], avg["cobyla_warm"] - avg["zero_shot"],
                  avg["cmaes"] - avg["zero_shot"]))
    out.append("")
rec = collections.defaultdict(dict)
for r in rows:
    if r["part"] == "recovery":
        rec[(r["task"], r["seed"])][r["method"]] = r
if rec:
    out.append("### Recovery: own module in a pool of 10, cobyla %s evaluations on 5 examples, %s pool_test examples"
               % (budget, test_n))
    out.append("")
    out.append("| task | seed | own module | cobyla | ratio | cobyla warm-start | ratio |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
ratios = {"cobyla": [], "cobyla_warm": []}
sums = collections.defaultdict(float)
for (t, s), d in sorted(rec.items()):
    own = d["own_module"]["accuracy"]
    sums["own"] += own
    cells = []
    for m in ("cobyla", "cobyla_warm"):
        comp = d[m]["accuracy"]
        sums[m] += comp
        if own > 0:
            ratios[m].append(comp / own)
        cells += ["%.1f" % (100 * comp), "%.2f" % (comp / own) if own > 0 else "n/a"]
    out.append("| %s | %d | %.1f | %s |" % (t, s, 100 * own, " | ".join(cells)))
mean = lambda v: sum(v) / len(v) if v else float("nan")
if rec:
    n = len(rec)
    out.append("| **average** | | %.1f | %.1f | **%.2f** | %.1f | **%.2f** |"
               % (100 * sums["own"] / n, 100 * sums["cobyla"] / n, mean(ratios["cobyla"]),
                  100 * sums["cobyla_warm"] / n, mean(ratios["cobyla_warm"])))
    out.append("")
    out.append("Average ratio composed / own (per task and seed; target >= 0.9): cobyla %.3f, "
               "cobyla warm-start %.3f. Ratio of the summed accuracies: %.3f and %.3f."
               % (mean(ratios["cobyla"]), mean(ratios["cobyla_warm"]),
                  sums["cobyla"] / sums["own"] if sums["own"] else float("nan"),
                  sums["cobyla_warm"] / sums["own"] if sums["own"] else float("nan")))
out.append("")
out.append("Study wall time: %s s on %s with %s units at once." % (seconds, device, jobs))
text = "\n".join(out) + "\n"
open(md_path, "w").write(text)
print(text)
PY
echo "wrote $log and $OUT/study.md" >&2
