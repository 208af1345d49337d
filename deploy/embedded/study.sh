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
#       oracle single the pool module with the best test accuracy (reported
#                     apart: it needs the test labels)
#       cobyla        LoraHub, all 25 modules, COBYLA, BUDGET evaluations
#       cmaes         LoraHub, all 25 modules, CMA-ES, CMAES_BUDGET evaluations
#       5-shot ICL    the base with the 5 examples prepended (lorahub eval
#                     --shots: "<in>\n<out>\n\n" per example, then the input)
# (b) recovery: for RECOVERY_TASKS x SEEDS, a pool of the task's own module and
#     9 others (drawn by the seed), COBYLA BUDGET evaluations on 5 examples of
#     the task (make_task_data --seed s: the first 5 lines of pool/<task>.jsonl
#     whose input is not in the test set); composed accuracy vs the own
#     module's accuracy on TEST_N pool_test/<task>.jsonl examples of seed s
#     (fresh draws; the modules were trained on seed 1's pool/ files).
#
# Writes OUT/study.jsonl (one JSON line per measurement), OUT/study.md (the
# tables) and prints the tables and the wall time.
#
# Usage (repository root):  deploy/embedded/study.sh
# Environment: MODEL (models/default), OUT (/tmp/lorahub-study), SEEDS
#   ("1 2 3"), TEST_N (100), BUDGET (40), CMAES_BUDGET (80), RECOVERY_TASKS
#   (5 pool tasks, below), LORAHUB and MAKE_TASK_DATA (built with bazel if
#   unset).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:-$ROOT/models/default}"
OUT="${OUT:-/tmp/lorahub-study}"
SEEDS="${SEEDS:-1 2 3}"
TEST_N="${TEST_N:-100}"
BUDGET="${BUDGET:-40}"
CMAES_BUDGET="${CMAES_BUDGET:-80}"
# One pool task per family where the family has a module that learned its task
# (see docs/ACCURACY.md for every module's own accuracy), plus sort_digits.
RECOVERY_TASKS="${RECOVERY_TASKS:-sort_digits uppercase_word wrap_brackets greater_than_50 double_number}"
py=/usr/bin/python3

if [ -z "${LORAHUB:-}" ] || [ -z "${MAKE_TASK_DATA:-}" ]; then
  bazel build //server:lorahub //core/tasks:make_task_data >&2
  LORAHUB="${LORAHUB:-$ROOT/bazel-bin/server/lorahub}"
  MAKE_TASK_DATA="${MAKE_TASK_DATA:-$ROOT/bazel-bin/core/tasks/make_task_data}"
fi
base="$MODEL/base"
mods="$MODEL/modules"
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
print(json.dumps(d))" "$@" >>"$log"
}
all_adapters=()
for m in "${pool[@]}"; do all_adapters+=(--adapter "$mods/$m"); done
heldout=$("$MAKE_TASK_DATA" --list | awk '$1 == "heldout" { print $3 }')

for seed in $SEEDS; do
  data="$work/data$seed"
  "$MAKE_TASK_DATA" --out "$data" --seed "$seed" --train-per-task 20 \
    --test-per-task "$TEST_N" >/dev/null
  # (a) held-out tasks.
  for task in $heldout; do
    t0=$(date +%s)
    ex="$data/heldout/$task/examples5.jsonl"
    test="$data/heldout/$task/test.jsonl"
    ev=("$LORAHUB" eval --model "$base" --data "$test" --task "$task" --json)
    record heldout "$task" "$seed" zero_shot "$("${ev[@]}")"
    record heldout "$task" "$seed" icl_5shot "$("${ev[@]}" --shots "$ex" --k 5)"
    singles=$("${ev[@]}" "${all_adapters[@]}" --each-adapter --loss-examples "$ex")
    # best single by loss on the 5 examples; oracle by test accuracy.
    record heldout "$task" "$seed" best_single "$(echo "$singles" | $py -c "
import json, sys
r = [json.loads(l) for l in sys.stdin]
print(json.dumps(min(r, key=lambda d: d['loss'])))")"
    record heldout "$task" "$seed" oracle_single "$(echo "$singles" | $py -c "
import json, sys
r = [json.loads(l) for l in sys.stdin]
print(json.dumps(max(r, key=lambda d: d['accuracy'])))")"
    for spec in "cobyla $BUDGET" "cmaes $CMAES_BUDGET"; do
      set -- $spec
      learned=$("$LORAHUB" learn --model "$base" "${all_adapters[@]}" --examples "$ex" \
        --optimizer "$1" --budget "$2" --seed "$seed" --out "$work/composed" --json | tail -1)
      acc=$("${ev[@]}" --adapter "$work/composed")
      record heldout "$task" "$seed" "$1" "$($py -c "
import json, sys
a, l = json.loads(sys.argv[1]), json.loads(sys.argv[2])
a.update(learn_seconds=l['seconds'], evaluations=l['evaluations'], best_loss=l['best_loss'],
         weights=l['weights'], adapter='composed')
a.pop('adapters', None)
print(json.dumps(a))" "$acc" "$learned")"
    done
    echo "heldout $task seed $seed: $(( $(date +%s) - t0 )) s" >&2
  done
  # (b) recovery.
  for task in $RECOVERY_TASKS; do
    t0=$(date +%s)
    test="$data/pool_test/$task.jsonl"
    ex="$work/recovery_examples.jsonl"
    $py - "$data/pool/$task.jsonl" "$test" "$ex" <<'PY'
import json, sys
test = {json.loads(l)["input"] for l in open(sys.argv[2]) if l.strip()}
few = [l for l in open(sys.argv[1]) if l.strip() and json.loads(l)["input"] not in test][:5]
assert len(few) == 5, "fewer than 5 examples outside the test set"
open(sys.argv[3], "w").writelines(few)
PY
    # The own module and 9 others, in an order drawn by the seed.
    mapfile -t chosen < <($py -c "
import random, sys
task, seed, pool = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rng = random.Random('%s/%d' % (task, seed))
chosen = rng.sample([m for m in pool if m != task], 9) + [task]
rng.shuffle(chosen)
print('\n'.join(chosen))" "$task" "$seed" "${pool[@]}")
    adapters=()
    for m in "${chosen[@]}"; do adapters+=(--adapter "$mods/$m"); done
    ev=("$LORAHUB" eval --model "$base" --data "$test" --task "$task" --json)
    own=$("${ev[@]}" --adapter "$mods/$task")
    learned=$("$LORAHUB" learn --model "$base" "${adapters[@]}" --examples "$ex" \
      --optimizer cobyla --budget "$BUDGET" --seed "$seed" --out "$work/composed" --json | tail -1)
    comp=$("${ev[@]}" --adapter "$work/composed")
    record recovery "$task" "$seed" own_module "$own"
    record recovery "$task" "$seed" cobyla "$($py -c "
import json, sys
a, l = json.loads(sys.argv[1]), json.loads(sys.argv[2])
a.update(learn_seconds=l['seconds'], evaluations=l['evaluations'], weights=l['weights'],
         pool=sys.argv[3].split(), adapter='composed')
a.pop('adapters', None)
print(json.dumps(a))" "$comp" "$learned" "${chosen[*]}")"
    echo "recovery $task seed $seed: $(( $(date +%s) - t0 )) s" >&2
  done
done
seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')

$py - "$log" "$OUT/study.md" "$seconds" "$SEEDS" "$TEST_N" "$BUDGET" "$CMAES_BUDGET" <<'PY'
import collections, json, sys
log, md_path, seconds, seeds, test_n, budget, cmaes_budget = sys.argv[1:]
rows = [json.loads(l) for l in open(log)]
nseeds = len(seeds.split())
out = []
methods = [("zero_shot", "zero-shot"), ("best_single", "best single (min loss on 5)"),
           ("oracle_single", "oracle single (best on test)"),
           ("cobyla", "LoraHub cobyla %s" % budget), ("cmaes", "LoraHub cmaes %s" % cmaes_budget),
           ("icl_5shot", "5-shot ICL")]
acc = collections.defaultdict(list)
secs = collections.defaultdict(list)
for r in rows:
    if r["part"] == "heldout":
        acc[(r["task"], r["method"])].append(100.0 * r["accuracy"])
        if "learn_seconds" in r:
            secs[r["method"]].append(r["learn_seconds"])
tasks = sorted({r["task"] for r in rows if r["part"] == "heldout"})
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
for m in ("cobyla", "cmaes"):
    if secs[m]:
        out.append("- %s: mean search time %.2f s over %d runs (learn's `seconds`, loading excluded)"
                   % (m, sum(secs[m]) / len(secs[m]), len(secs[m])))
out.append("- composed (cobyla) minus zero-shot: %+.1f points; composed (cmaes) minus zero-shot: %+.1f points"
           % (avg["cobyla"] - avg["zero_shot"], avg["cmaes"] - avg["zero_shot"]))
out.append("")
rec = collections.defaultdict(dict)
for r in rows:
    if r["part"] == "recovery":
        rec[(r["task"], r["seed"])][r["method"]] = r
out.append("### Recovery: own module in a pool of 10, cobyla %s evaluations on 5 examples, %s pool_test examples"
           % (budget, test_n))
out.append("")
out.append("| task | seed | own module | composed | ratio |")
out.append("|---|---:|---:|---:|---:|")
ratios = []
own_sum = comp_sum = 0
for (t, s), d in sorted(rec.items()):
    own, comp = d["own_module"]["accuracy"], d["cobyla"]["accuracy"]
    own_sum += own
    comp_sum += comp
    ratio = comp / own if own > 0 else None
    if ratio is not None:
        ratios.append(ratio)
    out.append("| %s | %d | %.1f | %.1f | %s |" % (t, s, 100 * own, 100 * comp,
                                                 "%.2f" % ratio if ratio is not None else "n/a"))
if ratios:
    out.append("| **average** | | %.1f | %.1f | **%.2f** |" % (100 * own_sum / len(rec), 100 * comp_sum / len(rec),
                                                            sum(ratios) / len(ratios)))
out.append("")
out.append("Average ratio (composed / own, per task and seed): %.3f (target >= 0.9); ratio of the summed accuracies: %.3f."
           % (sum(ratios) / len(ratios) if ratios else float("nan"), comp_sum / own_sum if own_sum else float("nan")))
out.append("")
out.append("Study wall time: %s s on this machine (CPU)." % seconds)
text = "\n".join(out) + "\n"
open(md_path, "w").write(text)
print(text)
PY
echo "wrote $log and $OUT/study.md" >&2
