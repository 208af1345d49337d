#!/usr/bin/env bash
# Run ON THE GPU HOST after deploy/gpu/build_and_test.sh (which leaves the binaries in
# .gpu/build). Issue 7's performance figures, the reference's and ours, on the same files:
#   bash deploy/gpu/bench.sh
# 1. writes the flan-t5-large-shaped fixture (20 modules r=16 on q,v, .bin) unless present
#    (python3 .gpu/bench/ref_lorahub.py fixture ... --size large --format bin, about 1 min);
# 2. the reference (transformers + peft + scipy, fp32): `learn` (load, COBYLA-40, eval ms)
#    and `generate` (merged adapter, 64 prompts x 32 tokens; 1 prompt x 1 token for TTFT);
# 3. `lorahub bench --device cuda:0` in fp32 and bf16 (one JSON object each);
# 4. a markdown table: figure | reference | ours fp32 | ours bf16 | ratio | target
#    (ratio = how many times better ours fp32 is than the reference: ref/ours for times,
#    ours/ref for rates).
# Writes bench.log, ref.jsonl, ours_fp32.json, ours_bf16.json and table.md into
# $OUT/bench/ (or .gpu/logs/bench/). Budget: under 6 minutes on one H200 (each step has a
# timeout; a failed step leaves its cells empty, the table is still written).
# Environment: FIXTURE (default /tmp/lorahub_large), BUILD_DIR (default .gpu/build),
# REF (default .gpu/bench/ref_lorahub.py), REPS (default 30), CMAES_BUDGET (default 640).
set -uo pipefail
cd "$(dirname "$0")/../.."
lorahub=${BUILD_DIR:-$PWD/.gpu/build}/bin/server/lorahub
ref=${REF:-.gpu/bench/ref_lorahub.py}
for r in shared/bench/ref_lorahub.py ../shared/bench/ref_lorahub.py; do
  [ -f "$ref" ] || ref=$r
done
fx=${FIXTURE:-/tmp/lorahub_large}
dir=${OUT:-.gpu/logs}/bench
mkdir -p "$dir"
exec > >(tee -a "$dir/bench.log") 2>&1
export PYTHONUNBUFFERED=1
start=$SECONDS
[ -x "$lorahub" ] || { echo "no $lorahub: run deploy/gpu/build_and_test.sh first" >&2; exit 2; }
[ -f "$ref" ] || { echo "no reference script (carry ../shared/bench as .gpu/bench)" >&2; exit 2; }

if [ ! -f "$fx/examples.jsonl" ]; then
  echo "== fixture -> $fx"
  timeout 240 python3 "$ref" fixture --out "$fx" --size large --format bin 2>&1 | grep -v Warning | tail -1
  echo "fixture written in $((SECONDS - start)) s"
fi
adapters=()
for m in "$fx"/modules/m*; do adapters+=(--adapter "$m"); done

: > "$dir/ref.jsonl"
echo "== reference learn (COBYLA 40, fp32)  [$((SECONDS - start)) s]"
timeout 150 python3 "$ref" learn --fixture "$fx" 2>/dev/null | tail -1 | sed 's/^/{"step": "learn", "out": /; s/$/}/' | tee -a "$dir/ref.jsonl"
echo "== reference generate (merged, 64 x 32)  [$((SECONDS - start)) s]"
timeout 90 python3 "$ref" generate --fixture "$fx" --batch 64 --new-tokens 32 --fixed-length 2>/dev/null | tail -1 | sed 's/^/{"step": "gen64", "out": /; s/$/}/' | tee -a "$dir/ref.jsonl"
echo "== reference generate (merged, 1 x 1: TTFT)  [$((SECONDS - start)) s]"
timeout 60 python3 "$ref" generate --fixture "$fx" --batch 1 --new-tokens 1 2>/dev/null | tail -1 | sed 's/^/{"step": "ttft", "out": /; s/$/}/' | tee -a "$dir/ref.jsonl"

for dtype in fp32 bf16; do
  echo "== lorahub bench $dtype  [$((SECONDS - start)) s]"
  timeout 120 "$lorahub" bench --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
    --prompts "$fx/prompts.jsonl" --device cuda:0 --dtype $dtype --reps "${REPS:-30}" \
    --cmaes-budget "${CMAES_BUDGET:-640}" --population 64 --gen-batch 64 --gen-tokens 32 --json \
    > "$dir/ours_$dtype.json"
  echo "exit $?"; cat "$dir/ours_$dtype.json"
done

echo "== table  [$((SECONDS - start)) s]"
python3 - "$dir" <<'PY' | tee "$dir/table.md"
import json, math, os, sys
d = sys.argv[1]
ref = {}
for line in open(os.path.join(d, "ref.jsonl")):
    try:
        j = json.loads(line); ref[j["step"]] = j["out"]
    except Exception:
        pass
def load(name):
    try:
        return json.loads(open(os.path.join(d, name)).read().strip().splitlines()[-1])
    except Exception:
        return {}
f32, b16 = load("ours_fp32.json"), load("ours_bf16.json")
def get(j, *path):
    for p in path:
        if not isinstance(j, dict) or p not in j:
            return None
        j = j[p]
    return j
learn, g64, ttft = ref.get("learn", {}), ref.get("gen64", {}), ref.get("ttft", {})
ref_eval = get(learn, "eval_ms_median")
rows = [  # figure, reference, ours path, lower is better, target
    ("cold start (s)", get(learn, "load_s"), ("cold_start_seconds",), True, "<= 3"),
    ("compose-to-ready (s)", None, ("compose_seconds",), True, "<= 0.001"),
    ("objective eval, median (ms)", ref_eval, ("eval_ms_median",), True, "<= 2"),
    ("objective eval, p90 (ms)", None, ("eval_ms_p90",), True, "-"),
    ("COBYLA 40 evaluations (s)", get(learn, "learn_s"), ("cobyla40_seconds",), True, "-"),
    ("CMA-ES candidates/s (pop 64; ref: sequential 1000/eval)",
     1000.0 / ref_eval if ref_eval else None, ("cmaes_candidates_per_second",), False, ">= 2000"),
    ("generate 64x32, base (tok/s)", None, ("generation", "base", "tokens_per_second"), False, "-"),
    ("generate 64x32, merged adapter (tok/s)", get(g64, "tokens_per_s"),
     ("generation", "merged", "tokens_per_second"), False, ">= reference"),
    ("generate 64x32, 64 per-row adapters (tok/s; ref: its merged adapter)",
     get(g64, "tokens_per_s"), ("generation", "per_row", "tokens_per_second"), False, ">= 40000"),
    ("TTFT, 1 request (ms)", 1000 * ttft["seconds"] if ttft.get("seconds") else None,
     ("generation", "ttft_ms"), True, "<= 10"),
]
def fmt(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return "%.4g" % v
print("| figure | reference | ours fp32 | ours bf16 | ratio | target |")
print("|---|---|---|---|---|---|")
for name, r, path, lower, target in rows:
    a, b = get(f32, *path), get(b16, *path)
    ratio = None
    if r and a:
        ratio = r / a if lower else a / r
    print("| %s | %s | %s | %s | %s | %s |" % (name, fmt(r), fmt(a), fmt(b),
                                           (fmt(ratio) + "x") if ratio else "n/a", target))
print()
for tag, j in (("fp32", f32), ("bf16", b16)):
    print("- ours %s: engine = %s; cuda_graphs_compiled = %s; fast vs eager loss rel. diff %s; "
          "objective setup (runner build + capture) %s s; cobyla best %s; cmaes best %s" % (
              tag, j.get("engine"), j.get("cuda_graphs_compiled"),
              fmt(j.get("fast_vs_eager_rel_diff")), fmt(j.get("objective_setup_seconds")),
              fmt(j.get("cobyla_best_score")), fmt(j.get("cmaes_best_score"))))
print("- reference COBYLA best score %s, peak GPU %s GiB" % (fmt(get(learn, "best_score")),
                                                           get(learn, "peak_gpu_gib")))
PY
echo "== done in $((SECONDS - start)) s; files in $dir"
