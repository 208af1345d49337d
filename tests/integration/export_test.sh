#!/usr/bin/env bash
# ComposeService.ExportTask through the real server and the real lorahubctl:
# a task published by a COBYLA compose job is exported with
# `lorahubctl tasks export NAME --out DIR`, and `lorahub score --adapter DIR`
# on the exported PEFT directory gives the loss of `lorahub score` with the
# task's modules and weights (--adapter each --weights ...), within 1e-6
# relative. Two rank-320 modules (made here: their adapter is larger than
# 1 MiB) are composed by a fixed-weights job and exported too; a Python
# client checks the chunks (<= 1 MiB, contiguous offsets, sha256). Errors:
# NOT_FOUND for an unknown task, INVALID_ARGUMENT for a bad name, and DIR
# keeps no partial or temporary file.
#   export_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2")
fx=$(readlink -f tests/testdata/ref_tiny/tiny_s0)
proto_dir=$(readlink -f proto)
. "$(dirname "$0")/harness.sh"

. "$(dirname "$0")/py_stubs.sh"
make_py_stubs "$proto_dir" "$tmp/py" || fail "protoc"

# Two big modules shaped like m00 (same sites) with rank 320, random factors.
"$py" - "$fx/modules/m00" "$tmp/big" <<'PY' || fail "big modules"
import json, os, struct, sys
import numpy as np
src, out = sys.argv[1], sys.argv[2]
raw = open(src + "/adapter_model.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
cfg = json.load(open(src + "/adapter_config.json"))
R = 320
for k, seed in (("big0", 1), ("big1", 2)):
    rng = np.random.default_rng(seed)
    tensors, meta, off = [], {}, 0
    for key in sorted(x for x in header if x != "__metadata__"):
        shape = list(header[key]["shape"])
        if ".lora_A." in key:
            shape[0] = R
        else:
            shape[1] = R
        t = (rng.standard_normal(shape) * 0.05).astype("<f4").tobytes()
        meta[key] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(t)]}
        tensors.append(t)
        off += len(t)
    h = json.dumps(meta).encode()
    h += b" " * (-len(h) % 8)
    os.makedirs(out + "/" + k)
    with open(out + "/" + k + "/adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(tensors))
    c = dict(cfg, r=R, lora_alpha=2 * R)
    json.dump(c, open(out + "/" + k + "/adapter_config.json", "w"))
PY

start_server --model "$fx/base" --data-dir "$tmp"
jf() { "$py" -c "import json,sys; print(json.loads(sys.stdin.readlines()[-1])$1)"; }

for m in m00 m01 m02; do
  c --json modules add --dir "$fx/modules/$m" --id "$m" >/dev/null || fail "add $m"
done
for m in big0 big1; do
  c --json modules add --dir "$tmp/big/$m" --id "$m" >/dev/null || fail "add $m"
done

# score_loss DIR... [--weights W]: the loss `lorahub score` reports.
score_loss() {
  "$lorahub" score --model "$fx/base" "$@" --examples "$fx/examples.jsonl" --json \
    2>>"$tmp/err" | jf '["loss"]'
}
same() {  # same A B WHAT: |A - B| <= 1e-6 |B|
  "$py" -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); sys.exit(0 if abs(a-b)<=1e-6*abs(b) else 1)" \
    "$1" "$2" || fail "$3: exported loss $1 != modules+weights loss $2"
  echo "$3: exported loss $1, modules+weights loss $2"
}

# A task from a COBYLA job.
c --json compose --task t1 --modules m00,m01,m02 --examples "$fx/examples.jsonl" \
  --budget 8 --wait >"$tmp/watch" 2>>"$tmp/err" || fail "compose t1"
c --json tasks get t1 >"$tmp/t1" || fail "tasks get t1"
w1=$(jf '["weights"]' <"$tmp/t1" | tr -d '[] ')
c --json tasks export t1 --out "$tmp/exp1" >"$tmp/x1" 2>>"$tmp/err" || fail "tasks export t1"
[ "$(jf '["task"]' <"$tmp/x1")" = t1 ] || fail "export json: $(cat "$tmp/x1")"
ls -A "$tmp/exp1" | sort >"$tmp/ls1"
printf 'adapter_config.json\nadapter_model.safetensors\n' | cmp -s - "$tmp/ls1" \
  || fail "export dir holds: $(cat "$tmp/ls1")"
grep -q '"peft_type": *"LORA"' "$tmp/exp1/adapter_config.json" || fail "config: $(cat "$tmp/exp1/adapter_config.json")"
"$py" - "$tmp/x1" "$tmp/exp1" <<'PY' || fail "export json sha256"
import hashlib, json, sys
j = json.loads(open(sys.argv[1]).read())
for f in j["files"]:
    data = open(sys.argv[2] + "/" + f["file"], "rb").read()
    assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"], f
PY
a=$(score_loss --adapter "$tmp/exp1")
b=$(score_loss --adapter "$fx/modules/m00" --adapter "$fx/modules/m01" \
  --adapter "$fx/modules/m02" --weights "$w1")
[ -n "$a" ] && [ -n "$b" ] || fail "score t1: '$a' '$b'"
same "$a" "$b" t1
base_loss=$(score_loss)
"$py" -c "import sys; sys.exit(0 if abs(float(sys.argv[1])-float(sys.argv[2]))>1e-6 else 1)" \
  "$a" "$base_loss" || fail "exported adapter scores like the base model ($a)"

# The big modules: a fixed-weights job, exported in several chunks.
c --json compose --task big --modules big0,big1 --optimizer fixed --weights 0.7,-0.4 \
  --budget 1 --examples "$fx/examples.jsonl" --wait >"$tmp/watch2" 2>>"$tmp/err" \
  || fail "compose big: $(tail -2 "$tmp/watch2")"
c tasks export big --out "$tmp/exp2/nested" >"$tmp/x2" 2>>"$tmp/err" || fail "tasks export big"
grep -q '^exported task big to ' "$tmp/x2" || fail "human output: $(cat "$tmp/x2")"
size=$(stat -c %s "$tmp/exp2/nested/adapter_model.safetensors")
[ "$size" -gt $((1 << 20)) ] || fail "big adapter only $size bytes"
a=$(score_loss --adapter "$tmp/exp2/nested")
b=$(score_loss --adapter "$tmp/big/big0" --adapter "$tmp/big/big1" --weights 0.7,-0.4)
same "$a" "$b" big
PYTHONPATH="$tmp/py" "$py" - "$port" "$tmp/exp2/nested" <<'PY' || fail "chunks"
import hashlib, sys
import grpc
from lorahub.v1 import compose_pb2, compose_pb2_grpc
port, d = sys.argv[1:3]
stub = compose_pb2_grpc.ComposeServiceStub(grpc.insecure_channel("127.0.0.1:" + port))
files, order = {}, []
for ch in stub.ExportTask(compose_pb2.ExportTaskRequest(name="big"), timeout=60):
    assert len(ch.data) <= 1 << 20, len(ch.data)
    if ch.file not in files:
        files[ch.file] = bytearray()
        order.append(ch.file)
    buf = files[ch.file]
    assert ch.offset == len(buf), (ch.file, ch.offset, len(buf))
    buf += ch.data
    assert ch.file_size >= len(buf)
    assert bool(ch.sha256) == ch.last, ch.file
    if ch.last:
        assert len(buf) == ch.file_size and hashlib.sha256(buf).hexdigest() == ch.sha256
assert order == ["adapter_config.json", "adapter_model.safetensors"], order
assert len(files["adapter_model.safetensors"]) > 1 << 20
# The same bytes as lorahubctl wrote (the export is deterministic).
for f in order:
    assert open(d + "/" + f, "rb").read() == bytes(files[f]), f
for name, code in (("nope", grpc.StatusCode.NOT_FOUND), ("a/b", grpc.StatusCode.INVALID_ARGUMENT),
                   ("", grpc.StatusCode.INVALID_ARGUMENT)):
    try:
        list(stub.ExportTask(compose_pb2.ExportTaskRequest(name=name), timeout=10))
        raise SystemExit("export of %r accepted" % name)
    except grpc.RpcError as e:
        assert e.code() == code, (name, e.code())
print("chunks OK")
PY

# Errors through lorahubctl: exit 1 with the code; nothing left in DIR.
c tasks export nope --out "$tmp/exp3" 2>"$tmp/e"; rc=$?
[ "$rc" = 1 ] && grep -q 'NOT_FOUND' "$tmp/e" || fail "unknown task: rc $rc $(cat "$tmp/e")"
[ -z "$(ls -A "$tmp/exp3")" ] || fail "failed export left files: $(ls -A "$tmp/exp3")"
c tasks export '..' --out "$tmp/exp3" 2>"$tmp/e"; rc=$?
[ "$rc" = 1 ] && grep -q 'INVALID_ARGUMENT: name' "$tmp/e" || fail "bad name: rc $rc $(cat "$tmp/e")"
c tasks export t1 >/dev/null 2>&1; rc=$?
[ "$rc" = 2 ] || fail "missing --out: exit $rc"
# A module of the task that is gone: FAILED_PRECONDITION.
c modules rm m02 || fail "modules rm"
c tasks export t1 --out "$tmp/exp4" 2>"$tmp/e"; rc=$?
[ "$rc" = 1 ] && grep -q "FAILED_PRECONDITION: task 't1': module 'm02'" "$tmp/e" \
  || fail "deleted module: rc $rc $(cat "$tmp/e")"

kill -TERM "$pid"; wait "$pid" || fail "server exit code"
pid=
echo PASS
