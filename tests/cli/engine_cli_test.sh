#!/usr/bin/env bash
# `lorahub score` (also --objective) and `lorahub generate` end to end against the transformers /
# peft goldens (tests/testdata/t5): real binary, real fixtures, exit codes.
#   engine_cli_test.sh LORAHUB_BINARY
set -uo pipefail
lorahub=$1
py=/usr/bin/python3
fail() { echo "FAIL: $*" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

for case in gated_untied odd_shapes relu_tied_bin bf16_sharded; do
  dir=tests/testdata/t5/$case
  # Examples and prompts as the golden generator used them.
  $py - "$dir" "$tmp" <<'PY' || fail "$case: cannot prepare inputs"
import json, sys
d, tmp = sys.argv[1], sys.argv[2]
g = json.load(open(d + "/golden.json"))
with open(tmp + "/examples.jsonl", "w") as f:
    for x, y in zip(g["inputs"], g["outputs"]):
        f.write(json.dumps({"input": x, "output": y}) + "\n")
with open(tmp + "/prompts.jsonl", "w") as f:
    for x in g["inputs"]:
        f.write(json.dumps({"input": x}) + "\n")
# One line per check, '|'-separated (empty fields survive, unlike tabs):
# kind, adapters (comma list), weights, extra, expected.
with open(tmp + "/checks.txt", "w") as f:
    for e in g["loss"]:
        f.write("score|%s|%s|%s|%r\n" % (",".join(e["adapters"]),
                ",".join(repr(w) for w in e["weights"]),
                "" if e["batch_size"] is None else e["batch_size"], e["loss"]))
    for kind in ("greedy", "beam"):
        for e in g[kind]:
            f.write("%s|%s|%s|%d %d|%s\n" % (kind, ",".join(e["adapters"]),
                    ",".join(repr(w) for w in e["weights"]), e["max_new_tokens"],
                    e.get("num_beams", 1), json.dumps(e["output_ids"])))
PY
  while IFS='|' read -r kind adapters weights extra want; do
    args=(--model "$dir/model" --json)
    if [ -n "$adapters" ]; then
      IFS=, read -ra names <<<"$adapters"
      for n in "${names[@]}"; do args+=(--adapter "$dir/adapters/$n"); done
      args+=(--weights "$weights")
    fi
    if [ "$kind" = score ]; then
      [ -n "$extra" ] && args+=(--batch-size "$extra")
      out=$("$lorahub" score "${args[@]}" --examples "$tmp/examples.jsonl") ||
        fail "$case score [$adapters] [$weights]: exit $?"
      $py -c "
import json, sys
got = json.loads(sys.argv[1]); want = float(sys.argv[2])
assert abs(got['loss'] - want) <= 1e-5 * abs(want), (got, want)
" "$out" "$want" || fail "$case score [$adapters] [$weights] bs=$extra: $out, want $want"
      # The same loss through the learning objective (its runner), where its
      # clipping to [-1.5, 1.5] leaves the weights alone.
      if [ -n "$adapters" ] && $py -c "
import sys; sys.exit(any(abs(float(w)) > 1.5 for w in sys.argv[1].split(',')))" "$weights"; then
        out=$("$lorahub" score "${args[@]}" --objective --examples "$tmp/examples.jsonl") ||
          fail "$case score --objective [$adapters] [$weights]: exit $?"
        $py -c "
import json, sys
got = json.loads(sys.argv[1]); want = float(sys.argv[2])
assert abs(got['loss'] - want) <= 1e-5 * abs(want), (got, want)
" "$out" "$want" || fail "$case score --objective [$adapters] [$weights] bs=$extra: $out, want $want"
      fi
    else
      read -r max_new beams <<<"$extra"
      out=$("$lorahub" generate "${args[@]}" --input-file "$tmp/prompts.jsonl" \
            --max-new-tokens "$max_new" --num-beams "$beams") ||
        fail "$case $kind [$adapters]: exit $?"
      $py -c "
import json, sys
got = [json.loads(l)['output_ids'] for l in sys.argv[1].splitlines()]
assert got == json.loads(sys.argv[2]), (got, sys.argv[2])
" "$out" "$want" || fail "$case $kind [$adapters] [$weights]: $out, want $want"
    fi
  done <"$tmp/checks.txt"
  echo "ok $case"
done

# Bad input: one-line errors, exit code 2.
dir=tests/testdata/t5/gated_untied
expect2() {
  local what=$1; shift
  err=$("$lorahub" "$@" 2>&1 >/dev/null); rc=$?
  [ $rc -eq 2 ] || fail "$what: exit $rc, want 2 ($err)"
  [ "$(echo "$err" | wc -l)" -eq 1 ] || fail "$what: error is not one line: $err"
}
echo '{"input": "x"}' >"$tmp/no_output.jsonl"
echo 'not json' >"$tmp/bad.jsonl"
expect2 "bad flag" score --bogus
expect2 "missing model" score --model /nonexistent --examples "$tmp/examples.jsonl"
expect2 "examples without output" score --model "$dir/model" --examples "$tmp/no_output.jsonl"
expect2 "malformed jsonl" generate --model "$dir/model" --input-file "$tmp/bad.jsonl"
expect2 "weights count" score --model "$dir/model" --adapter "$dir/adapters/m0" \
  --adapter "$dir/adapters/m1" --weights 1 --examples "$tmp/examples.jsonl"
expect2 "bad weight" score --model "$dir/model" --adapter "$dir/adapters/m0" \
  --weights abc --examples "$tmp/examples.jsonl"
expect2 "objective without weights" score --model "$dir/model" --adapter "$dir/adapters/m0" \
  --objective --examples "$tmp/examples.jsonl"
expect2 "objective and fast-fp32" score --model "$dir/model" --adapter "$dir/adapters/m0" \
  --weights 1 --objective --fast-fp32 --examples "$tmp/examples.jsonl"
expect2 "bad dtype" generate --model "$dir/model" --text hi --dtype fp64
expect2 "bad device" generate --model "$dir/model" --text hi --device tpu
expect2 "no input" generate --model "$dir/model"
expect2 "adapter of another model" score --model "$dir/model" \
  --adapter tests/testdata/t5/odd_shapes/adapters/xattn --examples "$tmp/examples.jsonl"
echo PASS
