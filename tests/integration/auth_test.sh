#!/usr/bin/env bash
# Bearer tokens end to end: `lorahub serve --auth-token-file` on 127.0.0.1
# refuses every method of every lorahub.v1 service (enumerated from the
# proto descriptors by a Python client) with UNAUTHENTICATED without a token
# or with a wrong one, and serves it with an accepted one; health stays
# open; lorahubctl sends the token from --token-file or $LORAHUB_TOKEN;
# the refusals are counted by code; bad token files are exit 2 naming the
# line; SIGHUP rereads the token file (a malformed one keeps the tokens in
# use).
#   auth_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2")
case_dir=$(readlink -f tests/testdata/t5/gated_untied)
proto_dir=$(readlink -f proto)
. "$(dirname "$0")/harness.sh"

. "$(dirname "$0")/py_stubs.sh"
make_py_stubs "$proto_dir" "$tmp/py" >/dev/null || fail "protoc"

good=tok-0123456789abcdef-good
other=tok-0123456789abcdef-other
printf '# tokens for the test\n\n  %s\n%s\n' "$other" "$good" >"$tmp/tokens"
printf '%s\nshort\n' "$good" >"$tmp/bad_tokens"
"$lorahub" serve --model "$case_dir/model" --auth-token-file "$tmp/bad_tokens" 2>"$tmp/e"
[ $? = 2 ] && grep -q -- "--auth-token-file $tmp/bad_tokens:2: a token is 16 to 4096 characters" "$tmp/e" \
  || fail "bad token file: $(cat "$tmp/e")"
"$lorahub" serve --model "$case_dir/model" --auth-token-file "$tmp/none" 2>"$tmp/e"
[ $? = 2 ] || fail "missing token file: $(cat "$tmp/e")"

start_server --model "$case_dir/model" --auth-token-file "$tmp/tokens" --data-dir "$tmp"
grep -q "lorahub.v1 calls need a bearer token (2 accepted)" "$tmp/err" || fail "no auth line"

# lorahubctl: no token, a wrong one, the flag, the environment.
c info 2>"$tmp/e"
[ $? = 1 ] && grep -q "UNAUTHENTICATED: this server needs a bearer token" "$tmp/e" || fail "no token: $(cat "$tmp/e")"
[ "$(c health)" = SERVING ] || fail "health needs no token"
echo "$other-x" >"$tmp/wrong"
c --token-file "$tmp/wrong" info 2>"$tmp/e"
[ $? = 1 ] && grep -q "UNAUTHENTICATED: the bearer token is not accepted" "$tmp/e" || fail "wrong token: $(cat "$tmp/e")"
grep -q -- "$other" "$tmp/e" && fail "the error echoes the token"
c --token-file "$tmp/tokens" --json info | grep -q '"version"' || fail "info with --token-file (first token)"
LORAHUB_TOKEN=$good c --json modules add --dir "$case_dir/adapters/m0" >/dev/null || fail "LORAHUB_TOKEN"
LORAHUB_TOKEN=$good c --json generate --module m0 --max-new-tokens 3 --text hi >/dev/null \
  || fail "generate with a token"
c --token-file "$tmp/bad_tokens" info 2>"$tmp/e"
[ $? = 2 ] || fail "lorahubctl with a bad token file: $(cat "$tmp/e")"

# Every method of every lorahub.v1 service, called with an empty request.
PYTHONPATH="$tmp/py" "$py" - "$port" "$good" "$other" <<'PY' || fail "python sweep"
import sys
import grpc
from lorahub.v1 import compose_pb2, inference_pb2, info_pb2, modules_pb2
port, good, other = sys.argv[1:4]
channel = grpc.insecure_channel("127.0.0.1:" + port)
def call(service, m, metadata):
    path = "/%s/%s" % (service.full_name, m.name)
    try:
        if m.server_streaming:
            for _ in channel.unary_stream(path)(b"", metadata=metadata, timeout=30):
                pass
        else:
            channel.unary_unary(path)(b"", metadata=metadata, timeout=30)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
n = 0
for module in (compose_pb2, inference_pb2, info_pb2, modules_pb2):
    for service in module.DESCRIPTOR.services_by_name.values():
        for m in service.methods:
            for md in (None, [("authorization", "Bearer " + good + "x")],
                       [("authorization", good)]):
                got = call(service, m, md)
                assert got == grpc.StatusCode.UNAUTHENTICATED, (m.full_name, md, got)
            got = call(service, m, [("authorization", "Bearer " + other)])
            assert got != grpc.StatusCode.UNAUTHENTICATED, (m.full_name, got)
            n += 1
assert n >= 18, n
print("methods refused without a token and served with one:", n)
PY
unauth=$(curl -s "http://127.0.0.1:$mport/metrics" | awk '$1 ~ /^lorahub_grpc_requests_total\{.*code="UNAUTHENTICATED"/ {s += $2} END {print s + 0}')
# 18 methods x 3 refusals, and lorahubctl without a token and with a wrong one.
[ "$unauth" = 56 ] || fail "UNAUTHENTICATED calls counted: $unauth"

# Rotation: SIGHUP rereads the file; the old tokens are refused from then on.
reloaded() {  # reloaded N LINE: waits for the Nth "SIGHUP:" line, which must match LINE
  for _ in $(seq 100); do [ "$(grep -c 'SIGHUP:' "$tmp/err")" -ge "$1" ] && break; sleep 0.1; done
  grep 'SIGHUP:' "$tmp/err" | sed -n "$1p" | grep -q -- "$2" || fail "SIGHUP $1: not '$2'"
}
rotated=tok-0123456789abcdef-rotated
echo "$rotated" >"$tmp/tokens"
kill -HUP "$pid"
reloaded 1 "SIGHUP: 1 bearer tokens accepted from now on"
LORAHUB_TOKEN=$rotated c info >/dev/null || fail "the rotated token"
LORAHUB_TOKEN=$good c info 2>"$tmp/e"
[ $? = 1 ] && grep -q "the bearer token is not accepted" "$tmp/e" || fail "an old token after SIGHUP"
printf '%s\nshort\n' "$good" >"$tmp/tokens"
kill -HUP "$pid"
reloaded 2 "SIGHUP: kept the 1 tokens in use: --auth-token-file $tmp/tokens:2: a token is 16"
LORAHUB_TOKEN=$rotated c info >/dev/null || fail "the token in use after a bad file"
LORAHUB_TOKEN=$good c info 2>/dev/null && fail "a bad file's token accepted"
kill -TERM "$pid"; wait "$pid" || fail "serve exit code"; pid=
echo "PASS ($unauth refusals counted)"
