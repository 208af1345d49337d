#!/usr/bin/env bash
# `lorahub inspect` end to end: real binary, real fixtures, exit codes.
#   inspect_test.sh LORAHUB_BINARY
set -uo pipefail
lorahub=$1
fail() { echo "FAIL: $*" >&2; exit 1; }

out=$("$lorahub" inspect --path tests/testdata/t5/bf16_sharded/model --json) || fail "sharded model: exit $?"
echo "$out" | grep -q '"parameters":96896' || fail "sharded model: wrong parameter count: $out"
echo "$out" | grep -q '"dtype":"BF16"' || fail "sharded model: dtype not BF16"

out=$("$lorahub" inspect --path tests/testdata/ref_tiny/tiny_s2/modules/m00) || fail "bin adapter: exit $?"
echo "$out" | grep -q '^24 tensors' || fail "bin adapter: expected 24 tensors (q,v x A,B x 2 layers x 3 attentions): $(echo "$out" | tail -1)"

err=$("$lorahub" inspect --path tests/testdata/torch_bin/evil_system.bin 2>&1 >/dev/null)
rc=$?
[ $rc -eq 2 ] || fail "hostile pickle: exit $rc, want 2"
echo "$err" | grep -q "disallowed global 'posix.system'" || fail "hostile pickle: message: $err"
[ $(echo "$err" | wc -l) -eq 1 ] || fail "hostile pickle: error is not one line: $err"

"$lorahub" inspect --path /nonexistent 2>/dev/null; rc=$?
[ $rc -eq 2 ] || fail "missing path: exit $rc, want 2"
"$lorahub" inspect --bogus 2>/dev/null; rc=$?
[ $rc -eq 2 ] || fail "bad flag: exit $rc, want 2"
echo PASS
