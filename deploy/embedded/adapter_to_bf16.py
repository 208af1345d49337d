#!/usr/bin/env python3
"""Rewrites PEFT adapter_model.safetensors files with their fp32 tensors in bf16.

    adapter_to_bf16.py MODULE_DIR...

Halves the size of a LoRA module. Both readers accept it: lorahub's adapter
loader converts any floating dtype to fp32 (core/model/lora.cc), and PEFT's
load_state_dict copies into its fp32 LoRA parameters. Rounding is to nearest,
ties to even (what torch's .to(torch.bfloat16) does). Only numpy and the
standard library are used, so that it runs with Debian's /usr/bin/python3 and
on the GPU host alike. Tensors that are not F32 are kept as they are; a file
already in bf16 is left unchanged. The file is replaced atomically.
"""
import json
import os
import struct
import sys

import numpy as np


def fp32_to_bf16_bits(raw):
    u = np.frombuffer(raw, dtype="<u4").astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def convert(path):
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ValueError(f"{path}: header length {n} past the end of the file")
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    meta = header.pop("__metadata__", None)
    out_header, chunks, offset, changed = {}, [], 0, False
    for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        h = dict(header[name])
        begin, end = h["data_offsets"]
        raw = data[begin:end]
        if h["dtype"] == "F32":
            raw = fp32_to_bf16_bits(raw)
            h["dtype"] = "BF16"
            changed = True
        h["data_offsets"] = [offset, offset + len(raw)]
        offset += len(raw)
        out_header[name] = h
        chunks.append(raw)
    if not changed:
        return 0
    if meta is not None:
        out_header["__metadata__"] = meta
    text = json.dumps(out_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)
    return len(blob) - os.path.getsize(path)


def main(argv):
    if len(argv) < 2:
        print("usage: adapter_to_bf16.py MODULE_DIR...", file=sys.stderr)
        return 2
    for d in argv[1:]:
        path = os.path.join(d, "adapter_model.safetensors")
        try:
            saved = convert(path)
        except (OSError, ValueError, KeyError) as e:
            print(f"adapter_to_bf16: {e}", file=sys.stderr)
            return 1
        print(f"{path}: {saved} bytes saved", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
