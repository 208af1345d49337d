#!/usr/bin/env bash
# Installs the Debian 12 packages the build, the tests and the demo need.
# Idempotent: packages already installed are left alone, and apt-get runs only
# when something is missing. Needs root (or sudo) only in that case.
set -euo pipefail

PACKAGES=(
  # Build.
  bazel-bootstrap bazel-bootstrap-source g++ cmake
  # Libraries.
  libtorch-dev libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libsentencepiece-dev libabsl-dev prometheus-cpp-dev libnlopt-cxx-dev
  libcurl4-openssl-dev libsqlite3-dev nlohmann-json3-dev libgtest-dev libgmock-dev
  # An optimised BLAS for LibTorch's CPU matmuls: Debian's libtorch links
  # libblas.so.3, which is the slow reference BLAS unless this provides it
  # (measured 5-8x faster generation on the embedded default).
  libopenblas0-pthread
  # Tools used by tests: spm_train, clang/libFuzzer, Python with torch for
  # fixtures, a real Prometheus server.
  sentencepiece clang libclang-rt-14-dev python3-torch python3-grpcio python3-protobuf prometheus
  # curl(1): the integration tests scrape /metrics and query Prometheus with it.
  curl
  # openssl(1): tls_test makes its certificates with it.
  openssl
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "setup: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends "${missing[@]}"; then
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
