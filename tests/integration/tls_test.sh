#!/usr/bin/env bash
# TLS on the gRPC port, end to end: the real `lorahub serve` on 127.0.0.1
# with certificates made here by openssl(1) (a test CA, a server certificate
# for 127.0.0.1 and localhost, a client certificate, and a second CA that
# signed nothing of the server's), driven by the real lorahubctl:
#   - bad TLS flags are exit 2 before anything loads, naming the flag;
#   - a TLS server answers a client that trusts its CA (health, a golden
#     generation, `load`), and refuses plaintext, other CAs and another name;
#   - with --tls-client-ca it refuses a client without a certificate, or
#     with one its CAs did not sign;
#   - a server certificate replaced on disk (another CA's) is served within
#     --tls-refresh-s, with no restart.
#   tls_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2")
case_dir=$(readlink -f tests/testdata/t5/gated_untied)
. "$(dirname "$0")/harness.sh"
if ! command -v openssl >/dev/null; then
  # Only the GPU host's build_and_test.sh sets this (its image may lack it).
  if [ "${LORAHUB_ALLOW_NO_OPENSSL:-0}" = 1 ]; then
    echo "tls_test: SKIPPED: openssl(1) not found; LORAHUB_ALLOW_NO_OPENSSL=1"
    exit 0
  fi
  fail "openssl(1) not found (Debian package 'openssl')"
fi

# Certificates: EC P-256 keys, valid for two days.
cd "$tmp" || exit 1
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() {  # ca NAME CN
  key "$1.key" && openssl req -x509 -new -key "$1.key" -out "$1.pem" -days 2 -subj "/CN=$2" 2>/dev/null
}
signed() {  # signed NAME CA CN [EXTFILE]
  key "$1.key" && openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=$3" 2>/dev/null &&
    openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
      -out "$1.pem" -days 2 ${4:+-extfile "$4"} 2>/dev/null
}
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >san.ext
ca ca "lorahub test CA" && ca other "another CA" &&
  signed server ca localhost san.ext && signed client ca "lorahub test client" &&
  signed stranger other "a client of another CA" && signed renewed other localhost san.ext ||
  fail "openssl could not make the certificates"
echo "not a certificate" >notpem.txt
cd - >/dev/null || exit 1

# Bad TLS flags: exit 2 before the model loads, the message naming the flag.
bad() {  # bad MESSAGE FLAGS...
  local want=$1; shift
  "$lorahub" serve --model "$case_dir/model" --listen 127.0.0.1:0 "$@" 2>"$tmp/err" >/dev/null
  local rc=$?
  [ $rc = 2 ] || fail "serve $*: exit $rc, want 2"
  grep -qF -- "$want" "$tmp/err" || fail "serve $*: want '$want' in: $(cat "$tmp/err")"
}
bad "--tls-cert and --tls-key go together" --tls-cert "$tmp/server.pem"
bad "--tls-cert and --tls-key go together" --tls-key "$tmp/server.key"
bad "--tls-cert and --tls-key go together" --tls-client-ca "$tmp/ca.pem"
bad "--tls-cert $tmp/missing.pem: No such file" --tls-cert "$tmp/missing.pem" --tls-key "$tmp/server.key"
bad "--tls-key $tmp/notpem.txt: not PEM" --tls-cert "$tmp/server.pem" --tls-key "$tmp/notpem.txt"
bad "--tls-client-ca $tmp: not a regular file" --tls-cert "$tmp/server.pem" --tls-key "$tmp/server.key" --tls-client-ca "$tmp"
bad "--tls-refresh-s must be in [1, 86400]" --tls-cert "$tmp/server.pem" --tls-key "$tmp/server.key" --tls-refresh-s 0
"$ctl" --tls-cert "$tmp/client.pem" health 2>"$tmp/err"
[ $? = 2 ] && grep -q -- "--tls-cert and --tls-key go together" "$tmp/err" || fail "lorahubctl --tls-cert alone"
"$ctl" --tls-ca "$tmp/missing.pem" health 2>"$tmp/err"
[ $? = 2 ] && grep -q -- "--tls-ca $tmp/missing.pem: No such file" "$tmp/err" || fail "lorahubctl --tls-ca missing"

start() {  # start [serve flags...]: a server whose stderr alone is in $tmp/err
  : >"$tmp/err"
  start_server --model "$case_dir/model" --data-dir "$tmp" "$@"
}
stop() {
  kill -TERM "$pid"; wait "$pid"; local rc=$?
  pid=
  [ $rc = 0 ] || fail "server exit code $rc after SIGTERM"
}
refused() {  # refused WHY FLAGS...: health fails with exit 1 (the server's side)
  local why=$1; shift
  c "$@" health >"$tmp/h" 2>"$tmp/e"
  local rc=$?
  [ $rc = 1 ] || fail "$why: exit $rc (want 1): $(cat "$tmp/h" "$tmp/e")"
  grep -q UNAVAILABLE "$tmp/e" || fail "$why: want UNAVAILABLE: $(cat "$tmp/e")"
}

# TLS, any client that trusts the CA.
start --tls-cert "$tmp/server.pem" --tls-key "$tmp/server.key"
grep -q "TLS on the gRPC port" "$tmp/err" || fail "serve did not say TLS is on"
[ "$(c --tls-ca "$tmp/ca.pem" health)" = SERVING ] || fail "health over TLS"
[ "$(c --tls-ca "$tmp/ca.pem" --tls-server-name localhost health)" = SERVING ] ||
  fail "health over TLS, server name localhost"
refused "plaintext to a TLS port"
refused "a server certificate of an untrusted CA" --tls-ca "$tmp/other.pem"
refused "another server name" --tls-ca "$tmp/ca.pem" --tls-server-name lorahub.example
# A greedy generation of the base model, as transformers gives it.
$py -c "
import json, sys
g = json.load(open(sys.argv[1]))
e = [e for e in g['greedy'] if not e['adapters']][0]
ids = e['output_ids'][0]
if 1 in ids: ids = ids[:ids.index(1) + 1]
open(sys.argv[2] + '/text', 'w').write(g['inputs'][0])
open(sys.argv[2] + '/max_new', 'w').write(str(e['max_new_tokens']))
open(sys.argv[2] + '/want', 'w').write(json.dumps(ids))
for t in g['inputs']: print(json.dumps({'input': t}))
" "$case_dir/golden.json" "$tmp" >"$tmp/prompts.jsonl" || fail "golden"
c --tls-ca "$tmp/ca.pem" --json generate base --max-new-tokens "$(cat "$tmp/max_new")" \
  --text "$(cat "$tmp/text")" >"$tmp/gen" || fail "generate over TLS"
$py -c "
import json, sys
end = [json.loads(l) for l in open(sys.argv[1])][-1]
want = json.loads(open(sys.argv[2]).read())
assert end['output_ids'] == want, (end['output_ids'], want)
" "$tmp/gen" "$tmp/want" || fail "generate over TLS: not the golden ids"
# lorahubctl load's channels take the same flags.
c --tls-ca "$tmp/ca.pem" --json load base --requests 6 --concurrency 3 --channels 2 \
  --prompts "$tmp/prompts.jsonl" --max-new-tokens 4 >"$tmp/load" || fail "load over TLS"
$py -c "
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
assert r['ok'] == 6 and r.get('failed', 0) == 0, r
" "$tmp/load" || fail "load over TLS: $(cat "$tmp/load")"
c --json load base --requests 2 --prompts "$tmp/prompts.jsonl" --max-new-tokens 4 \
  --timeout-s 3 >/dev/null 2>"$tmp/e"
[ $? = 1 ] || fail "plaintext load against a TLS port did not fail"
stop

# Mutual TLS: clients need a certificate the given CAs signed.
start --tls-cert "$tmp/server.pem" --tls-key "$tmp/server.key" --tls-client-ca "$tmp/ca.pem"
grep -q "client certificates required" "$tmp/err" || fail "serve did not say it asks for client certificates"
[ "$(c --tls-ca "$tmp/ca.pem" --tls-cert "$tmp/client.pem" --tls-key "$tmp/client.key" health)" = SERVING ] ||
  fail "health with a client certificate"
refused "no client certificate" --tls-ca "$tmp/ca.pem"
refused "a client certificate of another CA" --tls-ca "$tmp/ca.pem" \
  --tls-cert "$tmp/stranger.pem" --tls-key "$tmp/stranger.key"
stop

# Rotation: the files the server reads are replaced (renamed into place, key
# first) by a certificate of the other CA; new connections get it within
# --tls-refresh-s.
cp "$tmp/server.pem" "$tmp/live.pem" && cp "$tmp/server.key" "$tmp/live.key" || fail "cp"
start --tls-cert "$tmp/live.pem" --tls-key "$tmp/live.key" --tls-refresh-s 1
[ "$(c --tls-ca "$tmp/ca.pem" health)" = SERVING ] || fail "health before the rotation"
cp "$tmp/renewed.key" "$tmp/next.key" && cp "$tmp/renewed.pem" "$tmp/next.pem" &&
  mv "$tmp/next.key" "$tmp/live.key" && mv "$tmp/next.pem" "$tmp/live.pem" || fail "mv"
rotated=
for _ in $(seq 50); do
  [ "$(c --tls-ca "$tmp/other.pem" health 2>/dev/null)" = SERVING ] && { rotated=1; break; }
  sleep 0.2
done
[ -n "$rotated" ] || fail "the renewed certificate was not served within 10 s"
refused "the replaced certificate's CA after the rotation" --tls-ca "$tmp/ca.pem"
stop
echo "tls_test: ok"
