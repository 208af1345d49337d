#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs lorahub end to end
# on fixtures that ship with the project (no GPU, no downloads):
#   1. the gRPC server on 127.0.0.1 with a small T5 (tests/testdata/t5/
#      gated_untied, written by transformers) and three LoRA modules registered
#      through lorahubctl; generation through the base model, one module and a
#      LoraHub composition, streamed;
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
case_dir=$PWD/tests/testdata/t5/gated_untied
tmp=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

echo "== 1. serving: lorahub serve on 127.0.0.1 (model $case_dir/model)"
"$lorahub" serve --model "$case_dir/model" --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --data-dir "$tmp" >"$tmp/out" 2>"$tmp/err" &
pid=$!
for _ in $(seq 300); do grep -q '^listening on' "$tmp/out" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on \(.*\)$/\1/p' "$tmp/out")
[ -n "$addr" ] || { cat "$tmp/err" >&2; exit 1; }
c() { "$ctl" --server "$addr" "$@"; }
echo "server at $addr: $(c health)"
for m in m0 m1 m2; do c modules add --dir "$case_dir/adapters/$m" --id "$m" >/dev/null; done
c modules list
prompt=$($py -c "import json; print(json.load(open('$case_dir/golden.json'))['inputs'][0])")
echo "prompt: $prompt"
for adapter in "base" "--module m0" "--modules m0,m1,m2 --weights 0.5,-0.3,0.8"; do
  printf '%-42s -> ' "$adapter"
  # shellcheck disable=SC2086
  c generate $adapter --text "$prompt" --max-new-tokens 12
  echo
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
