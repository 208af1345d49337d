#!/usr/bin/env bash
# `lorahub serve --model ORG/NAME[@REVISION]` against the local hub emulator
# (tests/hub/hub_emulator.py): the base model snapshot is downloaded into the
# HF cache layout (--cache-dir, --hub-endpoint) and served; greedy tokens from
# the server equal `lorahub generate` on the fixture directory. Also: a pinned
# revision (an older commit holding another model), a sharded checkpoint
# (model.safetensors.index.json + 2 shards), a pytorch_model.bin checkpoint
# (torch.save by Debian's python3-torch), HF_HUB_OFFLINE=1 serving from the
# cache without a request, and refusals with exit code 2 for a repo id with
# "..", an absolute path that is not a directory, a spec that is neither a
# directory nor ORG/NAME, and an unknown repo.
#   hub_model_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2")
main_model=$(readlink -f tests/testdata/t5/gated_untied/model)
old_model=$(readlink -f tests/testdata/ref_tiny/tiny_s0/base)
emulator=$(readlink -f tests/hub/hub_emulator.py)
py=/usr/bin/python3
tmp=$(mktemp -d)
pid=; epid=
cleanup() {
  [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
  [ -n "$epid" ] && kill -9 "$epid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; tail -20 "$tmp/err" >&2 2>/dev/null; exit 1; }
c_main=$(printf 'c%.0s' $(seq 40)); c_old=$(printf 'a%.0s' $(seq 40)); c_sh=$(printf 'b%.0s' $(seq 40))
c_bin=$(printf 'd%.0s' $(seq 40))

# Fixture: lorahub/tiny-t5 (main: gated_untied; an older commit: tiny_s0's
# base), lorahub/tiny-t5-sharded (gated_untied split into two shards) and
# lorahub/tiny-t5-bin (gated_untied as pytorch_model.bin).
"$py" - "$main_model" "$old_model" "$tmp/fixture.json" "$c_main" "$c_old" "$c_sh" "$c_bin" <<'PY' || fail "fixture"
import io, json, os, struct, sys
import numpy as np
import torch
main, old, out, c_main, c_old, c_sh, c_bin = sys.argv[1:8]
def files(d, skip=()):
    r = {}
    for f in sorted(os.listdir(d)):
        if f in skip:
            continue
        data = open(os.path.join(d, f), "rb").read()
        lfs = f.endswith(".safetensors") or f.endswith(".model")
        r[f] = {"hex": data.hex(), "lfs": lfs} if lfs else {"text": data.decode()}
    return r
# Split model.safetensors into two shards (tensors alternate) + an index.
raw = open(main + "/model.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
body = raw[8 + n:]
names = sorted(k for k in header if k != "__metadata__")
sharded = files(main, skip=("model.safetensors",))
weight_map = {}
for i in range(2):
    shard = "model-%05d-of-00002.safetensors" % (i + 1)
    meta, blobs, off = {}, [], 0
    for k in names[i::2]:
        a, b = header[k]["data_offsets"]
        meta[k] = {"dtype": header[k]["dtype"], "shape": header[k]["shape"],
                   "data_offsets": [off, off + (b - a)]}
        blobs.append(body[a:b]); off += b - a
        weight_map[k] = shard
    h = json.dumps(meta).encode(); h += b" " * (-len(h) % 8)
    sharded[shard] = {"hex": (struct.pack("<Q", len(h)) + h + b"".join(blobs)).hex(), "lfs": True}
sharded["model.safetensors.index.json"] = {"text": json.dumps(
    {"metadata": {"total_size": len(body)}, "weight_map": weight_map})}
state = {}
for k in names:
    a, b = header[k]["data_offsets"]
    assert header[k]["dtype"] == "F32", k
    state[k] = torch.from_numpy(np.frombuffer(body[a:b], dtype="<f4").copy()).reshape(header[k]["shape"])
buf = io.BytesIO()
torch.save(state, buf)
as_bin = files(main, skip=("model.safetensors",))
as_bin["pytorch_model.bin"] = {"hex": buf.getvalue().hex(), "lfs": True}
json.dump({"repos": {
    "lorahub/tiny-t5-bin": {"refs": {"main": c_bin}, "commits": {c_bin: {"files": as_bin}}},
    "lorahub/tiny-t5": {"refs": {"main": c_main},
                        "commits": {c_main: {"files": files(main)},
                                    c_old: {"files": files(old)}}},
    "lorahub/tiny-t5-sharded": {"refs": {"main": c_sh},
                                "commits": {c_sh: {"files": sharded}}}}},
    open(out, "w"))
PY
mkfifo "$tmp/emu_in"
"$py" "$emulator" --fixture "$tmp/fixture.json" <"$tmp/emu_in" >"$tmp/emu_out" 2>>"$tmp/err" &
epid=$!
exec 3>"$tmp/emu_in"  # the emulator runs until this closes
for _ in $(seq 100); do [ -s "$tmp/emu_out" ] && break; sleep 0.1; done
read -r _ hub_port _ <"$tmp/emu_out"
[ -n "$hub_port" ] || fail "emulator did not start"
hub="http://127.0.0.1:$hub_port"
requests() {
  "$py" -c "import json,urllib.request; print(len(json.load(urllib.request.urlopen('$hub/_admin/log'))))"
}

text="hello world"
expect() {  # expect MODEL_DIR -> greedy output ids of `lorahub generate`
  "$lorahub" generate --model "$1" --text "$text" --max-new-tokens 8 --json |
    "$py" -c "import json,sys; print(json.loads(sys.stdin.read())['output_ids'])"
}
want_main=$(expect "$main_model"); want_old=$(expect "$old_model")
[ -n "$want_main" ] && [ "$want_main" != "$want_old" ] || fail "fixture models must differ: $want_main / $want_old"

# serve_and_generate SPEC [env...]: starts the server on SPEC, sets $got to
# the server's greedy ids for $text, checks `info`, stops it.
serve_and_generate() {
  local spec=$1; shift
  : >"$tmp/out"
  env "$@" "$lorahub" serve --model "$spec" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --data-dir "$tmp" --cache-dir "$tmp/hub" --hub-endpoint "$hub" >"$tmp/out" 2>>"$tmp/err" &
  pid=$!
  for _ in $(seq 300); do grep -q '^listening on' "$tmp/out" && break; sleep 0.1; done
  local port
  port=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$tmp/out")
  [ -n "$port" ] || fail "server on $spec did not start"
  "$ctl" --server "127.0.0.1:$port" --json info | grep -q "\"base_model\":\"$spec\"" \
    || fail "info base_model for $spec"
  "$ctl" --server "127.0.0.1:$port" --json generate base --text "$text" --max-new-tokens 8 |
    tail -1 | "$py" -c "import json,sys; print(json.loads(sys.stdin.read())['output_ids'])" \
    >"$tmp/got" || fail "generate on $spec"
  got=$(cat "$tmp/got")
  kill -TERM "$pid"; wait "$pid" || fail "server on $spec exit code"
  pid=
}

serve_and_generate lorahub/tiny-t5
[ "$got" = "$want_main" ] || fail "lorahub/tiny-t5 gave $got, want $want_main"
snap="$tmp/hub/models--lorahub--tiny-t5/snapshots/$c_main"
for f in config.json spiece.model model.safetensors generation_config.json tokenizer_config.json; do
  [ -L "$snap/$f" ] && [ -f "$snap/$f" ] || fail "cache: no $snap/$f"
  cmp -s "$snap/$f" "$main_model/$f" || fail "cache: $f differs"
done
[ "$(cat "$tmp/hub/models--lorahub--tiny-t5/refs/main")" = "$c_main" ] || fail "refs/main"

# Offline: the cached snapshot serves, and the hub sees no request.
before=$(requests)
serve_and_generate lorahub/tiny-t5 HF_HUB_OFFLINE=1
[ "$got" = "$want_main" ] || fail "offline gave $got"
[ "$(requests)" = "$before" ] || fail "offline serve made hub requests"

serve_and_generate "lorahub/tiny-t5@$c_old"
[ "$got" = "$want_old" ] || fail "@$c_old gave $got, want $want_old"
[ -f "$tmp/hub/models--lorahub--tiny-t5/snapshots/$c_old/model.safetensors" ] || fail "old snapshot"

serve_and_generate lorahub/tiny-t5-sharded
[ "$got" = "$want_main" ] || fail "sharded gave $got, want $want_main"
ssnap="$tmp/hub/models--lorahub--tiny-t5-sharded/snapshots/$c_sh"
for f in model.safetensors.index.json model-00001-of-00002.safetensors model-00002-of-00002.safetensors; do
  [ -f "$ssnap/$f" ] || fail "sharded cache: no $f"
done
[ -e "$ssnap/model.safetensors" ] && fail "sharded repo has no model.safetensors"

serve_and_generate lorahub/tiny-t5-bin
[ "$got" = "$want_main" ] || fail "pytorch_model.bin gave $got, want $want_main"
[ -f "$tmp/hub/models--lorahub--tiny-t5-bin/snapshots/$c_bin/pytorch_model.bin" ] || fail "bin cache"

# Refusals: exit 2, and nothing asked of the hub for the malformed ones.
refuse() {  # refuse SPEC WHAT -> exit code 2 and a message
  "$lorahub" serve --model "$1" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --data-dir "$tmp" --cache-dir "$tmp/hub" --hub-endpoint "$hub" >/dev/null 2>"$tmp/e"
  local rc=$?
  [ "$rc" = 2 ] || fail "$2 ($1): exit $rc, want 2: $(cat "$tmp/e")"
  grep -q "lorahub serve: " "$tmp/e" || fail "$2: no message"
}
before=$(requests)
refuse "lorahub/../etc" "repo id with .."
refuse "../lorahub/tiny-t5" "relative .."
refuse "lorahub/tiny-t5@../x" "revision with .."
refuse "$tmp/no/such/dir" "absolute path"
refuse "a/b/c" "neither directory nor repo id"
refuse "lorahub/tiny-t5@" "empty revision"
[ "$(requests)" = "$before" ] || fail "a refused spec reached the hub"
refuse "lorahub/nope" "unknown repo"
grep -q "nope" "$tmp/e" || fail "unknown repo message: $(cat "$tmp/e")"

exec 3>&-
echo PASS
