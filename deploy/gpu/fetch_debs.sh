#!/usr/bin/env bash
# Run on the Debian 12 development machine. Downloads (apt-get download, no
# install) the Debian 12 packages that deploy/gpu/build_and_test.sh unpacks
# on the GPU host, which has no apt and no network, into .gpu/debs/ of the
# repository root. Idempotent: packages already there are not fetched again.
#
#   deploy/gpu/fetch_debs.sh          then run there with carry [".gpu"]
#
# .gpu/debs/*.deb      the project's libraries, always used from the prefix
# .gpu/debs/base/*.deb base libraries (zlib, OpenSSL, SQLite, curl and what
#                      curl needs): used only where the GPU host lacks them,
#                      since its own (newer) copies are already loaded by
#                      everything else there.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Headers, link libraries and tools of every @repo in WORKSPACE (deploy/bazel/),
# plus what they need at run time. Add the packages of a new system library here.
PROJECT_DEBS=(
  libgrpc++-dev libgrpc++1.51 libgrpc29 libgrpc-dev
  libprotobuf-dev libprotobuf32 libprotobuf-lite32 libprotoc32 protobuf-compiler protobuf-compiler-grpc
  libsentencepiece-dev libsentencepiece0
  libabsl-dev libabsl20220623
  prometheus-cpp-dev libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libprometheus-cpp-push1.0
  libcivetweb-dev libcivetweb1 civetweb
  libnlopt-dev libnlopt0 libnlopt-cxx-dev libnlopt-cxx0
  libc-ares2 libc-ares-dev libre2-9 libre2-dev
  zlib1g-dev libssl-dev libcurl4-openssl-dev libsqlite3-dev libsystemd-dev
  nlohmann-json3-dev libgtest-dev libgmock-dev
)
# Run-time libraries that an Ubuntu 24.04 host probably has (then they are
# not used); the closure of libcurl4 libssl3 zlib1g libsqlite3-0 without libc.
BASE_DEBS=(
  zlib1g libssl3 libsqlite3-0 libcurl4
  libbrotli1 libcom-err2 libdb5.3 libffi8 libgmp10 libgnutls30 libgssapi-krb5-2
  libhogweed6 libidn2-0 libk5crypto3 libkeyutils1 libkrb5-3 libkrb5support0
  libldap-2.5-0 libnettle8 libnghttp2-14 libp11-kit0 libpsl5 librtmp1 libsasl2-2
  libsasl2-modules-db libssh2-1 libtasn1-6 libunistring2 libzstd1
)

fetch() {  # fetch DIR PACKAGES...
  local dir=$1; shift
  mkdir -p "$dir"
  local missing=()
  for p in "$@"; do
    compgen -G "$dir/${p}_*.deb" >/dev/null || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "fetching ${#missing[@]} packages into $dir: ${missing[*]}"
    (cd "$dir" && apt-get download "${missing[@]}")
  fi
}
fetch .gpu/debs "${PROJECT_DEBS[@]}"
fetch .gpu/debs/base "${BASE_DEBS[@]}"
echo "$(ls .gpu/debs/*.deb | wc -l) + $(ls .gpu/debs/base/*.deb | wc -l) packages," \
  "$(du -sh .gpu/debs | cut -f1) in .gpu/debs"
