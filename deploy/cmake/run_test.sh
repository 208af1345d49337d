#!/usr/bin/env bash
# CTest wrapper: gives a test what `bazel test` gives it, a fresh empty
# TEST_TMPDIR (set by rules.cmake), then runs the command in the source root.
set -eu
if [ -n "${TEST_TMPDIR:-}" ]; then
  rm -rf "$TEST_TMPDIR"
  mkdir -p "$TEST_TMPDIR"
fi
exec "$@"
