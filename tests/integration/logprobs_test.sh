#!/usr/bin/env bash
# Per-token log-probabilities (DecodingOptions.logprobs, top_logprobs) end
# to end on the trained default model, through the real server and the real
# lorahubctl:
#  - `generate --logprobs 3 --json`: every chunk carries one entry per id;
#    each is a log-probability (<= 0), the top three are in order and their
#    probabilities sum to at most 1, and the greedy pick leads them with its
#    own value; the ids are those of the same request without logprobs;
#  - sampling with --logprobs 0: one entry per id, no top tokens, the ids of
#    the same seed without logprobs;
#  - `load --logprobs 1 --outputs FILE`: each line's logprobs match its ids;
#  - bad values: --logprobs 6 is exit 2; top_logprobs without logprobs, 6,
#    and logprobs with beam search are INVALID_ARGUMENT naming the field.
#   logprobs_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2")
root=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
dm=$root/models/default
proto_dir=$(readlink -f proto)
. "$(dirname "$0")/harness.sh"
[ -f "$dm/base/model.safetensors" ] || fail "$dm not found (the trained default model)"

. "$(dirname "$0")/py_stubs.sh"
make_py_stubs "$proto_dir" "$tmp/py" || fail "protoc"

start_server --model "$dm/base" --data-dir "$tmp"
c modules add --dir "$dm/modules/reverse_word" --id rw >/dev/null || fail "modules add"

gen() {  # gen OUT FLAGS...: one --json generate of the reverse_word module
  local out=$1; shift
  c --json generate --module rw --max-new-tokens 12 --text "Reverse the word: planet" "$@" \
    >"$out" 2>>"$tmp/err" || fail "generate $*"
}
gen "$tmp/plain"
gen "$tmp/top3" --logprobs 3
gen "$tmp/sampled" --temperature 0.8 --seed 5
gen "$tmp/sampled_lp" --temperature 0.8 --seed 5 --logprobs 0

"$py" - "$tmp" <<'PY' || fail "logprobs of generate"
import json, math, sys
tmp = sys.argv[1]
def read(name):
    lines = [json.loads(l) for l in open(tmp + "/" + name)]
    return lines[:-1], lines[-1]  # chunks, end
def check(name, top, greedy):
    chunks, end = read(name)
    ids, n = [], 0
    for ch in chunks:
        lps = ch.get("logprobs", [])
        assert len(lps) == len(ch["ids"]), (name, ch)
        for tok, lp in zip(ch["ids"], lps):
            assert lp["logprob"] <= 0, (name, lp)
            assert len(lp["top_ids"]) == top and len(lp["top_logprobs"]) == top, (name, lp)
            t = lp["top_logprobs"]
            assert all(a >= b for a, b in zip(t, t[1:])), (name, lp)
            assert sum(math.exp(x) for x in t) <= 1 + 1e-5, (name, lp)
            if top:
                assert lp["logprob"] <= t[0], (name, lp)
            if greedy and top:
                assert lp["top_logprobs"][0] == lp["logprob"], (name, lp)
                assert lp["top_ids"][0] == tok or lp["top_logprobs"][1] == t[0], (name, tok, lp)
            n += 1
        ids += ch["ids"]
    assert ids == end["output_ids"] and n == len(ids) > 0, (name, ids, end)
    return ids
def plain_ids(name):
    chunks, end = read(name)
    assert all("logprobs" not in ch for ch in chunks), name
    return end["output_ids"]
assert check("top3", 3, True) == plain_ids("plain")
assert check("sampled_lp", 0, False) == plain_ids("sampled")
print("generate: %d greedy and %d sampled tokens with logprobs" %
      (len(plain_ids("plain")), len(plain_ids("sampled"))))
PY

printf '%s\n' '{"input": "Reverse the word: planet"}' '{"input": "Reverse the word: stone"}' \
  >"$tmp/prompts.jsonl"
c load --requests 4 --concurrency 2 --prompts "$tmp/prompts.jsonl" --module rw \
  --max-new-tokens 8 --logprobs 1 --outputs "$tmp/load.jsonl" >"$tmp/load.out" 2>>"$tmp/err" \
  || fail "load --logprobs"
"$py" - "$tmp/load.jsonl" <<'PY' || fail "load outputs"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
assert len(lines) == 4, lines
for l in lines:
    assert l["code"] == "OK" and len(l["logprobs"]) == len(l["ids"]) > 0, l
    assert all(len(lp["top_ids"]) == 1 for lp in l["logprobs"]), l
PY

c generate --module rw --text x --logprobs 6 2>"$tmp/e"
[ $? = 2 ] && grep -q -- "--logprobs must be" "$tmp/e" || fail "--logprobs 6: $(cat "$tmp/e")"

PYTHONPATH="$tmp/py" "$py" - "$port" <<'PY' || fail "bad options"
import sys
import grpc
from lorahub.v1 import inference_pb2, inference_pb2_grpc
inf = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel("127.0.0.1:" + sys.argv[1]))
def refused(field, **options):
    req = inference_pb2.GenerateRequest(text="Reverse the word: planet")
    req.adapter.module_id = "rw"
    for k, v in options.items():
        setattr(req.options, k, v)
    try:
        for _ in inf.Generate(req, timeout=60):
            pass
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (options, e.code())
        assert e.details().startswith(field), (options, e.details())
        return
    raise AssertionError("accepted: %s" % options)
refused("options.top_logprobs", top_logprobs=2)
refused("options.top_logprobs", logprobs=True, top_logprobs=6)
refused("options.logprobs", logprobs=True, num_beams=2)
PY
echo "PASS"
