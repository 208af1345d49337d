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
  [safetensors]="core/io/safetensors.cc core/io/host_tensor.cc"
  [torch_zip]="core/io/torch_pickle.cc core/io/zip_reader.cc core/io/host_tensor.cc"
  [torch_pickle]="core/io/torch_pickle.cc core/io/zip_reader.cc core/io/host_tensor.cc"
  [t5_config]="core/config/t5_config.cc core/config/json_fields.cc"
  [lora_config]="core/config/lora_config.cc core/config/json_fields.cc"
  [t5_tokenizer]="core/tokenizer/t5_tokenizer.cc core/tokenizer/sp_shim_loader.cc"
  [jsonl]="core/tasks/jsonl.cc"
)
# Libraries every target links (Debian's Abseil), plus per-target extras.
ABSL_LIBS="-labsl_statusor -labsl_status -labsl_strerror -labsl_str_format_internal -labsl_cord -labsl_cordz_info -labsl_cord_internal -labsl_cordz_functions -labsl_cordz_handle -labsl_hash -labsl_city -labsl_low_level_hash -labsl_raw_hash_set -labsl_bad_optional_access -labsl_bad_variant_access -labsl_hashtablez_sampler -labsl_exponential_biased -labsl_synchronization -labsl_graphcycles_internal -labsl_stacktrace -labsl_symbolize -labsl_debugging_internal -labsl_demangle_internal -labsl_malloc_internal -labsl_time -labsl_civil_time -labsl_time_zone -labsl_strings -labsl_strings_internal -labsl_base -labsl_spinlock_wait -labsl_int128 -labsl_throw_delegate -labsl_raw_logging_internal -labsl_log_severity -pthread"
declare -A FUZZ_LIBS=(
  [t5_tokenizer]="-ldl"
)
[ -n "${FUZZ_SOURCES[$name]+x}" ] || { echo "unknown fuzz target $name" >&2; exit 2; }

out=/tmp/fuzz-$name
mkdir -p "$out" "tests/fuzz/corpus/$name"
extra=()
if [ "$name" = t5_tokenizer ]; then
  # SentencePiece stays behind its shim, uninstrumented: Bazel builds the shim, the fuzzer
  # loads it from LORAHUB_SP_SHIM, and the embedded copy is left empty.
  bazel build //core/tokenizer:libsp_shim.so >/dev/null 2>&1
  export LORAHUB_SP_SHIM=$(readlink -f bazel-bin/core/tokenizer/libsp_shim.so)
  printf '%s\n' '#include <cstddef>' 'namespace lorahub::tokenizer::internal {' \
    'extern const unsigned char kSpShimBytes[] = {0};' \
    'extern const std::size_t kSpShimSize = 0;' '}' >"$out/sp_shim_embed.cc"
  extra=("$out/sp_shim_embed.cc")
fi
clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I. "tests/fuzz/${name}_fuzz.cc" ${FUZZ_SOURCES[$name]} ${extra[@]+"${extra[@]}"} \
  ${FUZZ_LIBS[$name]:-} $ABSL_LIBS -o "$out/fuzzer"
cd "$out"
./fuzzer -max_total_time="$seconds" -rss_limit_mb=2048 -artifact_prefix="$out/" "$@" \
  "$OLDPWD/tests/fuzz/corpus/$name" 2>&1 | tee "$out/log" | grep -E '^#[0-9]+.*(DONE|pulse)|ERROR|SUMMARY|Done' || true
grep -E 'Done [0-9]+ runs' "$out/log" || { echo "fuzzer $name failed, see $out" >&2; exit 1; }
