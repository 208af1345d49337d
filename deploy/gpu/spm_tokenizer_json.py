#!/usr/bin/env python3
"""Writes a `tokenizers` serialization (tokenizer.json) of a T5 SentencePiece model, standard library
only, so that transformers loads the tokenizer without converting spiece.model itself.

  python3 deploy/gpu/spm_tokenizer_json.py --spm DIR/spiece.model --out DIR/tokenizer.json

Why: on the GPU host (transformers 5.17) AutoTokenizer could not convert the default model's
spiece.model ("You need to have sentencepiece or tiktoken installed to convert a slow tokenizer to a
fast one"), which stopped deploy/gpu/bf16_numerics.py in the ninth session. The serialization is
what transformers' T5 converter builds: the model's precompiled normalizer (nmt_nfkc) then runs of
spaces collapsed, a Metaspace pre-tokenizer and decoder ("always" prepends the dummy prefix), the
Unigram pieces with their scores, and "</s>" appended to every sequence. The numerics script checks
the result: ours in fp32 must equal the reference, which it cannot on different token ids.
"""
import argparse
import base64
import json
import struct
import sys


def varint(buf, i):
    value, shift = 0, 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def fields(buf):
    """(field number, wire type, value) of one protobuf message, in order."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError("unsupported protobuf wire type %d" % wire)
        yield number, wire, value


# sentencepiece_model.proto: ModelProto.pieces = 1 (piece = 1, score = 2, type = 3), normalizer_spec
# = 3 (name = 1, precompiled_charsmap = 2, add_dummy_prefix = 3, remove_extra_whitespaces = 4),
# trainer_spec = 2 (model_type = 3: 1 unigram). Piece types: 1 normal, 2 unknown, 3 control.
def read_spm(path):
    pieces, charsmap, model_type, add_dummy_prefix, strip = [], b"", 1, True, True
    for number, _, value in fields(open(path, "rb").read()):
        if number == 1:
            piece = {"piece": "", "score": 0.0, "type": 1}
            for f, _, v in fields(value):
                if f == 1:
                    piece["piece"] = v.decode("utf-8")
                elif f == 2:
                    piece["score"] = struct.unpack("<f", v)[0]
                elif f == 3:
                    piece["type"] = v
            pieces.append(piece)
        elif number == 2:
            for f, _, v in fields(value):
                if f == 3:
                    model_type = v
        elif number == 3:
            for f, _, v in fields(value):
                if f == 2:
                    charsmap = v
                elif f == 3:
                    add_dummy_prefix = bool(v)
                elif f == 4:
                    strip = bool(v)
    return pieces, charsmap, model_type, add_dummy_prefix, strip


def tokenizer_json(pieces, charsmap, add_dummy_prefix, strip):
    unk = next(i for i, p in enumerate(pieces) if p["type"] == 2)
    eos = next(i for i, p in enumerate(pieces) if p["piece"] == "</s>")
    special = [i for i, p in enumerate(pieces) if p["type"] in (2, 3)]
    normalizers = [{"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if strip:  # remove_extra_whitespaces: SentencePiece also drops leading and trailing spaces
        normalizers.append({"type": "Strip", "strip_left": True, "strip_right": True})
    if charsmap:
        normalizers.insert(0, {"type": "Precompiled",
                               "precompiled_charsmap": base64.b64encode(charsmap).decode("ascii")})
    metaspace = {"type": "Metaspace", "replacement": "\u2581",
                 "prepend_scheme": "always" if add_dummy_prefix else "never", "split": True}
    eos_piece = pieces[eos]["piece"]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": pieces[i]["piece"], "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False, "special": True}
                         for i in special],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": metaspace,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": eos_piece, "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": eos_piece, "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}},
                     {"SpecialToken": {"id": eos_piece, "type_id": 0}}],
            "special_tokens": {eos_piece: {"id": eos_piece, "ids": [eos], "tokens": [eos_piece]}},
        },
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": unk,
                  "vocab": [[p["piece"], p["score"]] for p in pieces], "byte_fallback": False},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spm", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    try:
        pieces, charsmap, model_type, add_dummy_prefix, strip = read_spm(a.spm)
    except (OSError, ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        print("spm_tokenizer_json: cannot read %s: %s" % (a.spm, e), file=sys.stderr)
        return 2
    if model_type != 1 or not pieces or not any(p["type"] == 2 for p in pieces) or \
            not any(p["piece"] == "</s>" for p in pieces):
        print("spm_tokenizer_json: %s is not a T5 unigram SentencePiece model (needs <unk> and </s>)"
              % a.spm, file=sys.stderr)
        return 2
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(pieces, charsmap, add_dummy_prefix, strip), f, ensure_ascii=False)
    print("spm_tokenizer_json: %d pieces, charsmap %d bytes -> %s" % (len(pieces), len(charsmap), a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
