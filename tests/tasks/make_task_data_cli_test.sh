#!/bin/bash
# make_task_data as a user runs it: exit codes 0 / 2 and one-line messages.
set -u
BIN="$1"
OUT="${TEST_TMPDIR:-/tmp}/cli"
fail() { echo "FAIL: $*"; exit 1; }

expect_usage_error() {
  local err
  err=$("$BIN" "$@" 2>&1 >/dev/null)
  local rc=$?
  [ "$rc" -eq 2 ] || fail "'$*' exited $rc, expected 2"
  [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] || fail "'$*' printed more than one line: $err"
  case "$err" in make_task_data:*) ;; *) fail "'$*' message lacks prefix: $err" ;; esac
}

expect_usage_error
expect_usage_error --bogus
expect_usage_error --out "$OUT" --seed nope
expect_usage_error --out "$OUT" --train-per-task 0
expect_usage_error --out "$OUT" --test-per-task
expect_usage_error --out "$OUT" extra

"$BIN" --out "$OUT" --seed 3 --train-per-task 4 --test-per-task 2 2>/dev/null || fail "valid run failed"
for f in base_train.jsonl corpus.txt tasks.json pool/add.jsonl pool_test/add.jsonl \
         heldout/rotate_left_3/examples5.jsonl heldout/rotate_left_3/test.jsonl; do
  [ -s "$OUT/$f" ] || fail "missing or empty $f"
done
[ "$(wc -l < "$OUT/pool/add.jsonl")" -eq 4 ] || fail "pool/add.jsonl should have 4 lines"
[ "$(wc -l < "$OUT/heldout/rotate_left_3/test.jsonl")" -eq 2 ] || fail "test.jsonl should have 2 lines"

LIST=$("$BIN" --list) || fail "--list failed"
[ "$(printf '%s\n' "$LIST" | grep -c '^heldout ')" -ge 5 ] || fail "fewer than 5 held-out tasks listed"
echo PASS
