# What the integration tests share, sourced (`. "$(dirname "$0")/harness.sh"`)
# once they have set `lorahub` (and `ctl` for `c`):
#  py              the system python3 (Debian's grpcio and protobuf), else python3
#  tmp             a fresh directory; at exit the server ($pid) and every
#                  process in extra_pids are killed, and tmp removed
#  fail MSG...     "FAIL: MSG" and the last 20 lines of $tmp/err; exit 1
#  start_server FLAGS...
#                  `$lorahub serve FLAGS` with gRPC and metrics on 127.0.0.1,
#                  port 0; stdout to $tmp/out (emptied first, so no earlier
#                  server's port is read), stderr appended to $tmp/err. Waits
#                  up to 30 s for the ports it prints: sets pid, port, mport
#  c ARGS...       lorahubctl against it
py=/usr/bin/python3
[ -x "$py" ] || py=python3
tmp=$(mktemp -d)
pid=
extra_pids=()
harness_cleanup() {
  local p
  for p in "$pid" "${extra_pids[@]}"; do
    [ -n "$p" ] && kill -9 "$p" 2>/dev/null
  done
  rm -rf "$tmp"
}
trap harness_cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  [ -f "$tmp/err" ] && tail -20 "$tmp/err" >&2
  exit 1
}

start_server() {
  : >"$tmp/out"
  "$lorahub" serve --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 "$@" \
    >"$tmp/out" 2>>"$tmp/err" &
  pid=$!
  for _ in $(seq 300); do
    grep -q '^metrics listening on' "$tmp/out" && break  # the last line
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  port=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$tmp/out")
  [ -n "$port" ] || fail "the server did not print its port ($*)"
  mport=$(sed -n 's/^metrics listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$tmp/out")
  [ -n "$mport" ] || fail "the server did not print its metrics port ($*)"
}

c() { "$ctl" --server "127.0.0.1:$port" "$@"; }
