#!/usr/bin/env bash
# Stop strings (DecodingOptions.stop) end to end on the trained default
# model: for every two-character piece of a generation's text, the same
# request with that piece as its stop string ends with FINISH_REASON_STOP,
# its final text and its streamed text are the text before the piece's
# first occurrence, and its ids are a prefix of the full ones; a stop that
# never appears changes nothing; the earliest of several stops wins; beam
# search stops too; bad stop lists are INVALID_ARGUMENT naming the field.
# `lorahub generate --stop` (offline) gives the server's ids and text.
#   stop_test.sh LORAHUB LORAHUBCTL
set -uo pipefail
lorahub=$(readlink -f "$1"); ctl=$(readlink -f "$2")
root=$(cd "$(dirname "$(readlink -f "$0")")/../.." && pwd)
dm=$root/models/default
. "$(dirname "$0")/harness.sh"
[ -f "$dm/base/model.safetensors" ] || fail "$dm not found (the trained default model)"

start_server --model "$dm/base" --data-dir "$tmp"
c modules add --dir "$dm/modules/reverse_word" --id rw >/dev/null || fail "modules add"
gen() {  # gen OUTFILE [FLAGS...]: one generation, --json lines into OUTFILE
  local out=$1; shift
  c --json generate --module rw --max-new-tokens 20 --text "Reverse the word: planet" "$@" \
    >"$out" 2>>"$tmp/err" || fail "generate $*"
}
check() {  # check FULL STOPPED WANT_REASON WANT_TEXT [STOP...]
  "$py" - "$@" <<'PY' || fail "check $*"
import json, sys
full, got, reason, want = sys.argv[1:5]
stops = sys.argv[5:]
lines = [json.loads(l) for l in open(got)]
end = lines[-1]
chunks = "".join(l["text"] for l in lines[:-1])
full_lines = [json.loads(l) for l in open(full)]
full_ids = full_lines[-1]["output_ids"]
assert end["finish_reason"] == reason, (end["finish_reason"], reason)
assert end["text"] == want, (end["text"], want)
assert chunks == want, ("streamed", chunks, want)
ids = end["output_ids"]
if reason != "FINISH_REASON_STOP":
    assert ids == full_ids, (ids, full_ids)
else:
    # Generation ended at the token whose text completed a stop string.
    text, k = "", 0
    for k, l in enumerate(full_lines[:-1]):
        text += l["text"]
        if any(s in text for s in stops):
            break
    assert ids == full_ids[:k + 1], (ids, full_ids, k)
PY
}

offline() {  # offline SERVER_OUT [FLAGS...]: `lorahub generate` ends as the server did
  local got=$1; shift
  "$lorahub" generate --model "$dm/base" --adapter "$dm/modules/reverse_word" --max-new-tokens 20 \
    --text "Reverse the word: planet" --json "$@" >"$tmp/offline" 2>>"$tmp/err" \
    || fail "lorahub generate $*"
  "$py" - "$got" "$tmp/offline" <<'PY' || fail "offline $*"
import json, sys
end = [json.loads(l) for l in open(sys.argv[1])][-1]
off = json.loads(open(sys.argv[2]).read())
assert off["output_ids"] == end["output_ids"], (off, end)
assert off["text"] == end["text"], (off, end)
assert off["stopped"] == (end["finish_reason"] == "FINISH_REASON_STOP"), (off, end)
PY
}

gen "$tmp/full"
text=$("$py" -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['text'])" "$tmp/full")
[ "${#text}" -ge 4 ] || fail "the default model's text is too short to test: '$text'"
reason=$("$py" -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['finish_reason'])" "$tmp/full")
n=0
for i in $(seq 0 $((${#text} - 2))); do
  stop=${text:$i:2}
  want=${text%%"$stop"*}
  gen "$tmp/s$i" --stop "$stop"
  check "$tmp/full" "$tmp/s$i" FINISH_REASON_STOP "$want" "$stop"
  n=$((n + 1))
done
# Absent: as without it. Several: the earliest in the text wins.
gen "$tmp/none" --stop "QQ" --stop "${text}x"
check "$tmp/full" "$tmp/none" "$reason" "$text"
gen "$tmp/two" --stop "${text:2:2}" --stop "${text:1:2}"
check "$tmp/full" "$tmp/two" FINISH_REASON_STOP "${text:0:1}" "${text:2:2}" "${text:1:2}"
offline "$tmp/s0" --stop "${text:0:2}"
offline "$tmp/s$((${#text} - 2))" --stop "${text:$((${#text} - 2)):2}"
offline "$tmp/none" --stop "QQ" --stop "${text}x"
offline "$tmp/two" --stop "${text:2:2}" --stop "${text:1:2}"
# Beam search: its tokens come at the end, and the stop still cuts them.
gen "$tmp/beamfull" --num-beams 2
beam_text=$("$py" -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['text'])" "$tmp/beamfull")
gen "$tmp/beam" --num-beams 2 --stop "${beam_text:1:2}"
check "$tmp/beamfull" "$tmp/beam" FINISH_REASON_STOP "${beam_text:0:1}" "${beam_text:1:2}"
offline "$tmp/beam" --num-beams 2 --stop "${beam_text:1:2}"
# Bad lists.
c generate --module rw --text x --stop "" 2>"$tmp/e"
[ $? = 1 ] && grep -q "INVALID_ARGUMENT: options.stop\[0\]: empty" "$tmp/e" || fail "empty stop: $(cat "$tmp/e")"
nine=(); for k in $(seq 9); do nine+=(--stop "s$k"); done
c generate --module rw --text x "${nine[@]}" 2>"$tmp/e"
grep -q "INVALID_ARGUMENT: options.stop: at most 8 strings, got 9" "$tmp/e" || fail "nine stops: $(cat "$tmp/e")"
c generate --module rw --text x --stop "$(printf 'y%.0s' $(seq 257))" 2>"$tmp/e"
grep -q "INVALID_ARGUMENT: options.stop\[0\]: longer than 256 bytes" "$tmp/e" || fail "long stop: $(cat "$tmp/e")"
"$lorahub" generate --model "$dm/base" --text x --stop "" 2>"$tmp/e"
[ $? = 2 ] && grep -q -- "--stop\[0\]: empty" "$tmp/e" || fail "lorahub generate --stop '': $(cat "$tmp/e")"
kill -TERM "$pid"; wait "$pid" || fail "serve exit code"; pid=
echo "PASS ($n stops cut '$text'; beam text '$beam_text')"
