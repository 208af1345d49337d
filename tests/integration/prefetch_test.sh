#!/usr/bin/env bash
# ModuleService through the real server against the local hub emulator
# (tests/hub/hub_emulator.py): AddModule from a hub repo (the LFS weights
# come through the 302 to the emulator's "CDN"), then PrefetchModule streams
# progress: one message per file of the module with bytes_done == bytes_total
# at its end, then the final message with done = true; after the cached blob
# is removed, Prefetch downloads it again (the emulator's log shows the GET)
# and the module still serves. A client from Python (generated stubs), then
# `lorahubctl modules prefetch`: --json (one object per message), plain lines
# when stdout is not a terminal, progress bars on a terminal (under script(1)),
# NOT_FOUND for an unknown module.
#   prefetch_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1")
ctl=$(readlink -f "$2")
case_dir=$(readlink -f tests/testdata/t5/gated_untied)
proto_dir=$(readlink -f proto)
emulator=$(readlink -f tests/hub/hub_emulator.py)
. "$(dirname "$0")/harness.sh"

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
extra_pids+=($!)
exec 3>"$tmp/emu_in"  # the emulator runs until this closes
for _ in $(seq 100); do [ -s "$tmp/emu_out" ] && break; sleep 0.1; done
read -r _ hub_port _ <"$tmp/emu_out"
[ -n "$hub_port" ] || fail "emulator did not start"

start_server --model "$case_dir/model" --data-dir "$tmp" --cache-dir "$tmp/hub" \
  --hub-endpoint "http://127.0.0.1:$hub_port"

metrics_addr=$(sed -n 's/^metrics listening on \(.*\)$/\1/p' "$tmp/out")
[ -n "$metrics_addr" ] || fail "no metrics address"
PYTHONPATH="$tmp/py" "$py" - "$port" "$hub_port" "$tmp/hub" "$case_dir" "$metrics_addr" <<'PY' || fail "prefetch"
import glob, json, os, re, sys, urllib.request
import grpc
from lorahub.v1 import modules_pb2, modules_pb2_grpc, inference_pb2, inference_pb2_grpc, common_pb2

port, hub_port, cache, case_dir, metrics_addr = sys.argv[1:6]

def metric(name, tier):
    text = urllib.request.urlopen("http://%s/metrics" % metrics_addr).read().decode()
    m = re.search(r'^%s\{tier="%s"\} (\S+)$' % (name, tier), text, re.M)
    assert m, (name, tier, text)
    return float(m.group(1))

ch = grpc.insecure_channel("127.0.0.1:" + port)
modules = modules_pb2_grpc.ModuleServiceStub(ch)
m = modules.AddModule(modules_pb2.AddModuleRequest(
    hub=modules_pb2.HubSource(repo_id="lorahub/m0")), timeout=60)
assert m.id == "m0" and m.resolved_commit == "2" * 40, m
assert list(m.resident) == ["disk"], m.resident   # on disk only, not loaded yet
assert metric("lorahub_module_cache_resident_bytes", "host") == 0
weights = os.path.getsize(case_dir + "/adapters/m0/adapter_model.safetensors")
config = os.path.getsize(case_dir + "/adapters/m0/adapter_config.json")

def prefetch():
    msgs = list(modules.PrefetchModule(modules_pb2.PrefetchModuleRequest(id="m0"), timeout=60))
    assert msgs and msgs[-1].done, msgs
    assert all(not x.done for x in msgs[:-1]), msgs
    # After the downloads, one message per tier it was loaded into.
    loads = [x.loaded_into for x in msgs[:-1] if x.loaded_into]
    assert loads == ["host", "cpu"], msgs
    assert all(x.loaded_into for x in msgs[len(msgs) - 1 - len(loads):-1]), msgs
    assert list(msgs[-1].resident) == ["disk", "host", "cpu"], msgs[-1]
    by_file = {}
    for x in msgs[:-1]:
        if x.loaded_into:
            continue
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
got = modules.GetModule(modules_pb2.GetModuleRequest(id="m0"), timeout=10)
assert list(got.resident) == ["disk", "host", "cpu"], got.resident
listed = modules.ListModules(modules_pb2.ListModulesRequest(), timeout=10).modules
assert [list(x.resident) for x in listed] == [["disk", "host", "cpu"]], listed
host_bytes = metric("lorahub_module_cache_resident_bytes", "host")
assert host_bytes > 0 and metric("lorahub_module_cache_resident_bytes", "device") == host_bytes
assert metric("lorahub_module_cache_misses_total", "host") == 1
try:
    list(modules.PrefetchModule(modules_pb2.PrefetchModuleRequest(id="m0", devices=["cuda:7"]),
                                timeout=10))
    raise SystemExit("unknown device accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "devices[0]" in e.details(), e
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

# lorahubctl modules prefetch, after evicting the weights blob once more so
# that the download streams progress.
addr="127.0.0.1:$port"
evict() {
  for b in "$tmp"/hub/models--lorahub--m0/blobs/*; do
    [ "$(stat -c %s "$b")" = "$weights" ] && rm -f "$b"
  done
}
weights=$(stat -L -c %s "$case_dir/adapters/m0/adapter_model.safetensors")
config=$(stat -L -c %s "$case_dir/adapters/m0/adapter_config.json")
evict
"$ctl" --server "$addr" --json modules prefetch m0 --device cpu >"$tmp/pj" 2>>"$tmp/err" \
  || fail "lorahubctl --json prefetch"
"$py" - "$tmp/pj" "$weights" "$config" <<'PY' || fail "prefetch --json output"
import json, sys
lines = open(sys.argv[1]).read().splitlines()
weights, config = int(sys.argv[2]), int(sys.argv[3])
msgs = [json.loads(l) for l in lines]
assert len(msgs) >= 3, lines
for m in msgs[:-1]:
    assert set(m) - {"loaded_into"} == {"file", "bytes_done", "bytes_total", "done"}, m
assert set(msgs[-1]) == {"file", "bytes_done", "bytes_total", "done", "resident"}, msgs[-1]
assert [m["loaded_into"] for m in msgs if "loaded_into" in m] == ["host", "cpu"], msgs
assert msgs[-1]["resident"] == ["disk", "host", "cpu"], msgs[-1]
msgs = [m for m in msgs if "loaded_into" not in m]
assert msgs[-1]["done"] is True and not any(m["done"] for m in msgs[:-1]), msgs
assert msgs[-1]["file"] == "adapter_model.safetensors" and msgs[-1]["bytes_done"] == weights, msgs[-1]
w = [m for m in msgs[:-1] if m["file"] == "adapter_model.safetensors"]
c = [m for m in msgs[:-1] if m["file"] == "adapter_config.json"]
assert c and c[-1]["bytes_done"] == c[-1]["bytes_total"] == config, c
assert w and w[-1]["bytes_done"] == w[-1]["bytes_total"] == weights, w
assert [m["bytes_done"] for m in w] == sorted(m["bytes_done"] for m in w), w
PY
# Plain lines (stdout is a file here): "FILE DONE/TOTAL", then the summary.
"$ctl" --server "$addr" modules prefetch m0 >"$tmp/pp" 2>>"$tmp/err" || fail "plain prefetch"
grep -qx "adapter_config.json $config/$config" "$tmp/pp" || fail "plain config line: $(cat "$tmp/pp")"
grep -qx "adapter_model.safetensors $weights/$weights" "$tmp/pp" || fail "plain weights line: $(cat "$tmp/pp")"
grep -q "^prefetched m0 (adapter_model.safetensors, .*, resident in disk,host,cpu$" "$tmp/pp" \
  || fail "plain summary: $(cat "$tmp/pp")"
grep -qx "loaded into host" "$tmp/pp" || fail "plain load line: $(cat "$tmp/pp")"
if grep -q $'\r' "$tmp/pp"; then fail "plain output has carriage returns"; fi
# On a terminal: a bar per file, redrawn with \r, 100% at the end of each.
evict
script -qec "'$ctl' --server $addr modules prefetch m0" /dev/null >"$tmp/pt" 2>>"$tmp/err" \
  || fail "tty prefetch"
tr '\r' '\n' <"$tmp/pt" | sed 's/\x1b\[K//g' >"$tmp/pt2"
grep -q '^adapter_config.json \[#\{30\}\] 100% ' "$tmp/pt2" || fail "no full config bar: $(cat -v "$tmp/pt")"
grep -q '^adapter_model.safetensors \[#\{30\}\] 100% ' "$tmp/pt2" || fail "no full weights bar: $(cat -v "$tmp/pt")"
grep -q '^prefetched m0 ' "$tmp/pt2" || fail "tty summary: $(cat -v "$tmp/pt")"
grep -q $'\r' "$tmp/pt" || fail "tty output never redraws"
# Errors: exit 1 with the gRPC code; usage: exit 2.
"$ctl" --server "$addr" modules prefetch nope >/dev/null 2>"$tmp/pe"; rc=$?
[ "$rc" = 1 ] || fail "unknown module exit $rc"
grep -q "NOT_FOUND" "$tmp/pe" || fail "unknown module message: $(cat "$tmp/pe")"
"$ctl" --server "$addr" modules prefetch >/dev/null 2>&1; rc=$?
[ "$rc" = 2 ] || fail "missing id exit $rc"

kill -TERM "$pid"; wait "$pid" || fail "server exit code"
pid=

# Cache budgets from `serve --config`: a device tier of 1 byte cannot hold
# m0, so a request through it is RESOURCE_EXHAUSTED naming the flag, and the
# base model still serves.
echo '{"host-cache-bytes": 100000000, "device-cache-bytes": 1}' >"$tmp/config.json"
start_server --model "$case_dir/model" --data-dir "$tmp" --cache-dir "$tmp/hub" \
  --hub-endpoint "http://127.0.0.1:$hub_port" --config "$tmp/config.json"
addr="127.0.0.1:$port"
"$ctl" --server "$addr" generate --module m0 --text hello --max-new-tokens 2 >/dev/null 2>"$tmp/ge"; rc=$?
[ "$rc" = 1 ] || fail "over-budget generate exit $rc"
grep -q "RESOURCE_EXHAUSTED" "$tmp/ge" && grep -q -- "--device-cache-bytes" "$tmp/ge" \
  || fail "over-budget message: $(cat "$tmp/ge")"
"$ctl" --server "$addr" generate base --text hello --max-new-tokens 2 >/dev/null 2>>"$tmp/err" \
  || fail "base generate with a tiny device cache"
"$ctl" --server "$addr" --json modules get m0 >"$tmp/mg" || fail "modules get"
grep -q '"resident":\["disk","host"\]' "$tmp/mg" || fail "resident after refusal: $(cat "$tmp/mg")"
kill -TERM "$pid"; wait "$pid" || fail "server exit code (config)"
pid=
exec 3>&-
echo PASS
