#!/usr/bin/env bash
# Run ON THE GPU HOST from the repository root: the performance loop of issue 7 in one call.
#  1. writes the flan-t5-large-shaped fixture (ref_lorahub.py fixture --size large --format bin)
#     in the background while deploy/gpu/build_and_test.sh builds (no tests there);
#  2. the engine's CUDA suites (tests/model/*, the learning objective's, the serving engine's in fp32
#     and in bf16) with
#     LORAHUB_TEST_DEVICE=cuda:0 -> ctest.log (and with TEST_ENV="ENV=V ..." set -> ctest_env.log),
#     and the tests that skipped on the device (the CUDA-only ones skip in CI, on the CPU);
#  3. `lorahub bench` in bf16 (the figures of docs/BENCHMARKS.md) with a Kineto profile
#     (profile*.json, the kernel tables in main.err), then same-build A/B runs;
#  4. (SWEEP=1) tokens/s against batch size (--gen-sweep) -> sweep.json; (PLOTS=1)
#     deploy/gpu/plots.sh on the same build and fixture -> plots/ (docs/BENCHMARKS.md's two
#     plots, the learning traces beside the reference's; about 60 s on a warm build). Its
#     files travel inside perf.tgz: the device returns only so many files of $OUT (seventy-
#     seventh session: plots.sh run straight into $OUT lost its second plot and the traces);
#  5. (NCU="kernel ...") deploy/gpu/ncu_kernels.sh on those kernels -> ncu_*.txt, ncu_summary.txt;
#  6. (NUMERICS="task ...") deploy/gpu/bf16_numerics.py on the trained default model (models/default,
#     which does not fit beside .gpu/debs in a call: carry .gpu/models.tgz, made here with
#     `tar czf .gpu/models.tgz models`) for held-out tasks with 5 examples -> numerics_TASK.md;
#  7. (SERVE=1) deploy/gpu/multi_gpu.sh on SERVE_DEVICES (default cuda:0): `lorahub serve` under
#     `lorahubctl load` (SERVE_REQUESTS requests, default 512) -> serve/multi_gpu.{md,log}; with
#     SERVE_ABS="tag ENV=V ...; ..." again per run with those variables set for the server
#     (and the client), each run's generated ids compared with those of the first run of the
#     same WEIGHT_JITTER (the same requests).
#     LOGPROBS=N (N >= 2): the load asks each token's log-probabilities (lorahubctl load --logprobs
#     N), and each comparison also prints the first-token top-2 margins of the requests that
#     differ against those that do not (near ties differ at small margins; a fault at any).
#     SERVE_PROFILE=1 among a run's variables: that server is profiled (multi_gpu.sh) and
#     deploy/gpu/serve_trace.py's tables of its generation round are printed.
#     Last, deploy/gpu/serve_rounds.py's table of every run's rounds (serve.log).
# TESTS_ONLY="//tests/server:inference_engine_bf16_test ...": step 2 alone for those tests (built
# alone; TEST_ENV as there), then stop: no fixture, bench or serve. The least device time for a
# test change (about 200 s of build on an H100 host).
# SERVE_ONLY=1: step 7 alone, in the least device time (about 150 s on an H200 host): builds only
# the server and client, no tests, no bench; the caller's environment reaches the server and
# client (e.g. SERVE_ONLY=1 WEIGHT_JITTER=1 SERVE_REQUESTS=1024 SERVE_JOBS=1).
# Everything lands in $OUT/perf.tgz; a summary (the headline figures of every run) goes to stdout
# and, as it is printed, to $OUT/progress.log (with each run's JSON a line of $OUT/runs.jsonl,
# {"tag": ..., "bench": ...}: they survive a kill).
#
#   OUT=DIR [ABS="tag ENV=V ... [-- flags]; ..."] [SWEEP=1] [PLOTS=1] [STOP_S=420] [SKIP_TESTS=1] \
#     [FIXTURE_LORA_SCALE=0.1] \
#     bash deploy/gpu/perf_ab.sh
# Carry .gpu/debs (deploy/gpu/fetch_debs.sh) and .gpu/bench (a copy of ../shared/bench).
# ABS: runs separated by ';', each a tag, then environment assignments, then optionally `--`
# and extra bench flags, e.g. ABS="no_batched_up LORAHUB_NO_BATCHED_UP=1; rows320 -- --max-rows 320".
# An A/B starts only while fewer than STOP_S seconds have passed since the start (the build, up
# to about 190 s fresh, and the suites included).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
work=/tmp/perf_ab
rm -rf "$work" && mkdir -p "$work"
trap 'mkdir -p "${OUT:-.gpu/logs}" && tar -C "$work" -czf "${OUT:-.gpu/logs}/perf.tgz" .' EXIT
# What this prints also goes to $OUT/progress.log line by line, and each bench's JSON to $OUT (runs.jsonl) as
# it ends: a call killed at its time limit (no EXIT trap, so no perf.tgz) still brings back how
# far it got (thirty-ninth session: a call cut at the device budget's end returned nothing).
mkdir -p "${OUT:-.gpu/logs}"
exec > >(tee -a "${OUT:-.gpu/logs}/progress.log") 2>&1
start=$SECONDS
stamp() { echo "== $*  [$((SECONDS - start)) s]"; }
# FIXTURE_LORA_SCALE=X: every module's LoRA factors multiplied by X (deltas by X^2) in a fixture
# of their own. The fixture's randn * 0.05 factors make composed deltas about 75 times W_q's
# scale, and its losses chaotic: any rounding change scatters a population's losses as far as
# their spread (sixtieth session). X = 0.1 brings the deltas near W_q's scale, where two kernels'
# losses of the same candidates can be compared to a tolerance.
fx=${FIXTURE:-/tmp/lorahub_large${FIXTURE_LORA_SCALE:+_s$FIXTURE_LORA_SCALE}}
if [ ! -f "$fx/examples.jsonl" ] && [ -z "${TESTS_ONLY:-}" ]; then
  (python3 .gpu/bench/ref_lorahub.py fixture --out "$fx" --size large --format bin &&
   if [ -n "${FIXTURE_LORA_SCALE:-}" ]; then
     python3 - "$fx" "$FIXTURE_LORA_SCALE" <<'PY'
import glob, sys, torch
for f in glob.glob(sys.argv[1] + "/modules/*/adapter_model.bin"):
    sd = torch.load(f)
    torch.save({k: v * float(sys.argv[2]) for k, v in sd.items()}, f)
print("LoRA factors scaled by", sys.argv[2])
PY
   fi) >"$work/fixture.log" 2>&1 &
  fixture_pid=$!
fi
# Only what this script runs: the CLI, make_task_data (NUMERICS) and the CUDA suites below
# (about 190 of 300 build steps); the configure-time check that CTest has every Bazel test
# still covers all of them.
targets="server_lorahub core_tasks_make_task_data tests_learn_lorahub_objective_test tests_server_inference_engine_test tests_server_inference_engine_bf16_test tests_server_admission_encoder_test $(grep -oE '^lorahub_cc_test\(tests_model_[a-z0-9_]+' \
  deploy/cmake/targets.cmake | cut -d'(' -f2 | tr '\n' ' ')"
[ "${SERVE:-0}" = 1 ] && targets="$targets client_lorahubctl"
if [ "${SERVE_ONLY:-0}" = 1 ]; then
  SERVE=1 SKIP_TESTS=1
  targets="server_lorahub client_lorahubctl"
fi
if [ -n "${TESTS_ONLY:-}" ]; then  # //tests/pkg:name -> CMake target tests_pkg_name
  targets=$(for label in $TESTS_ONLY; do label=${label#//}; printf '%s ' "${label//[\/:]/_}"; done)
fi
OUT=$work/build CTEST_ARGS="-R ^NONE$ --no-tests=ignore" NINJA_TARGETS="$targets" \
  bash deploy/gpu/build_and_test.sh >"$work/build.log" 2>&1
stamp "build exit $?"
# Where the build's time went (build_and_test.sh's lines end with its seconds).
grep -E '^== (start|unpacking|configured|build OK|every binary)' "$work/build.log"
head -3 "$work/build/slowest_steps.txt" 2>/dev/null  # what bounds the build's wall time
lorahub=.gpu/build/bin/server/lorahub
[ -n "${TESTS_ONLY:-}" ] || [ -x "$lorahub" ] || { grep -E -m 20 -A6 'error|FAILED' "$work/build.log"; tail -30 "$work/build.log"; exit 1; }
# The suites that honour LORAHUB_TEST_DEVICE.
cuda_suites='^//tests/model:|lorahub_objective_test|inference_engine_(bf16_)?test|admission_encoder_test'
[ -n "${TESTS_ONLY:-}" ] && cuda_suites="^($(echo $TESTS_ONLY | tr ' ' '|'))\$"
# TESTS_ONLY keeps every test's output in ctest.log, passed or not (-V: what a passing test
# prints, e.g. a diagnostic's figures, was lost in the fifty-fifth session's call 2).
ctest_output=--output-on-failure
[ -n "${TESTS_ONLY:-}" ] && ctest_output=-V
# The tests that skipped on the device, from each suite's XML (GTEST_OUTPUT): the CUDA-only ones
# skip on the CPU in CI, so this is where they must be seen to run.
skipped_tests() {
  local n
  n=$(grep -ho '<testcase name="[^"]*"[^>]*result="skipped"[^>]*classname="[^"]*"' "$1"/*.xml 2>/dev/null |
    sed -E 's/.*name="([^"]*)".*classname="([^"]*)".*/\2.\1/' | sort -u)
  echo "   skipped on the device: $(printf '%s\n' "$n" | grep -c .)${n:+ ($(echo $n))}"
}
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  (cd .gpu/build && LORAHUB_TEST_DEVICE=cuda:0 GTEST_OUTPUT="xml:$work/gtest/" ctest "$ctest_output" \
     -R "$cuda_suites") >"$work/ctest.log" 2>&1
  stamp "CUDA suites exit $?"
  grep -E "tests passed|\(Failed\)|Timeout" "$work/ctest.log"
  skipped_tests "$work/gtest"
  # The first failures' own words (ExpectTokensAlone's "token T is X (...) where alone it is Y").
  grep -E -A3 "Failure$" "$work/ctest.log" | head -40
  # TEST_ENV="ENV=V ...": the suites again with those variables set (a kernel variant behind an
  # A/B switch, before it becomes the default) -> ctest_env.log; TEST_ENV_SUITES=REGEX: only
  # those (e.g. 'inference_engine_(bf16_)?test' for a serving switch).
  if [ -n "${TEST_ENV:-}" ]; then
    read -ra test_env <<<"$TEST_ENV"
    (cd .gpu/build && env "${test_env[@]}" LORAHUB_TEST_DEVICE=cuda:0 \
       GTEST_OUTPUT="xml:$work/gtest_env/" ctest "$ctest_output" \
       -R "${TEST_ENV_SUITES:-$cuda_suites}") >"$work/ctest_env.log" 2>&1
    stamp "CUDA suites with $TEST_ENV exit $?"
    grep -E "tests passed|\(Failed\)|Timeout" "$work/ctest_env.log"
    skipped_tests "$work/gtest_env"
  fi
fi
[ -n "${TESTS_ONLY:-}" ] && { stamp done; exit 0; }
[ -n "${fixture_pid:-}" ] && { wait "$fixture_pid" || { tail -20 "$work/fixture.log"; exit 1; }; }
adapters=()
for m in "$fx"/modules/m*; do adapters+=(--adapter "$m"); done

# bench TAG [ENV=V...] [-- FLAGS...]: one bf16 `lorahub bench`, JSON in $work/TAG.json.
bench() {
  local tag=$1; shift
  local envs=() flags=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  [ "${1:-}" = -- ] && { shift; flags=("$@"); }
  stamp "bench $tag ${envs[*]} ${flags[*]}"
  env ${envs[@]+"${envs[@]}"} timeout 180 "$lorahub" bench --model "$fx/base" "${adapters[@]}" \
    --examples "$fx/examples.jsonl" --prompts "$fx/prompts.jsonl" --device cuda:0 --dtype bf16 \
    --reps "${REPS:-10}" --cmaes-budget 256 --population 64 --gen-batch 64 --gen-tokens 32 \
    ${flags[@]+"${flags[@]}"} --json >"$work/$tag.json" 2>"$work/$tag.err" || echo "FAILED: bench $tag"
  # One line a run in $OUT/runs.jsonl rather than a file a run: the device tool brings back 8
  # files at most, and with more runs than that perf.tgz stayed behind (fortieth session).
  [ -s "$work/$tag.json" ] &&
    printf '{"tag": "%s", "bench": %s}\n' "$tag" "$(cat "$work/$tag.json")" \
      >>"${OUT:-.gpu/logs}/runs.jsonl"
  python3 - "$work/$tag.json" "$work/main.json" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except Exception as e:
    print("  no JSON:", e); sys.exit()
g = j.get("generation", {})
tok = lambda k: round(g.get(k, {}).get("tokens_per_second", 0))
first = lambda k: g.get(k, {}).get("first_token_ms", 0)
print("  eval %.3f ms | cobyla40 %.4f s | cmaes %.0f/s (%.1f of %.1f ms in the objective) | "
      "base %d merged %d per_row %d tok/s (paired cost %.1f%%) | ttft %.2f ms | compose %.3f ms | "
      "cold %.2f s | first token base %.2f per row %.2f ms" % (
      j.get("eval_ms_median", 0), j.get("cobyla40_seconds", 0),
      j.get("cmaes_candidates_per_second", 0), 1e3 * j.get("cmaes_objective_seconds", 0),
      1e3 * j.get("cmaes_seconds", 0), tok("base"), tok("merged"), tok("per_row"),
      100 * g.get("per_row_cost_paired", {}).get("median", 0),
      g.get("merged", {}).get("ttft_ms", g.get("ttft_ms", 0)),
      1e3 * j.get("compose_seconds", 0), j.get("cold_start_seconds", 0), first("base"),
      first("per_row")))
# The answers: COBYLA's and CMA-ES's (with its seed), the tokens' digests, and the fixed-seed
# population's losses against main's (the same candidates): 0 says a change left the numerics
# alone. On the default fixture any rounding change moves them by the population's spread
# (sixtieth session: the tensor-core attention up to 15% in fp32, fp32 against bf16 correlated
# 0.21); with FIXTURE_LORA_SCALE=0.1 they can be compared to a tolerance.
digest = lambda k: g.get(k, {}).get("output_digest", "-")
line = "  answers: cobyla %r | cmaes %r (seed %s) | tokens %s %s %s" % (
    j.get("cobyla_best_score"), j.get("cmaes_best_score"), j.get("cmaes_seed", "-"),
    digest("base"), digest("merged"), digest("per_row"))
try:
    ref = json.load(open(sys.argv[2])).get("population_scores") if sys.argv[2] != sys.argv[1] else None
except Exception:
    ref = None
ps = j.get("population_scores")
if ps and ref and len(ps) == len(ref):
    line += " | population scores vs main: max rel diff %.2e" % max(
        abs(a - b) / max(abs(b), 1e-30) for a, b in zip(ps, ref))
print(line)
PY
}
if [ "${SERVE_ONLY:-0}" != 1 ]; then
  bench main -- --profile-out "$work/profile.json"
  # The evaluation's parts and its encoder layer and decoder block, kernel by kernel.
  [ -f "$work/profile.json" ] && python3 deploy/gpu/profile_compare.py "$work/profile.json" --top 0
fi
[ "${SERVE_ONLY:-0}" = 1 ] && ABS=""
IFS=';' read -ra runs <<<"${ABS:-}"
for run in "${runs[@]}"; do
  read -ra words <<<"$run"
  [ ${#words[@]} -gt 0 ] || continue
  [ $((SECONDS - start)) -lt "${STOP_S:-420}" ] || { echo "no time left for ${words[0]}"; continue; }
  bench "${words[@]}"
done
if [ "${SWEEP:-0}" = 1 ] && [ $((SECONDS - start)) -lt "${STOP_S:-420}" ]; then
  stamp "sweep"
  timeout 200 "$lorahub" bench --model "$fx/base" "${adapters[@]}" --examples "$fx/examples.jsonl" \
    --prompts "$fx/prompts.jsonl" --device cuda:0 --dtype bf16 --reps 3 --cobyla-budget 4 \
    --cmaes-budget 64 --population 64 --gen-tokens 32 --gen-sweep 1,8,16,32,64,128,256 --json \
    >"$work/sweep.json" 2>"$work/sweep.err" || echo "FAILED: sweep"
fi
if [ "${PLOTS:-0}" = 1 ]; then
  stamp "plots"
  OUT=$work/plots FIXTURE="$fx" timeout 300 bash deploy/gpu/plots.sh >/dev/null 2>&1 ||
    echo "FAILED: plots (plots/plots.log)"
  grep -E "^\| ours|^\| reference|FAILED" "$work/plots/plots/plots.md" "$work/plots/plots.log" 2>/dev/null
fi
if [ -n "${NCU:-}" ]; then
  stamp "ncu: $NCU"
  OUT=$work KERNELS=$NCU bash deploy/gpu/ncu_kernels.sh
fi
if [ -n "${NUMERICS:-}" ]; then
  [ -d models/default ] || tar xzf .gpu/models.tgz
  stamp "numerics: $NUMERICS"
  .gpu/build/bin/core/tasks/make_task_data --out "$work/taskdata" --seed 11 --train-per-task 8 \
    --test-per-task 8 --heldout-examples 5 >/dev/null || echo "FAILED: make_task_data"
  for task in $NUMERICS; do
    nf=/tmp/numerics_$task
    rm -rf "$nf" && mkdir -p "$nf/modules" "$nf/base"
    for f in models/default/base/*; do ln -s "$PWD/$f" "$nf/base/"; done
    # The reference's AutoTokenizer could not convert spiece.model on the host (ninth session):
    # hand it the tokenizers serialization (the same ids as SentencePiece, spm_tokenizer_json.py).
    python3 deploy/gpu/spm_tokenizer_json.py --spm "$nf/base/spiece.model" --out "$nf/base/tokenizer.json"
    i=0
    for m in models/default/modules/*/; do
      ln -s "$PWD/$m" "$nf/modules/$(printf 'm%02d' $i)"
      i=$((i + 1))
    done
    cp "$work/taskdata/heldout/$task/examples5.jsonl" "$nf/examples.jsonl" || continue
    # Where the reference cannot run (its tokenizer, twentieth session), ours in fp32 is the
    # baseline (--no-ref; ours in fp32 matches the reference, tests/model goldens).
    timeout 300 python3 deploy/gpu/bf16_numerics.py --ref .gpu/bench/ref_lorahub.py --fixture "$nf" \
      --lorahub "$lorahub" --out "$work/numerics_$task.md" >"$work/numerics_$task.log" 2>&1 \
      || { echo "FAILED: numerics $task against the reference (numerics_$task.log); --no-ref"
           timeout 300 python3 deploy/gpu/bf16_numerics.py --no-ref --fixture "$nf" \
             --lorahub "$lorahub" --out "$work/numerics_$task.md" \
             >"$work/numerics_${task}_noref.log" 2>&1 \
             || echo "FAILED: numerics $task --no-ref (numerics_${task}_noref.log)"; }
    cat "$work/numerics_$task.md" 2>/dev/null
  done
fi
if [ "${SERVE:-0}" = 1 ]; then
  declare -A first_of_requests  # WEIGHT_JITTER=... (or "") -> the first run's tag
  serve_run() {  # serve_run TAG [ENV=V...]: one multi_gpu.sh round under those variables
    local tag=$1; shift
    local requests ref
    requests=$(printf '%s\n' "$@" | grep '^WEIGHT_JITTER=' || true)
    ref=${first_of_requests[k$requests]:-}
    [ -n "$ref" ] || first_of_requests[k$requests]=$tag
    # SERVE_REF=TAG among the variables: compare with that run instead.
    local named
    named=$(printf '%s\n' "$@" | sed -n 's/^SERVE_REF=//p')
    [ -z "$named" ] || ref=$named
    stamp "serve $tag $*"
    env "$@" OUT="$work/serve_$tag" FIXTURE="$fx" DEVICE_SETS="${SERVE_DEVICES:-cuda:0}" \
      GEN_REQUESTS="${SERVE_REQUESTS:-512}" JOBS="${SERVE_JOBS:-4}" \
      timeout 300 bash deploy/gpu/multi_gpu.sh | grep -E "^\| cuda|gen:|warm-up|round's engine:|device memory|jobs:|job times|job phases|compose work|failed|did not|prefetched|lorahub serve:"
    grep -h "lorahub engine" "$work/serve_$tag/multi_gpu.log"
    # SERVE_PROFILE=1 in a run's variables: where its generation round's time went.
    cat "$work/serve_$tag/trace_1.md" 2>/dev/null
    # Greedy ids of every request against the first run's with the same requests.
    [ -z "$ref" ] || python3 - "$work/serve_$ref" "$work/serve_$tag" "$ref" <<'PY'
import json, pathlib, sys
gaps = {}  # with LOGPROBS >= 2: every token's top-2 log-probability gap, per request
def ids(d):
    out = {}
    for f in sorted(pathlib.Path(d).rglob("outputs*.jsonl")):
        for l in open(f):
            o = json.loads(l)
            key = (str(f.relative_to(d)), o["index"])
            out[key] = (o["code"], o["ids"])
            lp = o.get("logprobs")
            if lp and len(lp[0]["top_logprobs"]) >= 2:
                gaps.setdefault(d, {})[key] = [t["top_logprobs"][0] - t["top_logprobs"][1]
                                               for t in lp]
    return out
a, b = ids(sys.argv[1]), ids(sys.argv[2])
same = sum(1 for k in a if k in b and a[k] == b[k] and a[k][0] == "OK")
print("   outputs: %d of %d requests with the same ids as %s (%d here)"
      % (same, len(a), sys.argv[3], len(b)))
# Where two runs part: the top-2 gap at the first token whose ids differ, in
# each run that has log-probabilities (both share the prefix before it, so a
# rounding flip shows as a near tie there; a fault at any gap).
at_split = []
for k in a:
    if k not in b or a[k] == b[k]:
        continue
    x, y = a[k][1], b[k][1]
    i = next((j for j in range(min(len(x), len(y))) if x[j] != y[j]), None)
    if i is None:
        continue
    g = [gaps[d][k][i] for d in (sys.argv[1], sys.argv[2])
         if k in gaps.get(d, {}) and i < len(gaps[d][k])]
    if g:
        at_split.append(min(g))
if at_split:
    at_split.sort()
    every = sorted(v for d in gaps.values() for k in d for v in d[k])
    print("   top-2 gap at the first differing token (nats): %d requests, median %.4g, max %.4g "
          "(every token of both runs: median %.4g, 1st percentile %.4g)"
          % (len(at_split), at_split[len(at_split) // 2], at_split[-1],
             every[len(every) // 2], every[len(every) // 100]))
# Near ties or a fault: the first-token margins (in the reference run) of the
# requests whose ids differ, against those of the others.
m = {k: g[0] for k, g in gaps.get(sys.argv[1], {}).items()}
if m:
    def median(v): return sorted(v)[len(v) // 2] if v else float("nan")
    differ = [m[k] for k in m if k in b and a[k] != b[k]]
    agree = [m[k] for k in m if k in b and a[k] == b[k]]
    print("   first-token top-2 margin in %s (nats): differing %d, median %.4g, min %.4g; "
          "same %d, median %.4g" % (sys.argv[3], len(differ), median(differ),
                                    min(differ) if differ else float("nan"), len(agree), median(agree)))
PY
  }
  IFS=';' read -ra sruns <<<"${SERVE_ABS:-}"
  {
    serve_run main
    for run in "${sruns[@]}"; do
      read -ra words <<<"$run"
      [ ${#words[@]} -gt 0 ] && serve_run "${words[@]}"
    done
  } | tee "$work/serve.log"
  # Every run's rounds in one table.
  python3 deploy/gpu/serve_rounds.py "$work/serve.log"
fi
stamp done
