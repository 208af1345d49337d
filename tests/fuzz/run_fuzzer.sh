#!/usr/bin/env bash
# Builds one fuzz target with clang + libFuzzer + ASan/UBSan and runs it.
#   tests/fuzz/run_fuzzer.sh NAME [SECONDS] [extra libFuzzer flags...]
# NAME is a fuzz target (see FUZZ_SOURCES below). New inputs that increase
# coverage are written to tests/fuzz/corpus/NAME/; crashes to /tmp/fuzz-NAME/.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=${1:?usage: run_fuzzer.sh NAME [SECONDS]}
seconds=${2:-600}
shift $(( $# >= 2 ? 2 : 1 ))

# Sources of each target besides tests/fuzz/NAME_fuzz.cc (torch-free readers).
declare -A FUZZ_SOURCES=(
)
declare -A FUZZ_LIBS=(
)
[ -n "${FUZZ_SOURCES[$name]+x}" ] || { echo "unknown fuzz target $name" >&2; exit 2; }

out=/tmp/fuzz-$name
mkdir -p "$out" "tests/fuzz/corpus/$name"
clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I. "tests/fuzz/${name}_fuzz.cc" ${FUZZ_SOURCES[$name]} ${FUZZ_LIBS[$name]:-} -o "$out/fuzzer"
cd "$out"
./fuzzer -max_total_time="$seconds" -rss_limit_mb=2048 -artifact_prefix="$out/" "$@" \
  "$OLDPWD/tests/fuzz/corpus/$name" 2>&1 | tee "$out/log" | grep -E '^#[0-9]+.*(DONE|pulse)|ERROR|SUMMARY|Done' || true
grep -E 'Done [0-9]+ runs' "$out/log" || { echo "fuzzer $name failed, see $out" >&2; exit 1; }
