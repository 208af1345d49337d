#!/usr/bin/env bash
# Run ON THE GPU HOST from anywhere in the repository (no Bazel, no apt, no
# network there). Needs .gpu/debs/ from deploy/gpu/fetch_debs.sh. It
#  1. unpacks .gpu/debs/*.deb with dpkg -x into the prefix (.gpu/prefix), and
#     from .gpu/debs/base/ only the libraries the host does not have;
#  2. configures deploy/cmake with ninja against the PyTorch install's CUDA
#     LibTorch (torch.utils.cmake_prefix_path) and the prefix for the rest;
#  3. builds everything, checks that the project's libraries and headers came
#     from the prefix, and that CTest has exactly the Bazel tests;
#  4. runs ctest --output-on-failure.
# Logs go to .gpu/logs/ and, if $OUT is set, to $OUT/. Exit status: ctest's.
#
# Environment: LORAHUB_DEPS_PREFIX (default .gpu/prefix), BUILD_DIR (default
# .gpu/build), JOBS (default nproc), PYTHON (default python3), CTEST_ARGS
# (extra ctest arguments, e.g. "-R //tests/core"), LORAHUB_PREFER_HOST_LIBS=0
# (use every base library from the .debs, even where the host has one),
# NINJA_TARGETS (CMake targets to build, e.g. "server_lorahub
# tests_model_generate_test"; default everything; CTEST_ARGS must then select
# only tests among them), LORAHUB_CUDA (default ON).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
prefix=${LORAHUB_DEPS_PREFIX:-$root/.gpu/prefix}
build=${BUILD_DIR:-$root/.gpu/build}
logs=$root/.gpu/logs
jobs=${JOBS:-$(nproc)}
py=${PYTHON:-python3}
mkdir -p "$logs"
: > "$logs/summary.log"
# Each line ends with the seconds since the start: where a call's time goes.
say() { echo "== $* [${SECONDS} s]" | tee -a "$logs/summary.log"; }
save_logs() {
  [ -f "$build/Testing/Temporary/LastTest.log" ] && cp "$build/Testing/Temporary/LastTest.log" "$logs/"
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && cp -r "$logs/." "$OUT/"; fi
}
trap save_logs EXIT

ls .gpu/debs/*.deb >/dev/null 2>&1 || { echo "no .gpu/debs/*.deb: run deploy/gpu/fetch_debs.sh on the dev machine and carry .gpu/debs" >&2; exit 2; }
libdir=$prefix/usr/lib/x86_64-linux-gnu
unpack() {  # unpack DEB DIR: dpkg -x, or ar + tar where dpkg is missing
  if command -v dpkg >/dev/null; then dpkg -x "$1" "$2"; return; fi
  local t; t=$(mktemp -d)
  (cd "$t" && ar x "$OLDPWD/$1" && tar -xf data.tar.* -C "$2")
  rm -rf "$t"
}

say "start"
# 1. The prefix, rebuilt when the set of .deb files changes.
stamp=$( (ls .gpu/debs/*.deb .gpu/debs/base/*.deb 2>/dev/null; echo "host=${LORAHUB_PREFER_HOST_LIBS:-1}") | md5sum | cut -d' ' -f1)
if [ "$(cat "$prefix/.stamp" 2>/dev/null)" != "$stamp" ]; then
  say "unpacking $(ls .gpu/debs/*.deb | wc -l) packages into $prefix"
  rm -rf "$prefix" && mkdir -p "$prefix"
  for d in .gpu/debs/*.deb; do unpack "$d" "$prefix"; done
  base=$(mktemp -d)
  "$(command -v ldconfig || echo /sbin/ldconfig)" -p > "$base/.ldconfig"
  for d in .gpu/debs/base/*.deb; do [ -e "$d" ] && unpack "$d" "$base"; done
  # Base libraries: keep the host's where it has that soname, else Debian's.
  used_host=() ; used_deb=()
  while IFS= read -r lib; do
    soname=$(objdump -p "$lib" 2>/dev/null | awk '/SONAME/ {print $2}')
    [ -n "$soname" ] || continue
    host=$(awk -v s="$soname" '$1 == s && /x86-64/ && !f {print $NF; f = 1}' "$base/.ldconfig")
    if [ -n "$host" ] && [ "${LORAHUB_PREFER_HOST_LIBS:-1}" != 0 ]; then
      used_host+=("$soname")
      # Link libraries (libz.so -> libz.so.1.2.13) of the -dev packages then
      # point at the host's copy.
      echo "$(basename "$lib") $host" >> "$base/.host_map"
    else
      used_deb+=("$soname")
      mkdir -p "$libdir"
      cp -a "$lib" "$libdir/"
      [ "$(basename "$lib")" = "$soname" ] || ln -sfn "$(basename "$lib")" "$libdir/$soname"
    fi
  done < <(find "$base" -type f -name 'lib*.so*')
  # Absolute symlinks of the .debs (libz.so -> /lib/...) point into the prefix,
  # or to the host's library where that one is used.
  while IFS= read -r link; do
    target=$(readlink "$link")
    name=$(basename "$target")
    host=$(awk -v n="$name" '$1 == n && !f {print $2; f = 1}' "$base/.host_map" 2>/dev/null || true)
    if [ -n "$host" ]; then
      ln -sfn "$host" "$link"
    elif [[ $target == /* ]]; then
      ln -sfn "$prefix$target" "$link"
    fi
  done < <(find "$prefix" -type l)
  # Links still dangling (libsystemd.so -> libsystemd.so.0.35.0 whose package
  # was not fetched): the host's library with that name or a shorter version.
  while IFS= read -r link; do
    name=$(basename "$(readlink "$link")")
    host=$(awk -v n="$name" '$1 == n && !f {print $2; f = 1}' "$base/.host_map" 2>/dev/null || true)
    while [ -z "$host" ] && [[ $name == *.so.* ]]; do
      host=$(awk -v s="$name" '$1 == s && /x86-64/ && !f {print $NF; f = 1}' "$base/.ldconfig")
      name=${name%.*}
    done
    if [ -n "$host" ]; then ln -sfn "$host" "$link"; fi
  done < <(find "$prefix" -xtype l)
  rm -rf "$base"
  say "base libraries from the host: ${used_host[*]:-none}"
  say "base libraries from .deb: ${used_deb[*]:-none}"
  dangling=$(find "$prefix" -xtype l -name '*.so*' | sed "s|$prefix||" | tr '\n' ' ')
  [ -z "$dangling" ] || say "warning: dangling library links: $dangling"
  echo "$stamp" > "$prefix/.stamp"
fi

# 2. Configure. LibTorch from the installed PyTorch (the CUDA build there).
torch_prefix=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)
say "LibTorch cmake prefix: ${torch_prefix:-none (system LibTorch)}"
say "$(cmake --version | head -1), ninja $(ninja --version), $(${CXX:-c++} --version | head -1)"
command -v nvcc >/dev/null || { [ -x /usr/local/cuda/bin/nvcc ] && export PATH=$PATH:/usr/local/cuda/bin; }
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# LORAHUB_CUDA=ON: a CUDA-only source that does not compile fails the
# build instead of leaving its target on the CPU stubs (deploy/cmake/README.md).
cmake -S deploy/cmake -B "$build" -G Ninja \
  -DLORAHUB_CUDA="${LORAHUB_CUDA:-ON}" \
  -DLORAHUB_DEPS_PREFIX="$prefix" \
  ${torch_prefix:+-DCMAKE_PREFIX_PATH="$torch_prefix" -DLORAHUB_REQUIRE_TORCH=ON} \
  -DCMAKE_EXPORT_COMPILE_COMMANDS=ON 2>&1 | tee "$logs/configure.log" | grep -E '^-- lorahub|Error|error' || true
[ "${PIPESTATUS[0]}" = 0 ] || { say "configure FAILED (see configure.log)"; tail -30 "$logs/configure.log"; exit 1; }
say "configured"

# 3. Build and provenance checks.
start=$(date +%s)
# shellcheck disable=SC2086  # NINJA_TARGETS: a list of target names
if ! ninja -C "$build" -j "$jobs" ${NINJA_TARGETS:-} > "$logs/build.log" 2>&1; then
  say "build FAILED (see build.log)"; grep -E -m 20 -B2 -A6 'error|FAILED' "$logs/build.log" || tail -40 "$logs/build.log"
  exit 1
fi
say "build OK in $(( $(date +%s) - start )) s ($(grep -c '^\[' "$logs/build.log") steps, $(grep -c 'warning:' "$logs/build.log" || true) warnings)"
# The slowest steps (.ninja_log: start and end in ms) -> slowest_steps.txt, to see what bounds
# the build's wall time on a fresh machine (one long nvcc compile, or the sum of the rest).
awk -F'\t' 'NR > 1 { printf "%7.1f s  %7.1f-%7.1f  %s\n", ($2 - $1) / 1000, $1 / 1000, $2 / 1000, $4 }' \
  "$build/.ninja_log" 2>/dev/null | sort -rn | head -15 > "$logs/slowest_steps.txt" || true

# Every header of the project's libraries must come from the prefix (Abseil's
# inline namespace and protobuf's version check make mixing copies fatal).
libs_re='grpc|grpcpp|grpc\+\+|google/protobuf|absl|sentencepiece|prometheus|nlopt|nlohmann|gtest|gmock|curl|sqlite3'
foreign=$(ninja -C "$build" -t deps | grep -E "^\s+/" | grep -v "^\s*$prefix" | grep -v "^\s*$root/" | grep -E "/($libs_re)" | sort -u | head -5 || true)
[ -z "$foreign" ] || { say "FAILED: headers from outside the prefix: $foreign"; exit 1; }
say "headers of grpc/protobuf/absl/... all from $prefix"
# Run time: the project's libraries from the prefix (the base ones, zlib, ssl,
# curl, sqlite, may be the host's).
run_re='grpc|gpr|protobuf|protoc|absl_|sentencepiece|prometheus-cpp|nlopt|re2|cares|civetweb'
bad=0
for bin in $(find "$build/bin" -type f -perm -u+x); do
  out=$(env -u LD_LIBRARY_PATH ldd "$bin")
  missing=$(echo "$out" | grep 'not found' || true)
  foreign=$(echo "$out" | grep -E "lib($run_re)" | grep -v "=> $prefix" || true)
  if [ -n "$missing$foreign" ]; then bad=1; say "FAILED: $bin: $missing $foreign"; fi
done
[ $bad = 0 ] || exit 1
say "every binary loads grpc/protobuf/absl/... from the prefix, no library missing"
say "server: $(env -u LD_LIBRARY_PATH ldd "$build/bin/server/lorahub" | grep -E 'libtorch_cuda|libgrpc\+\+\.' | awk '{print $3}' | tr '\n' ' ')"
if [ -f models/BUILD ]; then
  "$py" deploy/cmake/sync_check.py --ctest-dir "$build" 2>&1 | grep -v warning | tee -a "$logs/summary.log"
  [ "${PIPESTATUS[0]}" = 0 ] || exit 1
else
  # A copy without models/ (moved out to fit a device call's 64 MiB, as
  # perf_ab.sh's callers do) has one Bazel package fewer than targets.cmake;
  # the CI's //tests/build:cmake_sync_test still checks the two are in step.
  say "sync_check skipped: models/ is not in this copy"
fi

# 4. Tests, from the source root like bazel test. The GPU host has no
# Prometheus: its two real-scrape checks skip instead of failing there;
# tls_test skips too where the host has no openssl(1).
export LORAHUB_ALLOW_NO_PROMETHEUS=${LORAHUB_ALLOW_NO_PROMETHEUS:-1}
export LORAHUB_ALLOW_NO_OPENSSL=${LORAHUB_ALLOW_NO_OPENSSL:-1}
set +e
(cd "$build" && ctest --output-on-failure ${CTEST_ARGS:-}) > "$logs/ctest.log" 2>&1
rc=$?
set -e
# (No match when CTEST_ARGS selects no test, as perf_ab.sh's build does.)
grep -E 'Test +#|tests passed|tests failed|Total Test time' "$logs/ctest.log" | tee -a "$logs/summary.log" || true
[ $rc = 0 ] || grep -A40 -E '\*\*\*Failed|\(Failed\)|Timeout' "$logs/ctest.log" | head -120
say "ctest exit status $rc"
exit $rc
