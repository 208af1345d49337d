# Sourced by the tests that drive the server from Python. Defines
#   make_py_stubs PROTO_DIR OUT_DIR
# which generates the lorahub.v1 Python stubs into OUT_DIR and sets $py to a
# Python that imports grpc. Tools, each overridable: LORAHUB_PROTOC and
# LORAHUB_GRPC_PYTHON_PLUGIN (else found on PATH, then in
# ${LORAHUB_DEPS_PREFIX:-.gpu/prefix}/usr/bin, the CMake prefix of the GPU
# host, whose libraries they then get through LD_LIBRARY_PATH),
# LORAHUB_PYTHON (else /usr/bin/python3, then python3). A missing tool is
# reported by name, with how to provide it, and the function returns 1.
_find_tool() {  # _find_tool OVERRIDE NAME PREFIX -> path, or nothing
  if [ -n "$1" ]; then
    [ -x "$1" ] && echo "$1"
    return
  fi
  if command -v "$2" >/dev/null 2>&1; then command -v "$2"; return; fi
  if [ -x "$3/usr/bin/$2" ]; then echo "$3/usr/bin/$2"; fi
}

make_py_stubs() {
  local proto_dir=$1 out=$2
  local prefix=${LORAHUB_DEPS_PREFIX:-$PWD/.gpu/prefix}
  local protoc plugin tool_ld= cand
  protoc=$(_find_tool "${LORAHUB_PROTOC:-}" protoc "$prefix")
  plugin=$(_find_tool "${LORAHUB_GRPC_PYTHON_PLUGIN:-}" grpc_python_plugin "$prefix")
  if [ -z "$protoc" ]; then
    echo "protoc not found: set LORAHUB_PROTOC, put it on PATH, or provide $prefix/usr/bin/protoc (Debian: protobuf-compiler)" >&2
    return 1
  fi
  if [ -z "$plugin" ]; then
    echo "grpc_python_plugin not found: set LORAHUB_GRPC_PYTHON_PLUGIN, put it on PATH, or provide $prefix/usr/bin/grpc_python_plugin (Debian: protobuf-compiler-grpc)" >&2
    return 1
  fi
  case "$protoc$plugin" in
    *"$prefix"*) tool_ld="$prefix/usr/lib/x86_64-linux-gnu:$prefix/usr/lib:$prefix/lib/x86_64-linux-gnu" ;;
  esac
  py=
  for cand in ${LORAHUB_PYTHON:-} /usr/bin/python3 python3; do
    if "$cand" -c 'import grpc, google.protobuf' >/dev/null 2>&1; then py=$cand; break; fi
  done
  if [ -z "$py" ]; then
    echo "no Python that imports grpc and google.protobuf: set LORAHUB_PYTHON (Debian: python3-grpcio python3-protobuf)" >&2
    return 1
  fi
  echo "protoc: $protoc; plugin: $plugin; python: $py"
  mkdir -p "$out"
  LD_LIBRARY_PATH="$tool_ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$protoc" -I"$proto_dir" --python_out="$out" --grpc_out="$out" \
    --plugin=protoc-gen-grpc="$plugin" "$proto_dir"/lorahub/v1/*.proto
}
