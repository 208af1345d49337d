#!/usr/bin/env bash
# Per-RPC metrics through the real server: `lorahub serve` on 127.0.0.1:0
# (gRPC and metrics ports chosen by the server and printed), RPCs of several
# services made with the real lorahubctl with known outcomes, then
#  1. a scrape of the server's /metrics: lorahub_grpc_requests_total{method,
#     code} has exactly the calls made, and the duration histograms count
#     them;
#  2. a real Prometheus (Debian package `prometheus`; $LORAHUB_PROMETHEUS or
#     PATH; a missing binary fails unless LORAHUB_ALLOW_NO_PROMETHEUS=1) scrapes the
#     server and PromQL returns the same counts.
#   grpc_metrics_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2")
case_dir=$(readlink -f tests/testdata/t5/gated_untied)
. "$(dirname "$0")/harness.sh"

start_server --model "$case_dir/model" --data-dir "$tmp"
[ "$mport" != "$port" ] || fail "metrics and gRPC on one port"

# Calls with known outcomes (counts per method and code).
for _ in 1 2 3; do c health >/dev/null || fail health; done          # Check OK x3
c modules add --dir "$case_dir/adapters/m0" >/dev/null || fail add  # AddModule OK
for _ in 1 2; do c modules get nope >/dev/null 2>&1; done           # GetModule NOT_FOUND x2
c modules get m0 >/dev/null || fail get                             # GetModule OK
c generate base --text "" >/dev/null 2>&1                           # Generate INVALID_ARGUMENT
c generate --module m0 --max-new-tokens 4 --text "hello" >/dev/null || fail generate  # Generate OK
c generate --module m0 --max-new-tokens 4 --text "again" >/dev/null || fail generate  # Generate OK
c jobs get nope >/dev/null 2>&1                                     # GetJob NOT_FOUND

# 1. The server's own endpoint.
curl -sf "http://127.0.0.1:$mport/metrics" >"$tmp/scrape" || fail "scrape of /metrics"
$py - "$tmp/scrape" <<'PY' || fail "scraped values"
import re, sys
samples = {}
for line in open(sys.argv[1]):
    m = re.match(r'^(\w+)\{(.*)\} (\S+)$', line.strip())
    if not m: continue
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
    samples[(m.group(1), tuple(sorted(labels.items())))] = float(m.group(3))
def get(name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))
want = {("Check", "OK"): 3, ("AddModule", "OK"): 1, ("GetModule", "NOT_FOUND"): 2,
        ("GetModule", "OK"): 1, ("Generate", "INVALID_ARGUMENT"): 1,
        ("Generate", "OK"): 2, ("GetJob", "NOT_FOUND"): 1}
for (method, code), n in want.items():
    got = get("lorahub_grpc_requests_total", method=method, code=code)
    assert got == n, (method, code, got, n)
for method in ("Check", "AddModule", "GetModule", "Generate", "GetJob"):
    total = sum(n for (m, _), n in want.items() if m == method)
    got = get("lorahub_grpc_request_duration_seconds_count", method=method)
    assert got == total, (method, got, total)
    inf = get("lorahub_grpc_request_duration_seconds_bucket", method=method, le="+Inf")
    assert inf == total, (method, inf, total)
    assert get("lorahub_grpc_request_duration_seconds_sum", method=method) > 0, method
# Labels are bounded: only method and code on the counter.
for (name, labels) in samples:
    if name == "lorahub_grpc_requests_total":
        assert [k for k, _ in labels] == ["code", "method"], labels
print("scrape OK")
PY

# 2. A real Prometheus.
prom=${LORAHUB_PROMETHEUS:-$(command -v prometheus || true)}
if [ -z "$prom" ] || [ ! -x "$prom" ]; then
  kill -TERM "$pid"; wait "$pid"; pid=
  if [ "${LORAHUB_ALLOW_NO_PROMETHEUS:-0}" = 1 ]; then
    echo "SKIP (part 2): no prometheus binary; LORAHUB_ALLOW_NO_PROMETHEUS=1"
    echo PASS
    exit 0
  fi
  echo "FAIL: no prometheus binary (Debian package prometheus; deploy/setup_debian.sh installs it)"
  exit 1
fi
wport=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$tmp/prometheus.yml" <<YML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: lorahub
    static_configs:
      - targets: ["127.0.0.1:$mport"]
YML
"$prom" --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
  --web.listen-address="127.0.0.1:$wport" --log.level=warn >"$tmp/prom.log" 2>&1 &
extra_pids+=($!)
query() {  # query PROMQL -> JSON result
  curl -sf --get "http://127.0.0.1:$wport/api/v1/query" --data-urlencode "query=$1"
}
ok=
for _ in $(seq 60); do
  v=$(query 'lorahub_grpc_requests_total{job="lorahub",method="GetModule",code="NOT_FOUND"}' 2>/dev/null |
      $py -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")' 2>/dev/null)
  [ "$v" = 2 ] && { ok=1; break; }
  sleep 0.5
done
[ -n "$ok" ] || fail "Prometheus never saw GetModule NOT_FOUND = 2 (last '$v'): $(tail -5 "$tmp/prom.log")"
query 'sum by (code) (lorahub_grpc_requests_total{job="lorahub",method="Generate"})' >"$tmp/q1" ||
  fail "PromQL query"
$py - "$tmp/q1" <<'PY' || fail "PromQL values"
import json, sys
r = json.load(open(sys.argv[1]))["data"]["result"]
by = {e["metric"]["code"]: float(e["value"][1]) for e in r}
assert by.get("OK") == 2 and by.get("INVALID_ARGUMENT") == 1, by
assert all(v == 0 for k, v in by.items() if k not in ("OK", "INVALID_ARGUMENT")), by
print("PromQL OK:", by)
PY
query 'histogram_quantile(0.5, sum by (le) (lorahub_grpc_request_duration_seconds_bucket{job="lorahub",method="Generate"}))' |
  $py -c 'import json,sys,math; r=json.load(sys.stdin)["data"]["result"]; v=float(r[0]["value"][1]); assert math.isfinite(v) and v > 0, v; print("Generate p50 s:", v)' ||
  fail "duration quantile"
kill -TERM "$pid"; wait "$pid" || fail "server exit code"
pid=
echo PASS
