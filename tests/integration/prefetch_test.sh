#!/usr/bin/env bash
# ModuleService through the real server against the local hub emulator
# (tests/hub/hub_emulator.py): AddModule from a hub repo (the LFS weights
# come through the 302 to the emulator's "CDN"), then PrefetchModule streams
# progress: one message per file of the module with bytes_done == bytes_total
# at its end, then the final message with done = true; after the cached blob
# is removed, Prefetch downloads it again (the emulator's log shows the GET)
# and the module still serves. A client from Python (generated stubs).
#   prefetch_test.sh LORAHUB
set -uo pipefail
lorahub=$(readlink -f "$1")
case_dir=$(readlink -f tests/testdata/t5/gated_untied)
proto_dir=$(readlink -f proto)
emulator=$(readlink -f tests/hub/hub_emulator.py)
tmp=$(mktemp -d)
pid=; epid=
cleanup() {
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
  [ -n "$epid" ] && kill -9 "$epid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; tail -20 "$tmp/err" >&2 2>/dev/null; exit 1; }

. "$(dirname "$0")/py_stubs.sh"
make_py_stubs "$proto_dir" "$tmp/py" || fail "protoc"

# The fixture: the m0 adapter as repo lorahub/m0 (weights in LFS).
"$py" - "$case_dir/adapters/m0" "$tmp/fixture.json" <<'PY' || fail "fixture"
import json, sys
d, out = sys.argv[1], sys.argv[2]
commit = "2" * 40
files = {"adapter_config.json": {"text": open(d + "/adapter_config.json").read()},
         "adapter_model.safetensors": {"hex": open(d + "/adapter_model.safetensors", "rb").read().hex(),
                                       "lfs": True}}
json.dump({"repos": {"lorahub/m0": {"refs": {"main": commit},
                                    "commits": {commit: {"files": files}}}}}, open(out, "w"))
PY
mkfifo "$tmp/emu_in"
"$py" "$emulator" --fixture "$tmp/fixture.json" <"$tmp/emu_in" >"$tmp/emu_out" 2>>"$tmp/err" &
epid=$!
exec 3>"$tmp/emu_in"  # the emulator runs until this closes
for _ in $(seq 100); do [ -s "$tmp/emu_out" ] && break; sleep 0.1; done
read -r _ hub_port _ <"$tmp/emu_out"
[ -n "$hub_port" ] || fail "emulator did not start"

"$lorahub" serve --model "$case_dir/model" --listen 127.0.0.1:0 \
  --metrics-listen 127.0.0.1:0 --data-dir "$tmp" --cache-dir "$tmp/hub" \
  --hub-endpoint "http://127.0.0.1:$hub_port" >"$tmp/out" 2>>"$tmp/err" &
pid=$!
for _ in $(seq 300); do grep -q '^listening on' "$tmp/out" && break; sleep 0.1; done
port=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$tmp/out")
[ -n "$port" ] || fail "no port"

PYTHONPATH="$tmp/py" "$py" - "$port" "$hub_port" "$tmp/hub" "$case_dir" <<'PY' || fail "prefetch"
import glob, json, os, sys, urllib.request
import grpc
from lorahub.v1 import modules_pb2, modules_pb2_grpc, inference_pb2, inference_pb2_grpc, common_pb2

port, hub_port, cache, case_dir = sys.argv[1:5]
ch = grpc.insecure_channel("127.0.0.1:" + port)
modules = modules_pb2_grpc.ModuleServiceStub(ch)
m = modules.AddModule(modules_pb2.AddModuleRequest(
    hub=modules_pb2.HubSource(repo_id="lorahub/m0")), timeout=60)
assert m.id == "m0" and m.resolved_commit == "2" * 40, m
weights = os.path.getsize(case_dir + "/adapters/m0/adapter_model.safetensors")
config = os.path.getsize(case_dir + "/adapters/m0/adapter_config.json")

def prefetch():
    msgs = list(modules.PrefetchModule(modules_pb2.PrefetchModuleRequest(id="m0"), timeout=60))
    assert msgs and msgs[-1].done, msgs
    assert all(not x.done for x in msgs[:-1]), msgs
    by_file = {}
    for x in msgs[:-1]:
        by_file.setdefault(x.file, []).append((x.bytes_done, x.bytes_total))
    assert set(by_file) == {"adapter_config.json", "adapter_model.safetensors"}, by_file
    for f, size in (("adapter_config.json", config), ("adapter_model.safetensors", weights)):
        seq = by_file[f]
        assert seq[-1] == (size, size), (f, seq)
        assert [d for d, _ in seq] == sorted(d for d, _ in seq), (f, seq)
    assert msgs[-1].bytes_done == weights and msgs[-1].file == "adapter_model.safetensors", msgs[-1]
    return msgs

def cdn_gets():
    log = json.load(urllib.request.urlopen("http://127.0.0.1:%s/_admin/log" % hub_port))
    return sum(1 for e in log if e["host"] == "cdn" and e["method"] == "GET")

before = cdn_gets()
prefetch()                        # everything cached: no transfer
assert cdn_gets() == before, "cached prefetch downloaded"
blobs = glob.glob(cache + "/models--lorahub--m0/blobs/*")
big = [b for b in blobs if os.path.getsize(b) == weights]
assert len(big) == 1, blobs
os.remove(big[0])                 # evicted: Prefetch must fetch it again
prefetch()
assert cdn_gets() == before + 1, "weights were not downloaded again"
assert os.path.getsize(big[0]) == weights
inference = inference_pb2_grpc.InferenceServiceStub(ch)
end = [x for x in inference.Generate(inference_pb2.GenerateRequest(
    adapter=common_pb2.AdapterRef(module_id="m0"), text="hello",
    options=common_pb2.DecodingOptions(max_new_tokens=3)), timeout=60) if x.HasField("end")]
assert end, "no end message"
try:
    list(modules.PrefetchModule(modules_pb2.PrefetchModuleRequest(id="nope"), timeout=10))
    raise SystemExit("unknown module accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.NOT_FOUND, e
print("prefetch OK")
PY
kill -TERM "$pid"; wait "$pid" || fail "server exit code"
pid=
exec 3>&-
echo PASS
