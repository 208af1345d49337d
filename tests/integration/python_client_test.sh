#!/usr/bin/env bash
# A second client in another language: Python (Debian's python3-grpcio) with
# stubs generated from proto/ at test time does one Generate stream against
# the real server and checks the golden ids.
#   python_client_test.sh LORAHUB
# Tools: see py_stubs.sh (LORAHUB_PROTOC, LORAHUB_GRPC_PYTHON_PLUGIN,
# LORAHUB_PYTHON overrides; PATH; the GPU host's .gpu/prefix/usr/bin).
set -uo pipefail
lorahub=$(readlink -f "$1")
case_dir=$(readlink -f tests/testdata/t5/gated_untied)
proto_dir=$(readlink -f proto)
. "$(dirname "$0")/harness.sh"

# Finds protoc, grpc_python_plugin and a Python with grpc; makes $tmp/py.
. "$(dirname "$0")/py_stubs.sh"
make_py_stubs "$proto_dir" "$tmp/py" || fail "protoc"

start_server --model "$case_dir/model" --data-dir "$tmp"

PYTHONPATH="$tmp/py" "$py" - "$port" "$case_dir" <<'PY' || fail "python client"
import json, sys
import grpc
from lorahub.v1 import inference_pb2, inference_pb2_grpc, modules_pb2, modules_pb2_grpc, common_pb2

port, case_dir = sys.argv[1], sys.argv[2]
g = json.load(open(case_dir + "/golden.json"))
channel = grpc.insecure_channel("127.0.0.1:" + port)
modules = modules_pb2_grpc.ModuleServiceStub(channel)
m = modules.AddModule(modules_pb2.AddModuleRequest(local_dir=case_dir + "/adapters/m0"), timeout=60)
assert m.id == "m0" and m.rank == 4, m
want = next(e for e in g["greedy"] if e["adapters"] == ["m0"])
inference = inference_pb2_grpc.InferenceServiceStub(channel)
req = inference_pb2.GenerateRequest(
    adapter=common_pb2.AdapterRef(module_id="m0"), text=g["inputs"][1],
    options=common_pb2.DecodingOptions(max_new_tokens=want["max_new_tokens"]))
streamed, end = [], None
for msg in inference.Generate(req, timeout=60):
    if msg.HasField("tokens"):
        streamed.extend(msg.tokens.ids)
    else:
        end = msg.end
ids = want["output_ids"][1]
if 1 in ids: ids = ids[:ids.index(1) + 1]
assert list(end.output_ids) == ids, (list(end.output_ids), ids)
assert streamed == ids
try:
    inference.Generate(inference_pb2.GenerateRequest(text=""), timeout=10).next()
    raise SystemExit("empty text accepted")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
print("python client OK")
PY
kill -TERM "$pid"; wait "$pid" || fail "exit code"
pid=
echo PASS
