#!/usr/bin/env bash
# `lorahub eval` end to end on the committed embedded default (models/default):
# its accuracy must equal a count this test makes itself from `lorahub
# generate`'s texts (own normalisation: trim, collapse whitespace, lowercase
# unless the task is about case), for zero-shot, a module, k-shot prompts
# built here in the documented format, and --each-adapter; its loss must equal
# `lorahub score`'s; bad input exits 2 with one line on stderr; --plan runs
# several evaluations in one process with the same results as separate runs.
#   eval_cli_test.sh LORAHUB MAKE_TASK_DATA
set -uo pipefail
lorahub=$1
make_task_data=$2
py=/usr/bin/python3
model=models/default/base
mods=models/default/modules
fail() { echo "FAIL: $*" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$make_task_data" --out "$tmp/data" --seed 7 --train-per-task 1 --test-per-task 24 \
  >/dev/null || fail "make_task_data"
test_file=$tmp/data/pool_test/sort_digits.jsonl
[ "$(wc -l <"$test_file")" = 24 ] || fail "want 24 test lines"

# count_matches GENERATE_JSONL DATA_JSONL CASE(0|1) -> number of matches.
count_matches() {
  $py - "$1" "$2" "$3" <<'PY'
import json, sys
gen = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ref = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
case = sys.argv[3] == "1"
assert len(gen) == len(ref), (len(gen), len(ref))
def norm(s):
    s = " ".join(s.split())
    return s if case else s.lower()
print(sum(norm(g["text"]) == norm(r["output"]) for g, r in zip(gen, ref)))
PY
}
# same_texts GENERATE_JSONL PREDICTIONS_JSONL: eval predicted what generate did.
same_texts() {
  $py - "$1" "$2" <<'PY'
import json, sys
gen = [json.loads(l)["text"] for l in open(sys.argv[1]) if l.strip()]
pred = [json.loads(l)["prediction"] for l in open(sys.argv[2]) if l.strip()]
sys.exit(0 if gen == pred else 1)
PY
}
field() { $py -c "import json,sys; print(json.loads(sys.stdin.readlines()[$2])['$1'])"; }

# 1. Zero-shot, base and one module: eval's count == our count of generate's texts.
for adapter in "" "--adapter $mods/sort_digits" "--adapter $mods/add"; do
  # shellcheck disable=SC2086
  "$lorahub" generate --model "$model" $adapter --input-file "$test_file" \
    --batch-size 8 --json >"$tmp/gen.jsonl" || fail "generate $adapter"
  want=$(count_matches "$tmp/gen.jsonl" "$test_file" 0)
  # shellcheck disable=SC2086
  out=$("$lorahub" eval --model "$model" $adapter --data "$test_file" \
    --task sort_digits --batch-size 8 --predictions "$tmp/pred.jsonl" --json) \
    || fail "eval $adapter"
  same_texts "$tmp/gen.jsonl" "$tmp/pred.jsonl" || fail "eval '$adapter': other texts than generate"
  got=$(echo "$out" | field correct 0)
  [ "$got" = "$want" ] || fail "eval '$adapter': correct $got, counted $want"
  $py -c "
import json, sys
d = json.loads(sys.argv[1])
assert d['examples'] == 24 and d['task'] == 'sort_digits' and d['shots'] == 0, d
assert abs(d['accuracy'] - d['correct'] / 24) < 1e-12, d
" "$out" || fail "eval '$adapter': bad fields: $out"
  echo "ok: zero-shot '$adapter': $got/24"
  [ -n "$adapter" ] || base_sort=$got
  [ "$adapter" = "--adapter $mods/sort_digits" ] && module_sort=$got
done
# The module must be applied (the brief measured 21/30 vs 0/30).
[ "$module_sort" -gt "$base_sort" ] || fail "sort_digits module ($module_sort) not above base ($base_sort)"

# 2. Case rule: references = the reverse_word module's own outputs (letters),
# upper-cased. Under a case-insensitive task every one matches; without --task
# (case compared) only those whose text has no lower-case letter.
"$lorahub" generate --model "$model" --adapter "$mods/reverse_word" \
  --input-file "$tmp/data/pool_test/reverse_word.jsonl" --batch-size 8 --json \
  >"$tmp/gen.jsonl" || fail "generate for case"
$py - "$tmp/gen.jsonl" "$tmp/upper.jsonl" <<'PY'
import json, sys
with open(sys.argv[2], "w") as f:
    for l in open(sys.argv[1]):
        g = json.loads(l)
        f.write(json.dumps({"input": g["input"], "output": g["text"].upper() + "  "}) + "\n")
PY
want_ci=$(count_matches "$tmp/gen.jsonl" "$tmp/upper.jsonl" 0)
want_cs=$(count_matches "$tmp/gen.jsonl" "$tmp/upper.jsonl" 1)
[ "$want_ci" = 24 ] || fail "case-insensitive count $want_ci"
got=$("$lorahub" eval --model "$model" --data "$tmp/upper.jsonl" --task reverse_word \
  --adapter "$mods/reverse_word" --batch-size 8 --json | field correct 0)
[ "$got" = "$want_ci" ] || fail "case-insensitive: $got vs $want_ci"
got=$("$lorahub" eval --model "$model" --data "$tmp/upper.jsonl" --batch-size 8 --json \
  --adapter "$mods/reverse_word" | field correct 0)
[ "$got" = "$want_cs" ] || fail "no --task (case compared): $got vs $want_cs"
got=$("$lorahub" eval --model "$model" --data "$tmp/upper.jsonl" --task uppercase_word \
  --adapter "$mods/reverse_word" --batch-size 8 --json | field correct 0)
[ "$got" = "$want_cs" ] || fail "case-sensitive task: $got vs $want_cs"
[ "$want_cs" -lt "$want_ci" ] || fail "case rule: the fixture has no lower-case text"
echo "ok: case rule ($want_ci case-insensitive, $want_cs case-sensitive)"

# 3. k-shot: prompts built here in the documented format, generated, counted.
task=sort_digits_desc
shots=$tmp/data/heldout/$task/examples5.jsonl
held=$tmp/data/heldout/$task/test.jsonl
$py - "$shots" "$held" 3 "$tmp/icl.jsonl" <<'PY'
import json, sys
shots = [json.loads(l) for l in open(sys.argv[1]) if l.strip()][:int(sys.argv[3])]
demo = "".join("%s\n%s\n\n" % (s["input"], s["output"]) for s in shots)
with open(sys.argv[4], "w") as f:
    for l in open(sys.argv[2]):
        if l.strip():
            f.write(json.dumps({"input": demo + json.loads(l)["input"]}) + "\n")
PY
"$lorahub" generate --model "$model" --input-file "$tmp/icl.jsonl" --batch-size 8 \
  --json >"$tmp/gen.jsonl" || fail "generate k-shot"
want=$(count_matches "$tmp/gen.jsonl" "$held" 0)
out=$("$lorahub" eval --model "$model" --data "$held" --task "$task" --shots "$shots" \
  --k 3 --batch-size 8 --predictions "$tmp/pred.jsonl" --json) || fail "eval k-shot"
same_texts "$tmp/gen.jsonl" "$tmp/pred.jsonl" || fail "k-shot: other texts than generate on our prompts"
[ "$(echo "$out" | field correct 0)" = "$want" ] || fail "k-shot: $out vs $want"
[ "$(echo "$out" | field shots 0)" = 3 ] || fail "k-shot: shots field: $out"
echo "ok: 3-shot $want/24"

# 4. --each-adapter == separate runs; its loss == lorahub score's loss.
each=$("$lorahub" eval --model "$model" --adapter "$mods/sort_digits" --adapter "$mods/add" \
  --data "$test_file" --task sort_digits --batch-size 8 --loss-examples "$shots" \
  --each-adapter --json) || fail "each-adapter"
[ "$(echo "$each" | wc -l)" = 2 ] || fail "each-adapter: want 2 lines: $each"
[ "$(echo "$each" | field correct 0)" = "$module_sort" ] || fail "each-adapter line 0: $each"
i=0
for m in sort_digits add; do
  loss=$("$lorahub" score --model "$model" --adapter "$mods/$m" --examples "$shots" --json \
    | field loss 0) || fail "score $m"
  $py -c "
import json, sys
d = json.loads(sys.argv[1].splitlines()[$i])
assert d['adapter'].endswith('/$m'), d
assert abs(d['loss'] - float(sys.argv[2])) <= 1e-5 * max(1, abs(d['loss'])), (d['loss'], sys.argv[2])
" "$each" "$loss" || fail "each-adapter loss of $m"
  i=$((i + 1))
done
echo "ok: each-adapter and loss"

# --pick-min-loss: only the adapter with the lower loss (from the lines above).
want=$($py -c "
import json, sys
r = [json.loads(l) for l in sys.argv[1].splitlines()]
print(json.dumps(min(r, key=lambda d: d['loss'])))" "$each")
got=$("$lorahub" eval --model "$model" --adapter "$mods/add" --adapter "$mods/sort_digits" \
  --data "$test_file" --task sort_digits --batch-size 8 --loss-examples "$shots" \
  --pick-min-loss --json) || fail "pick-min-loss"
[ "$(echo "$got" | wc -l)" = 1 ] || fail "pick-min-loss: want 1 line: $got"
$py -c "
import json, sys
g, w = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert g['adapter'] == w['adapter'] and g['correct'] == w['correct'], (g, w)
assert abs(g['loss'] - w['loss']) <= 1e-5 * max(1, abs(w['loss'])), (g, w)
" "$got" "$want" || fail "pick-min-loss: $got vs $want"
echo "ok: pick-min-loss"

# 5. --predictions: one line per example, "correct" adds up to the count.
"$lorahub" eval --model "$model" --adapter "$mods/sort_digits" --data "$test_file" \
  --task sort_digits --batch-size 8 --predictions "$tmp/pred.jsonl" >/dev/null \
  || fail "predictions"
got=$($py -c "
import json, sys
p = [json.loads(l) for l in open(sys.argv[1])]
assert len(p) == 24
print(sum(x['correct'] for x in p))" "$tmp/pred.jsonl") || fail "predictions file"
[ "$got" = "$module_sort" ] || fail "predictions: $got correct vs $module_sort"

# 6. Bad input: exit 2 and one line on stderr.
printf '{"input": "a", "output": "b"}\nnot json\n' >"$tmp/bad.jsonl"
: >"$tmp/empty.jsonl"
expect_usage() {
  "$lorahub" eval "$@" >/dev/null 2>"$tmp/err"
  local rc=$?
  [ "$rc" = 2 ] || fail "eval $*: exit $rc, want 2"
  [ "$(wc -l <"$tmp/err")" = 1 ] || fail "eval $*: stderr not one line: $(cat "$tmp/err")"
}
expect_usage --model "$model"
expect_usage --model "$model" --data "$tmp/missing.jsonl"
expect_usage --model "$model" --data "$tmp/bad.jsonl"
grep -q "bad.jsonl:2" "$tmp/err" || fail "malformed line not named: $(cat "$tmp/err")"
expect_usage --model "$model" --data "$tmp/empty.jsonl"
expect_usage --model "$model" --data "$test_file" --task no_such_task
expect_usage --model "$model" --data "$test_file" --k 3
expect_usage --model "$model" --data "$test_file" --shots "$shots" --k 6
expect_usage --model "$model" --data "$test_file" --batch-size 0
expect_usage --model "$model" --data "$test_file" --each-adapter
expect_usage --model "$model" --data "$test_file" --adapter "$mods/add" --pick-min-loss
expect_usage --model "$model" --data "$test_file" --adapter "$mods/add" --weights 1,2
expect_usage --model "$model" --data "$test_file" --bogus 1
expect_usage --model /nonexistent --data "$test_file"
echo "ok: bad input"

# 7. --plan: several evaluations in one process print what each prints alone
# (less "seconds", plus "plan_line"), in plan order, blank lines skipped.
plan_runs=(
  "--data $test_file --task sort_digits --batch-size 8"
  "--data $test_file --task sort_digits --shots $shots --k 2"
  "--data $test_file --task sort_digits --adapter $mods/add --adapter $mods/sort_digits --pick-min-loss --loss-examples $shots"
  "--data $test_file --adapter $mods/add --adapter $mods/sort_digits --weights 0.5,1"
)
: >"$tmp/plan.jsonl"
: >"$tmp/alone.jsonl"
for r in "${plan_runs[@]}"; do
  # shellcheck disable=SC2086
  $py -c 'import json, sys; print(json.dumps(sys.argv[1:]))' $r >>"$tmp/plan.jsonl"
  echo >>"$tmp/plan.jsonl"
  # shellcheck disable=SC2086
  "$lorahub" eval --model "$model" $r --json >>"$tmp/alone.jsonl" || fail "eval $r"
done
"$lorahub" eval --model "$model" --plan "$tmp/plan.jsonl" --json >"$tmp/planned.jsonl" \
  || fail "eval --plan"
$py - "$tmp/alone.jsonl" "$tmp/planned.jsonl" <<'PY' || fail "--plan output differs from separate runs"
import json, sys
alone = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
planned = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
assert len(alone) == len(planned) == 4, (len(alone), len(planned))
for i, (a, p) in enumerate(zip(alone, planned)):
    assert p.pop("plan_line") == 2 * i + 1, p
    a.pop("seconds"); p.pop("seconds")
    assert a.keys() == p.keys(), (a, p)
    for k in a:
        if isinstance(a[k], float):
            assert abs(a[k] - p[k]) <= 1e-9 * max(1.0, abs(a[k])), (k, a, p)
        else:
            assert a[k] == p[k], (k, a, p)
PY
printf '["--data", "%s"]\n{"data": 1}\n' "$test_file" >"$tmp/badplan.jsonl"
expect_usage --model "$model" --plan "$tmp/badplan.jsonl"
grep -q "badplan.jsonl:2" "$tmp/err" || fail "bad plan line not named: $(cat "$tmp/err")"
printf '["--data", "%s", "--model", "x"]\n' "$test_file" >"$tmp/badplan.jsonl"
expect_usage --model "$model" --plan "$tmp/badplan.jsonl"
printf '["--data", "%s"]\n["--data", "%s"]\n' "$test_file" "$tmp/missing.jsonl" >"$tmp/badplan.jsonl"
expect_usage --model "$model" --plan "$tmp/badplan.jsonl"
grep -q "badplan.jsonl:2" "$tmp/err" || fail "failing plan line not named: $(cat "$tmp/err")"
: >"$tmp/badplan.jsonl"
expect_usage --model "$model" --plan "$tmp/badplan.jsonl"
expect_usage --model "$model" --plan "$tmp/plan.jsonl" --data "$test_file"
expect_usage --model "$model" --plan "$tmp/missing.jsonl"
echo "ok: --plan"
echo PASS
