#!/usr/bin/env bash
# Runs every test of the project: installs what is missing, then `bazel test //...`
# (unit tests, golden-parity tests, fuzz-corpus replays, the Bazel/CMake target
# check). GPU tests and long fuzzing are separate (deploy/gpu/, tests/fuzz/).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup_debian.sh
bazel test //... "$@"
