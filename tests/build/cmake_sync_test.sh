#!/usr/bin/env bash
# Fails when deploy/cmake/targets.cmake is out of step with the Bazel BUILD
# files (a source, target or test in one build and not the other), or when a
# hand-written CMake file names a source. Fix: deploy/cmake/sync_check.py --write
set -euo pipefail
# $0 is a symlink in the runfiles tree (Bazel) or the file itself (CTest);
# either way it resolves into the source tree, which holds every BUILD file.
root=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
[ -f "$root/WORKSPACE" ] || { echo "cannot find the source tree (got $root)" >&2; exit 2; }
py=/usr/bin/python3
[ -x "$py" ] || py=python3
exec "$py" "$root/deploy/cmake/sync_check.py" --root "$root"
