#!/usr/bin/python3
"""Writes the safetensors test fixtures and the fuzz seed corpus.

Run from the repository root with the system Python (no safetensors package is
needed; the layout is written by hand with struct + json, following the
reference writer, safetensors/src/tensor.rs `prepare`/`serialize`):
  - 8-byte little-endian header length N;
  - compact JSON header, "__metadata__" first, then tensors ordered by
    descending element size, then by name; offsets in that order;
  - header padded with spaces to a multiple of 8.

    /usr/bin/python3 tests/testdata/safetensors/make_fixtures.py

Fixtures (tests/testdata/safetensors/):
  small.safetensors   F32 "a.weight" [2,3] = 0.5*i, F16 "b.bias" [3] = -1.5*i,
                      BF16 "c" [2,2] = 0.25*i, I64 "step" [] = 42,
                      U8 "mask" [0] (empty); metadata {"format": "pt"}.
  sharded/            model.safetensors.index.json + two shards; the tensors
                      "enc.w" F32 [2,2] = i+1 and "dec.w" F32 [3] = 10*(i+1).
Corpus (tests/fuzz/corpus/safetensors/): valid files and tricky ones.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "fuzz", "corpus", "safetensors")

SIZES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2,
         "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def bf16(x):
    """BF16 bytes of an exactly representable float: top half of its F32."""
    return struct.pack("<f", x)[2:4]


def encode(dtype, values):
    if dtype == "F32":
        return b"".join(struct.pack("<f", v) for v in values)
    if dtype == "F16":
        return b"".join(struct.pack("<e", v) for v in values)
    if dtype == "BF16":
        return b"".join(bf16(v) for v in values)
    if dtype == "I64":
        return b"".join(struct.pack("<q", v) for v in values)
    if dtype == "U8":
        return bytes(values)
    raise ValueError(dtype)


def serialize(tensors, metadata=None):
    """tensors: {name: (dtype, shape, bytes)} -> safetensors file bytes."""
    order = sorted(tensors, key=lambda n: (-SIZES[tensors[n][0]], n))
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    data = b""
    for name in order:
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def raw_file(header_text, data=b""):
    """A file with a literal header (no padding), for malformed inputs."""
    text = header_text.encode() if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(text)) + text + data


def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)


def small():
    return serialize({
        "a.weight": ("F32", [2, 3], encode("F32", [0.5 * i for i in range(6)])),
        "b.bias": ("F16", [3], encode("F16", [-1.5 * i for i in range(3)])),
        "c": ("BF16", [2, 2], encode("BF16", [0.25 * i for i in range(4)])),
        "step": ("I64", [], encode("I64", [42])),
        "mask": ("U8", [0], b""),
    }, {"format": "pt"})


def sharded():
    enc = ("F32", [2, 2], encode("F32", [1.0, 2.0, 3.0, 4.0]))
    dec = ("F32", [3], encode("F32", [10.0, 20.0, 30.0]))
    index = {
        "metadata": {"total_size": 28},
        "weight_map": {
            "enc.w": "model-00001-of-00002.safetensors",
            "dec.w": "model-00002-of-00002.safetensors",
        },
    }
    d = os.path.join(HERE, "sharded")
    write(os.path.join(d, "model-00001-of-00002.safetensors"),
          serialize({"enc.w": enc}, {"format": "pt"}))
    write(os.path.join(d, "model-00002-of-00002.safetensors"),
          serialize({"dec.w": dec}, {"format": "pt"}))
    write(os.path.join(d, "model.safetensors.index.json"),
          json.dumps(index, indent=2).encode() + b"\n")


def corpus():
    f32 = encode("F32", [1.0, 2.0])
    seeds = {
        "valid_small": small(),
        "valid_empty": serialize({}),
        "valid_metadata_only": serialize({}, {"k": "v"}),
        "valid_scalar": serialize({"s": ("F32", [], encode("F32", [3.0]))}),
        "valid_zero_dim": serialize({"z": ("F32", [0, 4], b""),
                                     "x": ("F32", [2], f32)}),
        "too_small": b"\x01\x02\x03",
        "huge_header_len": struct.pack("<Q", 2**63) + b"{}",
        "header_past_end": struct.pack("<Q", 100) + b"{}",
        "not_object": raw_file("[1,2]"),
        "bad_json": raw_file('{"a":'),
        "duplicate_name": raw_file(
            '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            b"\0" * 4),
        "duplicate_field": raw_file(
            '{"a":{"dtype":"F32","dtype":"F16","shape":[1],'
            '"data_offsets":[0,4]}}', b"\0" * 4),
        "overlap": raw_file(
            '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
            '"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', f32),
        "gap": raw_file(
            '{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', f32),
        "trailing": raw_file(
            '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', f32),
        "size_mismatch": raw_file(
            '{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', f32),
        "overflow_shape": raw_file(
            '{"a":{"dtype":"F64","shape":[4294967296,4294967296],'
            '"data_offsets":[0,8]}}', f32),
        "negative_dim": raw_file(
            '{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', f32),
        "float_offsets": raw_file(
            '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', f32),
        "f8_dtype": raw_file(
            '{"a":{"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]}}', f32),
        "metadata_nested": raw_file('{"__metadata__":{"a":{"b":"c"}}}'),
        "metadata_number": raw_file('{"__metadata__":{"a":1}}'),
        "deep_nesting": raw_file("{\"a\":" + "[" * 50 + "]" * 50 + "}"),
        "invalid_utf8": raw_file(b'{"\xff\xfe":{}}'),
        "extra_field": raw_file(
            '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}',
            f32),
        "past_end": raw_file(
            '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', f32),
    }
    for name, content in seeds.items():
        write(os.path.join(CORPUS, name), content)


if __name__ == "__main__":
    write(os.path.join(HERE, "small.safetensors"), small())
    sharded()
    corpus()
