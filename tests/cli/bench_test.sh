#!/usr/bin/env bash
# `lorahub bench` on the CPU on a reference fixture (small repetitions): one JSON object with
# every figure, each positive and finite (--gen-sweep's list too); bad flags are refused with
# exit code 2.
set -euo pipefail
lorahub=$1
py=/usr/bin/python3
fx=tests/testdata/ref_tiny/tiny_s0
adapters=()
for m in "$fx"/modules/m*; do adapters+=(--adapter "$m"); done
out=$TEST_TMPDIR/bench.json
"$lorahub" bench --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
  --prompts "$fx/prompts.jsonl" --reps 3 --warmup 1 --population 4 --cmaes-budget 8 \
  --cmaes-seed 5 --gen-batch 3 --gen-tokens 3 --gen-sweep 1,3 --json > "$out"
"$py" - "$out" <<'PY'
import json, math, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
assert len(lines) == 1, "want one JSON line, got %d" % len(lines)
j = json.loads(lines[0])
def positive(path, v):
    assert isinstance(v, (int, float)) and not isinstance(v, bool), (path, v)
    assert math.isfinite(v) and v > 0, (path, v)
for k in ["cold_start_seconds", "compose_seconds", "compose_seconds_max", "eval_ms_median",
          "eval_ms_p90", "cobyla40_seconds", "cmaes_candidates_per_second"]:
    positive(k, j[k])
assert j["eval_ms_p90"] >= j["eval_ms_median"], j
positive("cmaes_objective_seconds", j["cmaes_objective_seconds"])
assert j["cmaes_objective_seconds"] <= j["cmaes_seconds"], j
assert abs(j["cmaes_candidates_per_second"] * j["cmaes_seconds"] - j["cmaes_evaluations"]) < 1e-6 * j["cmaes_evaluations"], j
assert j["compose_seconds_max"] >= j["compose_seconds"], j
assert j["eval_reps"] == 3 and j["cmaes_evaluations"] == 8 and j["modules"] == 20, j
assert j["cmaes_seed"] == 5, j
# The fixed-seed population's losses, one per candidate (distinct random weights).
ps = j["population_scores"]
assert len(ps) == 4, ps
for i, v in enumerate(ps):
    positive("population_scores[%d]" % i, v)
assert len(set(ps)) == 4, ps
g = j["generation"]
for kind in ["base", "merged", "per_row"]:
    positive(kind, g[kind]["tokens_per_second"])
    assert 3 <= g[kind]["tokens"] <= 9, g[kind]
    assert len(g[kind]["output_digest"]) == 16 and int(g[kind]["output_digest"], 16) >= 0, g[kind]
    # The median of --gen-reps (default 3) timed calls, each reported.
    runs = g[kind]["runs_seconds"]
    assert len(runs) == 3 and all(r > 0 for r in runs), g[kind]
    assert g[kind]["seconds"] == sorted(runs)[1], g[kind]
    assert abs(g[kind]["tokens_per_second"] * g[kind]["seconds"] - g[kind]["tokens"]) < 1e-9 * g[kind]["tokens"], g[kind]
    # The first step's tokens come within a call: at most its slowest run.
    positive(kind + ".first_token_ms", g[kind]["first_token_ms"])
    assert g[kind]["first_token_ms"] <= 1e3 * max(runs), g[kind]
positive("ttft_ms", g["ttft_ms"])
# One ratio per --gen-reps pair (base, then per row), each above -1 (both calls took time),
# and their median.
pc = g["per_row_cost_paired"]
assert len(pc["ratios"]) == 3 and all(r > -1 for r in pc["ratios"]), pc
assert pc["median"] == sorted(pc["ratios"])[1], pc
# --gen-sweep 1,3: one entry per batch size, in order, every rate positive.
sw = j["generation_sweep"]
assert [p["batch"] for p in sw] == [1, 3], sw
for p in sw:
    assert set(p) == {"batch", "base_tokens_per_second", "shared_adapter_tokens_per_second",
                      "distinct_adapters_tokens_per_second"}, p
    for k in ["base_tokens_per_second", "shared_adapter_tokens_per_second",
              "distinct_adapters_tokens_per_second"]:
        positive("generation_sweep[%d].%s" % (p["batch"], k), p[k])
assert 0 <= j["fast_vs_eager_rel_diff"] < 1e-6, j["fast_vs_eager_rel_diff"]
assert j["device"] == "cpu" and j["cuda_graphs_compiled"] is False, j
assert j["fused_gemms"] is True, j
assert j["engine"] == "runner (eager: not a CUDA device)", j["engine"]
print("bench JSON ok:", {k: j[k] for k in ["eval_ms_median", "cmaes_candidates_per_second", "cmaes_seconds", "cmaes_objective_seconds"]})
PY
# --profile-out: the same JSON line plus "profile" (CPU operators here: this LibTorch has
# no Kineto, so no trace, and a note says so), the tables on stderr.
"$lorahub" bench --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
  --prompts "$fx/prompts.jsonl" --reps 1 --warmup 1 --population 4 --cmaes-budget 4 \
  --gen-batch 2 --gen-tokens 2 --profile-out "$TEST_TMPDIR/prof.json" --json \
  > "$TEST_TMPDIR/bench_prof.json" 2> "$TEST_TMPDIR/prof.err"
"$py" - "$TEST_TMPDIR/bench_prof.json" "$TEST_TMPDIR/prof.err" "$out" <<'PY'
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
assert len(lines) == 1, "want one JSON line, got %d" % len(lines)
# The same population's losses as the first run's, though this one drew fewer candidates
# before it (--reps 1, not 3) and CMA-ES ran from another seed after.
first = json.loads(open(sys.argv[3]).read())
assert json.loads(lines[0])["population_scores"] == first["population_scores"], (
    json.loads(lines[0])["population_scores"], first["population_scores"])
p = json.loads(lines[0])["profile"]
err = open(sys.argv[2]).read()
for key, label in [("objective", "profile objective evaluation:"),
                   ("objective_population", "profile objective, one population (4 candidates):"),
                   ("generate_per_row", "profile generation per-row (2 rows):"),
                   ("generate_base", "profile generation, base model (2 rows):")]:
    s = p[key]
    assert "error" not in s, s
    assert s["device_events"] is False and s["events"] > 0 and s["wall_us"] > 0, s
    assert s["top"] and all(len(r) == 3 and r[1] > 0 for r in s["top"]), s["top"]
    assert s["trace"] or s["note"], s
    assert label in err, err
assert any(r[0] == "aten::mm" or r[0] == "aten::addmm" for r in p["objective"]["top"]), p
assert p["generate_per_row"]["decode_steps"] >= 1, p
assert p["objective_population"]["candidates"] == 4, p
# Four candidates do more work than one: more operator events.
assert p["objective_population"]["events"] > p["objective"]["events"], p
print("profile ok:", p["objective"]["events"], "CPU op events per evaluation")
PY
# Bad input: exit code 2 and a one-line message.
set +e
"$lorahub" bench --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
  --reps 0 2> "$TEST_TMPDIR/err"
rc=$?
set -e
[ "$rc" = 2 ] || { echo "want exit 2 for --reps 0, got $rc"; exit 1; }
grep -q -- "--reps must be in" "$TEST_TMPDIR/err" || { cat "$TEST_TMPDIR/err"; exit 1; }
set +e
"$lorahub" bench --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
  --gen-reps 0 2> "$TEST_TMPDIR/err"
rc=$?
set -e
[ "$rc" = 2 ] || { echo "want exit 2 for --gen-reps 0, got $rc"; exit 1; }
grep -q -- "--gen-reps must be in" "$TEST_TMPDIR/err" || { cat "$TEST_TMPDIR/err"; exit 1; }
set +e
"$lorahub" bench --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
  --cmaes-seed -1 2> "$TEST_TMPDIR/err"
rc=$?
set -e
[ "$rc" = 2 ] || { echo "want exit 2 for --cmaes-seed -1, got $rc"; exit 1; }
grep -q -- "--cmaes-seed must be in" "$TEST_TMPDIR/err" || { cat "$TEST_TMPDIR/err"; exit 1; }
# --gen-sweep: positive integers only, checked before anything loads.
for sweep in 0 x 1,,2 5000 ""; do
  set +e
  "$lorahub" bench --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
    --gen-sweep "$sweep" 2> "$TEST_TMPDIR/err"
  rc=$?
  set -e
  [ "$rc" = 2 ] || { echo "want exit 2 for --gen-sweep '$sweep', got $rc"; exit 1; }
  grep -q -- "--gen-sweep" "$TEST_TMPDIR/err" || { cat "$TEST_TMPDIR/err"; exit 1; }
done
"$lorahub" bench --model "$fx/base" --examples "$fx/examples.jsonl" 2> "$TEST_TMPDIR/err" && exit 1
grep -q -- "--adapter" "$TEST_TMPDIR/err" || { cat "$TEST_TMPDIR/err"; exit 1; }
echo PASS
