#!/usr/bin/env bash
# Runs the real `lorahub` binary (gRPC + protobuf 3.21 + LibTorch in one
# process) with `tokenize` and checks its ids against spm_encode's: the golden
# file written by make_spm.sh and, when spm_encode is installed, live calls.
#   lorahub_tokenize_test.sh PATH_TO_LORAHUB
set -u
bin=$1
model=tests/testdata/spm
failures=0
checks=0

fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }

# ids "3 393 206" -> {"ids":[3,393,206,1]}
expected_json() { local ids="$1 1"; echo "{\"ids\":[$(echo $ids | tr ' ' ',')]}"; }

check_encode() {  # text ids_without_eos
  local out
  out=$("$bin" tokenize --model "$model" --text "$1" --json) || fail "exit $? for '$1'"
  checks=$((checks + 1))
  [ "$out" = "$(expected_json "$2")" ] || fail "'$1': got $out, want $(expected_json "$2")"
}

# 1. Every golden line (spm_encode --output_format=id) plus eos, in one run
#    (--text repeats; one output line per text).
texts=(); want_json=(); want_plain=()
while IFS=$'\t' read -r text ids decoded; do
  [ "$text" = "<extra_id_0>" ] && continue  # a sentinel, checked below
  texts+=(--text "$text"); want_json+=("$(expected_json "$ids")"); want_plain+=("$ids 1")
done < "$model/golden.tsv"
[ "${#want_json[@]}" -ge 15 ] || fail "only ${#want_json[@]} golden lines"
mapfile -t got < <("$bin" tokenize --model "$model" --json "${texts[@]}")
mapfile -t got_plain < <("$bin" tokenize --model "$model/spiece.model" "${texts[@]}")
[ "${#got[@]}" -eq "${#want_json[@]}" ] || fail "${#got[@]} output lines, want ${#want_json[@]}"
for i in "${!want_json[@]}"; do
  checks=$((checks + 1))
  [ "${got[$i]:-}" = "${want_json[$i]}" ] || fail "line $i: got ${got[$i]:-}, want ${want_json[$i]}"
  # Plain (non-JSON) output is the same ids, space-separated.
  [ "${got_plain[$i]:-}" = "${want_plain[$i]}" ] || fail "plain line $i: ${got_plain[$i]:-}"
done

# 2. Live spm_encode on text that is in no golden file.
if command -v spm_encode >/dev/null; then
  for text in "Grüße aus Köln, 42 Äpfel" "a  b   c" "zzz QQQ 🙂🙂" "Translate: the cat."; do
    ids=$(printf '%s\n' "$text" | spm_encode --model="$model/spiece.model" --output_format=id)
    check_encode "$text" "$ids"
  done
  # A sentinel splits the text; each side is encoded on its own.
  left=$(printf 'Hello\n' | spm_encode --model="$model/spiece.model" --output_format=id)
  right=$(printf '.\n' | spm_encode --model="$model/spiece.model" --output_format=id)
  check_encode "Hello <extra_id_0>." "$left 499 $right"
else
  echo "spm_encode not installed: live comparison skipped, golden file used"
fi

# 3. Decode: specials and ids beyond the vocabulary are skipped.
out=$("$bin" tokenize --model "$model" --decode "0 3 393 206 149 499 32127 1" --json)
[ "$out" = '{"text":"Hello world"}' ] || fail "decode: $out"

# 4. Errors: one line on stderr, exit code 2.
for flags in "--model /nonexistent --text x" "--model $model --text x --bogus" \
             "--model $model" "--model $model --decode 1,x" "--text x" \
             "--model $model/golden.tsv --text x"; do
  err=$("$bin" tokenize $flags 2>&1 >/dev/null)
  rc=$?
  [ "$rc" -eq 2 ] || fail "'tokenize $flags' exited $rc, want 2"
  [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] || fail "'tokenize $flags' stderr: $err"
  case "$err" in "lorahub tokenize: "*) ;; *) fail "stderr '$err'";; esac
done

echo "$checks encodings checked, $failures failures"
[ "$failures" -eq 0 ]
