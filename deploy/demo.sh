#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs lorahub end to end
# on fixtures that ship with the project (no GPU, no downloads):
#   1. the gRPC server on 127.0.0.1 with the small T5 and 20 LoRA modules of a
#      reference fixture (tests/testdata/ref_tiny/tiny_s0, written by the
#      reference implementation): modules registered through lorahubctl, a
#      compose job learning the weights for a task from 5 examples (progress
#      streamed), then generation through the base, one module and the task;
#   2. LoraHub learning on the reference's own fixtures (tests/testdata/ref_tiny,
#      20 modules each): COBYLA (the paper's setting) and batched CMA-ES, next
#      to what the reference implementation (transformers + peft + scipy)
#      reached on the same files.
# The embedded default model and the held-out-task accuracy table come with
# issue 6; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup_debian.sh
bazel build //server:lorahub //client:lorahubctl >/dev/null 2>&1 || bazel build //server:lorahub //client:lorahubctl
lorahub=$PWD/bazel-bin/server/lorahub
ctl=$PWD/bazel-bin/client/lorahubctl
py=/usr/bin/python3
tmp=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

echo "== 1. serving: lorahub serve on 127.0.0.1, base model and 20 LoRA modules of a reference fixture"
fx=$PWD/tests/testdata/ref_tiny/tiny_s0
"$lorahub" serve --model "$fx/base" --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --data-dir "$tmp" >"$tmp/out" 2>"$tmp/err" &
pid=$!
for _ in $(seq 300); do grep -q '^listening on' "$tmp/out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on \(.*\)$/\1/p' "$tmp/out")
[ -n "$addr" ] || { cat "$tmp/err" >&2; exit 1; }
c() { "$ctl" --server "$addr" "$@"; }
echo "server at $addr: $(c health)"
for m in "$fx"/modules/m*; do c modules add --dir "$m" --id "$(basename "$m")" >/dev/null; done
echo "$(c modules list | wc -l) modules registered"
echo "-- compose job: task 'date', 20 modules, the fixture's 5 examples, COBYLA budget 40"
modules=$(cd "$fx/modules" && ls | paste -sd,)
c --json compose --task date --modules "$modules" --examples "$fx/examples.jsonl" --budget 40 --wait \
  | tail -1 | $py -c "
import json, sys
d = json.loads(sys.stdin.read())
print('job %s: %s, best score %.4f after %d evaluations' % (d.get('id', '?'), d['state'], d['best_score'], d.get('evaluations', 0)))
print('weights: ' + ' '.join('%+.2f' % w for w in d['weights']))"
prompt=$($py -c "import json; print(json.loads(open('$fx/prompts.jsonl').readlines()[5])['input'])")
echo "prompt: $prompt"
echo "(a random-weight model: its ids carry no language; tests/integration/serve_test.sh checks served ids against transformers)"
for adapter in "base" "--module m00" "--task date"; do
  printf '%-14s -> ' "$adapter"
  # shellcheck disable=SC2086
  c --json generate $adapter --text "$prompt" --max-new-tokens 12 | tail -1 \
    | $py -c "import json,sys; d=json.loads(sys.stdin.read()); print(d.get('output_ids', d))"
done
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=

echo
echo "== 2. learning: LoraHub composition weights for 5 examples, 20 modules, budget 40"
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
