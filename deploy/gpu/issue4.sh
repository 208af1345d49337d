#!/usr/bin/env bash
# Run ON THE GPU HOST after deploy/gpu/build_and_test.sh (binaries in .gpu/build, the
# reference carried as .gpu/bench/ref_lorahub.py). The measurements issue 4 still needs:
#   OUT=/some/dir bash deploy/gpu/issue4.sh
# 1. Reference parity, five fixtures (tiny seeds 0,1,2 and base seeds 0,1; tiny_s1 and base_s1
#    in .bin format, the others safetensors): `ref_lorahub.py learn` (COBYLA 40) and ours
#    `lorahub learn --optimizer cobyla --budget 40` (fp32, $DEVICE); `lorahub score` at our
#    returned weights must reproduce our best_score (1e-4 relative) and every weight must be in
#    [-1.5, 1.5]; pass = ours <= reference + 1e-4.
# 2. Equal wall-clock time: on the flan-t5-large-shaped fixture (reused from $LARGE if present)
#    and on both base fixtures: ours cobyla 40 (wall time T, in fp32 and bf16), then cmaes and
#    random with `--max-seconds T` (stop after the generation that crosses T), and the
#    reference's 40 evaluations; on the large fixture also cmaes at the reference's wall time.
# 3. PEFT: tests/learn/check_composition_vs_peft.py (lorahub/cat/ties/dare_linear against
#    add_weighted_adapter), tests/train/peft_parity.py on adapters exported by
#    `lorahub learn --out` (PEFT's loss on our adapter == ours), and greedy ids of
#    transformers+peft on that adapter == `lorahub generate`.
# Writes $OUT/issue4.md (the tables) and $OUT/issue4/{log.txt,parity.jsonl,walltime.jsonl,
# peft.txt} (raw JSON lines). Each step has a timeout; a failed step prints FAILED and the run
# goes on (its cells read n/a). About 4-5 minutes on one H200 (estimate: fixtures ~1.5 min,
# written in parallel in the background while part 3a and part 1's tiny rows run; part 1 base
# ~1 min; part 2 ~2 min; part 3b ~1 min), most of it fixture writing and Python start-up.
# A CPU dry run on tests/testdata/ref_tiny (DEVICE=cpu, fixtures symlinked into WORK, a stub
# REF printing their ref_learn.json) took 3 minutes here.
# Environment: OUT (default .gpu/logs), BUILD_DIR (default .gpu/build), LORAHUB (binary),
# REF (reference script), PY (python3), DEVICE (cuda:0), WORK (fixtures, /tmp/lorahub_issue4),
# LARGE (/tmp/lorahub_large), POP (cmaes/random population, 64), SKIP_REF_TIME (1: skip the
# rows at the reference's wall time), SKIP_PEFT (1: skip part 3's Python checks).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
repo=$PWD
lorahub=${LORAHUB:-${BUILD_DIR:-$repo/.gpu/build}/bin/server/lorahub}
ref=${REF:-.gpu/bench/ref_lorahub.py}
for r in shared/bench/ref_lorahub.py ../shared/bench/ref_lorahub.py; do
  [ -f "$ref" ] || ref=$r
done
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda:0}
WORK=${WORK:-/tmp/lorahub_issue4}
LARGE=${LARGE:-/tmp/lorahub_large}
POP=${POP:-64}
out=${OUT:-.gpu/logs}
raw=$out/issue4
mkdir -p "$raw" "$WORK"
exec > >(tee -a "$raw/log.txt") 2>&1
export PYTHONUNBUFFERED=1
start=$SECONDS
parity=$raw/parity.jsonl walltime=$raw/walltime.jsonl peft=$raw/peft.txt
: >"$parity"; : >"$walltime"; : >"$peft"
failures=()
failed() { echo "FAILED: $*"; failures+=("$*"); }
stamp() { echo "== $*  [$((SECONDS - start)) s]"; }
[ -x "$lorahub" ] || { echo "no $lorahub: run deploy/gpu/build_and_test.sh first" >&2; exit 2; }
[ -f "$ref" ] || failed "no reference script (carry ../shared/bench as .gpu/bench): reference columns will be n/a"

# rec FILE KEY=VALUE... -- OUTPUT: appends {"key": "value", ..., "out": <last JSON line of
# OUTPUT or null>} to FILE, so that a failed step still leaves a row.
rec() {
  local file=$1; shift
  "$PY" - "$@" >>"$file" <<'PY'
import json, sys
args = sys.argv[1:]
i = args.index("--")
row = dict(a.split("=", 1) for a in args[:i])
out = None
for line in reversed(args[i + 1].strip().splitlines()):
    try:
        out = json.loads(line)
        break
    except Exception:
        continue
row["out"] = out
if out is None:
    row["error"] = args[i + 1][-300:]
print(json.dumps(row))
PY
}
# last_json OUTPUT EXPR: evaluates EXPR over the last JSON line `j` of OUTPUT (empty on error).
last_json() {
  "$PY" - "$1" "$2" 2>/dev/null <<'PY'
import json, sys
for line in reversed(sys.argv[1].strip().splitlines()):
    try:
        j = json.loads(line)
        break
    except Exception:
        continue
else:
    sys.exit(1)
print(eval(sys.argv[2]))
PY
}
adapters_of() { local m; for m in "$1"/modules/m*; do printf -- '--adapter\n%s\n' "$m"; done; }

# ---- fixtures: all written in the background, in parallel; each is reused when present ----
declare -A fxdir fxpid
spec=("tiny_s0 tiny 0 safetensors" "tiny_s1 tiny 1 bin" "tiny_s2 tiny 2 safetensors"
      "base_s0 base 0 safetensors" "base_s1 base 1 bin" "large large 0 bin")
for s in "${spec[@]}"; do
  read -r name size seed fmt <<<"$s"
  dir=$WORK/$name
  [ "$name" = large ] && dir=$LARGE
  fxdir[$name]=$dir
  if [ -f "$dir/examples.jsonl" ]; then
    echo "fixture $name: reusing $dir"
    continue
  fi
  ( timeout 300 "$PY" "$ref" fixture --out "$dir" --size "$size" --seed "$seed" --format "$fmt" \
      >"$WORK/$name.fixture.log" 2>&1 ) &
  fxpid[$name]=$!
done
# need_fixture NAME: waits for its writer; 0 if the fixture is there.
need_fixture() {
  local name=$1
  if [ -n "${fxpid[$name]:-}" ]; then
    wait "${fxpid[$name]}" || failed "fixture $name: writer exit $? ($(tail -c 300 "$WORK/$name.fixture.log" | tr '\n' ' '))"
    unset "fxpid[$name]"
    echo "fixture $name written  [$((SECONDS - start)) s]"
  fi
  [ -f "${fxdir[$name]}/examples.jsonl" ] || { failed "fixture $name missing at ${fxdir[$name]}"; return 1; }
}

# ours_learn FIXTURE_DIR ARGS...: prints our JSON line (and errors on stderr).
ours_learn() {
  local fx=$1; shift
  local ad; mapfile -t ad < <(adapters_of "$fx")
  timeout 120 "$lorahub" learn --model "$fx/base" "${ad[@]}" --examples "$fx/examples.jsonl" \
    --device "$DEVICE" --json "$@"
}
ref_learn() { timeout 150 "$PY" "$ref" learn --fixture "$1" --budget 40 2>&1 | grep -v -i warn | tail -1; }

# ---- part 3a first (CPU only, needs no fixture): composition vs PEFT ----
if [ "${SKIP_PEFT:-0}" != 1 ]; then
  stamp "part 3a: composition methods vs PEFT add_weighted_adapter"
  o=$(timeout 120 "$PY" tests/learn/check_composition_vs_peft.py tests/learn/testdata/composition_cases.json 2>&1)
  rc=$?
  echo "$o" | tail -8
  { echo "### check_composition_vs_peft.py (exit $rc)"; echo "$o" | grep -v -i warn | tail -8; } >>"$peft"
  [ $rc = 0 ] || failed "check_composition_vs_peft.py exit $rc"
fi

# ---- part 1: five-fixture reference parity ----
for name in tiny_s0 tiny_s1 tiny_s2 base_s0 base_s1; do
  # The base rows' reference timings are reused in part 2: let every writer finish first.
  if [ "$name" = base_s0 ]; then for n in "${!fxpid[@]}"; do need_fixture "$n"; done; fi
  need_fixture "$name" || continue
  fx=${fxdir[$name]}
  stamp "part 1: $name reference learn"
  o=$(ref_learn "$fx"); echo "$o"
  rec "$parity" fixture="$name" impl=reference -- "$o"
  [ -n "$(last_json "$o" 'j["best_score"]')" ] || failed "part 1 $name: reference learn"
  rw=$(last_json "$o" '",".join(repr(x) for x in j["best_weights"])')
  stamp "part 1: $name ours cobyla 40 fp32"
  o=$(ours_learn "$fx" --optimizer cobyla --budget 40 --dtype fp32 2>&1); echo "$o" | tail -1
  rec "$parity" fixture="$name" impl=ours dtype=fp32 -- "$o"
  w=$(last_json "$o" '",".join(repr(x) for x in j["weights"])')
  if [ -z "$w" ]; then failed "part 1 $name: ours learn"; continue; fi
  mapfile -t ad < <(adapters_of "$fx")
  o=$(timeout 60 "$lorahub" score --model "$fx/base" "${ad[@]}" --weights "$w" \
      --examples "$fx/examples.jsonl" --device "$DEVICE" --dtype fp32 --json 2>&1); echo "$o" | tail -1
  rec "$parity" fixture="$name" impl=ours_score dtype=fp32 -- "$o"
  [ -n "$(last_json "$o" 'j["score"]')" ] || failed "part 1 $name: lorahub score"
  # Our engine at the reference's best weights: tells an engine gap from a search-path gap.
  if [ -n "$rw" ]; then
    o=$(timeout 60 "$lorahub" score --model "$fx/base" "${ad[@]}" --weights "$rw" \
        --examples "$fx/examples.jsonl" --device "$DEVICE" --dtype fp32 --json 2>&1); echo "$o" | tail -1
    rec "$parity" fixture="$name" impl=ours_at_ref_weights dtype=fp32 -- "$o"
  fi
done
for n in "${!fxpid[@]}"; do need_fixture "$n"; done

# ---- part 2: equal wall-clock time ----
for name in large base_s0 base_s1; do
  need_fixture "$name" || continue
  fx=${fxdir[$name]}
  if [ "$name" = large ]; then
    stamp "part 2: $name reference learn (COBYLA 40, fp32)"
    o=$(ref_learn "$fx"); echo "$o"
    rec "$walltime" fixture="$name" method=reference dtype=fp32 -- "$o"
    ref_s=$(last_json "$o" 'j["learn_s"]')
  else  # measured in part 1, after every fixture writer had finished
    ref_s=$("$PY" -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r["fixture"] == sys.argv[2] and r["impl"] == "reference" and r["out"]:
        print(r["out"]["learn_s"])' "$parity" "$name" 2>/dev/null)
  fi
  for dtype in fp32 bf16; do
    stamp "part 2: $name ours cobyla 40 $dtype"
    o=$(ours_learn "$fx" --optimizer cobyla --budget 40 --dtype $dtype 2>&1); echo "$o" | tail -1
    rec "$walltime" fixture="$name" method=cobyla dtype=$dtype -- "$o"
    t=$(last_json "$o" 'j["seconds"]')
    if [ -z "$t" ]; then failed "part 2 $name cobyla $dtype"; continue; fi
    limits=("ours_cobyla_time $t")
    if [ "$name" = large ] && [ "${SKIP_REF_TIME:-0}" != 1 ] && [ -n "$ref_s" ]; then
      limits+=("reference_time $ref_s")
    fi
    for l in "${limits[@]}"; do
      read -r tag secs <<<"$l"
      for m in cmaes random; do
        [ "$tag" = reference_time ] && [ $m = random ] && continue
        stamp "part 2: $name ours $m $dtype --max-seconds $secs ($tag)"
        o=$(ours_learn "$fx" --optimizer $m --budget 200000 --population "$POP" --max-seconds "$secs" \
            --dtype $dtype 2>&1); echo "$o" | tail -1
        rec "$walltime" fixture="$name" method=$m dtype=$dtype limit="$tag" -- "$o"
        [ -n "$(last_json "$o" 'j["best_score"]')" ] || failed "part 2 $name $m $dtype $tag"
      done
    done
  done
done

# ---- part 3b: PEFT loads our exported adapter: same loss, same greedy ids ----
if [ "${SKIP_PEFT:-0}" != 1 ]; then
  : >"$WORK/greedy_jobs.tsv"
  for s in "tiny_s0 lorahub" "tiny_s0 ties" "base_s0 lorahub"; do
    read -r name method <<<"$s"
    need_fixture "$name" || continue
    fx=${fxdir[$name]} exp=$WORK/export_${name}_$method
    stamp "part 3b: $name: learn --method $method --out, then PEFT"
    rm -rf "$exp"
    o=$(ours_learn "$fx" --optimizer cobyla --budget 20 --method "$method" --dtype fp32 --out "$exp" 2>&1)
    echo "$o" | tail -1
    best_loss=$(last_json "$o" 'repr(j["best_loss"])')
    if [ -z "$best_loss" ] || [ ! -f "$exp/adapter_config.json" ]; then
      failed "part 3b $name $method: export"; continue
    fi
    p=$(timeout 120 "$PY" tests/train/peft_parity.py --model "$fx/base" --adapter "$exp" \
        --examples "$fx/examples.jsonl" --lorahub "$lorahub" 2>&1)
    rc=$?
    echo "$p" | grep -v -i warn | tail -3
    peft_loss=$(echo "$p" | grep '"peft_loss"' | tail -1)
    vs_learn=$("$PY" -c 'import json,sys
j = json.loads(sys.argv[1]); b = float(sys.argv[2])
print("%.3g" % (abs(j["peft_loss"] - b) / max(abs(b), 1e-12)))' "$peft_loss" "$best_loss" 2>/dev/null)
    { echo "### peft_parity.py $name --method $method (exit $rc; learn best_loss $best_loss;" \
           "|peft_loss - best_loss| / best_loss = ${vs_learn:-n/a})"
      echo "$p" | grep '^{' | tail -2; } >>"$peft"
    [ $rc = 0 ] || failed "peft_parity.py $name $method exit $rc"
    # Greedy ids: `lorahub generate` now; transformers+peft below, one Python for all adapters.
    head -n 10 "$fx/prompts.jsonl" >"$WORK/prompts_$name.jsonl"
    timeout 60 "$lorahub" generate --model "$fx/base" --adapter "$exp" --input-file "$WORK/prompts_$name.jsonl" \
      --max-new-tokens 16 --device "$DEVICE" --dtype fp32 --json >"$exp.gen.jsonl" 2>"$exp.gen.err" \
      || failed "part 3b $name $method: lorahub generate exit $? ($(tail -c 200 "$exp.gen.err"))"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name/$method" "$fx/base" "$exp" "$WORK/prompts_$name.jsonl" \
      "$exp.gen.jsonl" >>"$WORK/greedy_jobs.tsv"
  done
  if [ -s "$WORK/greedy_jobs.tsv" ]; then
    stamp "part 3b: greedy ids, transformers+peft on our exported adapters vs lorahub generate"
    c=$(timeout 180 "$PY" - "$WORK/greedy_jobs.tsv" "$DEVICE" 2>&1 <<'PY'
import json, sys
import torch
from peft import PeftModel
from transformers import AutoTokenizer, T5ForConditionalGeneration
def norm(ids):
    ids = list(ids)
    if ids and ids[0] == 0:
        ids = ids[1:]  # decoder start
    return ids[:ids.index(1) + 1] if 1 in ids else [i for i in ids if i != 0]
dev = sys.argv[2]
for line in open(sys.argv[1]):
    label, base, exp, prompts, ours_path = line.rstrip("\n").split("\t")
    try:
        ours = [json.loads(l)["output_ids"] for l in open(ours_path) if l.startswith("{")]
        tok = AutoTokenizer.from_pretrained(base)
        model = T5ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, exp).to(dev).eval()
        texts = [json.loads(l)["input"] for l in open(prompts)]
        same = 0
        for i, t in enumerate(texts):
            enc = tok([t], return_tensors="pt").to(dev)
            with torch.no_grad():
                hf = model.generate(**enc, max_new_tokens=16, do_sample=False, num_beams=1)[0].tolist()
            same += i < len(ours) and norm(hf) == norm(ours[i])
        print(json.dumps({"adapter": label, "greedy_ids_equal": same, "prompts": len(texts),
                          "ours_rows": len(ours)}))
    except Exception as e:
        print(json.dumps({"adapter": label, "error": repr(e)[:300]}))
PY
)
    echo "$c" | tail -4
    { echo "### greedy ids, transformers+peft vs lorahub generate (10 prompts, 16 new tokens)"
      echo "$c" | grep -v -i warn | tail -4; } >>"$peft"
    echo "$c" | grep -q '"greedy_ids_equal"' || failed "part 3b: greedy-id check"
  fi
fi

# ---- tables ----
stamp "tables"
"$PY" - "$parity" "$walltime" "$peft" >"$out/issue4.md" <<'PY'
import json, math, sys
def rows(p):
    out = []
    for l in open(p):
        try:
            out.append(json.loads(l))
        except Exception:
            pass
    return out
def fmt(v, f="%.6g"):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f % v
def get(r, k):
    return r["out"].get(k) if r and isinstance(r.get("out"), dict) else None
par, wall = rows(sys.argv[1]), rows(sys.argv[2])
print("# Issue 4: GPU-host measurements\n")
print("## 1. Reference parity: COBYLA, budget 40, fp32 (pass: ours <= reference + 1e-4)\n")
print("| fixture | reference best | ours best | ours - reference | pass | lorahub score at our weights | rel. diff | reproduces (1e-4) | weights in bounds | ours at reference's weights |")
print("|---|---|---|---|---|---|---|---|---|---|")
npass = 0
names = []
for r in par:
    if r["fixture"] not in names:
        names.append(r["fixture"])
for n in names:
    pick = lambda impl: next((r for r in par if r["fixture"] == n and r["impl"] == impl), None)
    rb, ob, sc = get(pick("reference"), "best_score"), get(pick("ours"), "best_score"), get(pick("ours_score"), "score")
    diff = ob - rb if ob is not None and rb is not None else None
    ok = diff is not None and diff <= 1e-4
    npass += ok
    rel = abs(sc - ob) / max(abs(ob), 1e-12) if sc is not None and ob is not None else None
    w = get(pick("ours"), "weights")
    inb = None if w is None else all(-1.5 <= x <= 1.5 for x in w)
    print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (n, fmt(rb), fmt(ob), fmt(diff, "%+.3g"),
          "yes" if ok else "NO", fmt(sc), fmt(rel, "%.2g"),
          "n/a" if rel is None else ("yes" if rel <= 1e-4 else "NO"), "n/a" if inb is None else ("yes" if inb else "NO"),
          fmt(get(pick("ours_at_ref_weights"), "score"))))
print("\n%d of %d fixtures pass. The last column is our engine's score at the reference's best"
      " weights: close to the reference's best means the engines agree and any gap is the search path.\n"
      % (npass, len(names)))

print("## 2. Equal wall-clock time (cmaes/random: `--max-seconds` = our cobyla-40 time in the same dtype; population %s)\n" % (
    next((get(r, "population") for r in wall if r["method"] == "cmaes" and get(r, "population")), "?")))
def table(fx):
    print("| method | dtype | wall limit | wall s | evaluations | forward passes | best score |")
    print("|---|---|---|---|---|---|---|")
    for r in wall:
        if r["fixture"] != fx:
            continue
        if r["method"] == "reference":
            print("| reference (scipy COBYLA 40, one at a time) | fp32 | - | %s | %s | %s | %s |" % (
                fmt(get(r, "learn_s"), "%.3f"), fmt(get(r, "evaluations"), "%d"), fmt(get(r, "evaluations"), "%d"),
                fmt(get(r, "best_score"))))
            continue
        lim = {"ours_cobyla_time": "= ours cobyla", "reference_time": "= reference"}.get(r.get("limit"), "budget 40")
        print("| %s | %s | %s | %s | %s | %s | %s |" % (r["method"], r["dtype"], lim, fmt(get(r, "seconds"), "%.3f"),
              fmt(get(r, "evaluations"), "%d"), fmt(get(r, "forward_passes"), "%d"), fmt(get(r, "best_score"))))
print("### flan-t5-large-shaped fixture (20 modules r=16 on q,v; 5 examples)\n")
table("large")
print()
for fx in ("base_s0", "base_s1"):
    print("### %s\n" % fx)
    table(fx)
    print()
print("### Mean over the two base-size fixtures (base_s0, base_s1)\n")
print("| method | dtype | mean wall s | mean evaluations | mean best score | fixtures |")
print("|---|---|---|---|---|---|")
means = {}
keys = [("reference", "fp32"), ("cobyla", "fp32"), ("cmaes", "fp32"), ("random", "fp32"),
        ("cobyla", "bf16"), ("cmaes", "bf16"), ("random", "bf16")]
for m, d in keys:
    rs = [r for r in wall if r["fixture"] in ("base_s0", "base_s1") and r["method"] == m and r["dtype"] == d
          and r.get("limit", "ours_cobyla_time") == "ours_cobyla_time" and get(r, "best_score") is not None]
    if m == "reference":
        rs = [{"out": r["out"]} for r in par if r["fixture"] in ("base_s0", "base_s1") and r["impl"] == "reference"
              and get(r, "best_score") is not None]
        secs = [get(r, "learn_s") for r in rs]
    else:
        secs = [get(r, "seconds") for r in rs]
    if not rs:
        print("| %s | %s | n/a | n/a | n/a | 0 |" % (m, d))
        continue
    mean = lambda xs: sum(xs) / len(xs)
    means[(m, d)] = mean([get(r, "best_score") for r in rs])
    print("| %s | %s | %.3f | %.1f | %s | %d |" % (m, d, mean(secs), mean([get(r, "evaluations") for r in rs]),
          fmt(means[(m, d)]), len(rs)))
print()
for d in ("fp32", "bf16"):
    a, b = means.get(("cmaes", d)), means.get(("cobyla", d))
    if a is not None and b is not None:
        print("- %s: cmaes mean %s vs cobyla mean %s at equal wall time: cmaes %s" % (
            d, fmt(a), fmt(b), "LOWER (done-when met)" if a < b else "NOT lower"))
for d in ("fp32", "bf16"):
    c = {r["method"]: get(r, "best_score") for r in wall if r["fixture"] == "large" and r["dtype"] == d
         and r.get("limit", "ours_cobyla_time") == "ours_cobyla_time"}
    if c.get("cmaes") is not None and c.get("cobyla") is not None:
        print("- large %s: cmaes %s vs cobyla %s: cmaes %s" % (d, fmt(c["cmaes"]), fmt(c["cobyla"]),
              "lower" if c["cmaes"] < c["cobyla"] else "NOT lower"))
print("\n## 3. PEFT\n")
print("```")
print(open(sys.argv[3]).read().rstrip() or "(not run)")
print("```")
PY
[ $? = 0 ] || failed "table script"
cat "$out/issue4.md"
echo
if [ ${#failures[@]} -gt 0 ]; then
  echo "== ${#failures[@]} step(s) FAILED:"; printf '  - %s\n' "${failures[@]}"
else
  echo "== every step ran"
fi
echo "== done in $((SECONDS - start)) s; files: $out/issue4.md, $raw/"
