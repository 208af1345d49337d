#!/usr/bin/python3
"""Writes the torch.save fixtures of tests/io/torch_bin_test.cc.

Run with Debian's Python, which has torch 1.13:
    /usr/bin/python3 tests/testdata/torch_bin/make_fixtures.py
With torch 2.x (e.g. on the GPU host), write into torch2/ instead:
    python3 tests/testdata/torch_bin/make_fixtures.py torch2
To describe files written elsewhere (torch211/ holds a PEFT adapter_model.bin
written by torch 2.11 on the GPU host), load them with torch and write
DIR/expected.json:
    /usr/bin/python3 tests/testdata/torch_bin/make_fixtures.py --describe torch211

Good files are written by torch.save itself; expected.json records, for each,
what torch says the tensors are (dtype, shape, values in row-major order), so
the C++ test compares the reader against torch rather than against itself.
Hostile files are built with the plain `pickle` module inside zips and are
never loaded here (nothing in them is executed). Output is deterministic
except legacy.bin (the legacy format records storage addresses).
"""
import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, sys.argv[-1]) if len(sys.argv) > 1 else HERE
FIXED_TIME = (1980, 1, 1, 0, 0, 0)

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def describe(state_dict):
    out = {}
    for name, t in state_dict.items():
        flat = t.detach().contiguous().reshape(-1)
        if t.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # exact: both widen losslessly to float32
        if t.dtype == torch.bool:
            values = [int(v) for v in flat.tolist()]
        else:
            values = flat.tolist()
        entry = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
        if len(values) <= 64:
            entry["values"] = values
        else:  # keep expected.json small: the first values and float64 sums
            entry["head"] = values[:16]
            entry["sum"] = flat.double().sum().item()
            entry["abs_sum"] = flat.double().abs().sum().item()
        out[name] = entry
    return out


def save(name, obj, state_dict, expected):
    torch.save(obj, os.path.join(OUT, name))
    expected[name] = describe(state_dict)


def write_zip(name, entries, compress=zipfile.ZIP_STORED):
    """entries: list of (archive name, bytes), written in order."""
    with zipfile.ZipFile(os.path.join(OUT, name), "w", compress) as z:
        for entry_name, data in entries:
            info = zipfile.ZipInfo(entry_name, date_time=FIXED_TIME)
            info.compress_type = compress
            z.writestr(info, data)


def write_zip64(name, entries):
    """A zip with ZIP64 extra fields on every entry and ZIP64 end records,
    the layout torch's writer uses for files over 4 GiB, at a small size."""
    body = bytearray()
    central = bytearray()
    for entry_name, data in entries:
        encoded = entry_name.encode()
        offset = len(body)
        crc = zlib.crc32(data)
        local_extra = struct.pack("<HHQQ", 1, 16, len(data), len(data))
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, crc,
                            0xFFFFFFFF, 0xFFFFFFFF, len(encoded),
                            len(local_extra))
        body += encoded + local_extra + data
        central_extra = struct.pack("<HHQQQ", 1, 24, len(data), len(data),
                                    offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0,
                               0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                               len(encoded), len(central_extra), 0, 0, 0, 0,
                               0xFFFFFFFF)
        central += encoded + central_extra
    cd_offset = len(body)
    z64_offset = cd_offset + len(central)
    n = len(entries)
    z64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n,
                      len(central), cd_offset)
    locator = struct.pack("<IIQI", 0x07064B50, 0, z64_offset, 1)
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF,
                       0xFFFFFFFF, 0xFFFFFFFF, 0)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(bytes(body + central + z64 + locator + eocd))


def zip_entries(name):
    with zipfile.ZipFile(os.path.join(OUT, name)) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


# --- Crafted pickles: torch's own globals and persistent ids, any arguments.

class FakeStorage:
    def __init__(self, cls, key, numel):
        self.cls, self.key, self.numel = cls, key, numel


class FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False,
                     collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def crafted_pickle(obj, protocol=2):
    buf = io.BytesIO()
    TorchLikePickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


class Evil:
    """__reduce__ names os.system; pickling only records the name."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    expected = {}

    fp32 = collections.OrderedDict()
    fp32["weight"] = torch.randn(3, 4)
    fp32["bias"] = torch.arange(5, dtype=torch.float32) - 2.5
    fp32["scalar"] = torch.tensor(2.5)
    fp32["empty"] = torch.zeros(0, 3)
    save("fp32.bin", fp32, fp32, expected)

    fp16 = collections.OrderedDict(
        w=torch.randn(2, 3).half(), tiny=torch.tensor([6e-5, -65504.0]).half())
    save("fp16.bin", fp16, fp16, expected)

    bf16 = collections.OrderedDict(
        w=torch.randn(4, 2).bfloat16(), big=torch.tensor([1e30, -3.0e-30]).bfloat16())
    save("bf16.bin", bf16, bf16, expected)

    ints = collections.OrderedDict(
        f64=torch.tensor([1.0 / 3, -2.0], dtype=torch.float64),
        i64=torch.tensor([-(2 ** 40), 7]), i32=torch.tensor([-5, 2 ** 30], dtype=torch.int32),
        i16=torch.tensor([-300, 300], dtype=torch.int16),
        i8=torch.tensor([-128, 127], dtype=torch.int8),
        u8=torch.tensor([0, 255], dtype=torch.uint8),
        mask=torch.tensor([True, False, True]))
    save("dtypes.bin", ints, ints, expected)

    # Views: torch.save writes the whole storage plus offset/size/stride.
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    flat = torch.arange(20, dtype=torch.float32) * 0.5
    views = collections.OrderedDict()
    views["transposed"] = base.t()
    views["stepped"] = base[::2, 1::3]
    views["column"] = base[:, 4]
    views["shared_a"] = flat[2:7]
    views["shared_b"] = flat[10:].view(2, 5)
    views["shared_b_t"] = flat[10:].view(2, 5).t()
    views["expanded"] = flat[3:4].expand(3, 2)
    views["base"] = base
    save("views.bin", views, views, expected)

    # PEFT's get_peft_model_state_dict returns a plain dict keyed like this.
    adapter = {}
    for stack in ("encoder", "decoder"):
        for proj in ("q", "v"):
            prefix = f"base_model.model.{stack}.block.0.layer.0.SelfAttention.{proj}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(2, 8)
            adapter[f"{prefix}.lora_B.weight"] = torch.randn(8, 2)
    save("adapter_model.bin", adapter, adapter, expected)

    # nn.Module.state_dict(): an OrderedDict with a _metadata attribute (BUILD).
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3),
                                 torch.nn.BatchNorm1d(3))
    module_sd = module.state_dict()
    save("module_state.bin", module_sd, module_sd, expected)

    # Wrapped state dict and parameters (_rebuild_parameter).
    wrapped_sd = collections.OrderedDict(w=torch.randn(2, 2))
    save("wrapped.bin", {"epoch": 3, "state_dict": wrapped_sd, "note": "x"},
         wrapped_sd, expected)
    params = collections.OrderedDict(p=torch.nn.Parameter(torch.randn(3)))
    save("parameter.bin", params, params, expected)

    # The same archive with another top folder and ZIP64 records.
    write_zip64("zip64.bin", [(n.replace("fp32/", "some_stem/", 1), d)
                              for n, d in zip_entries("fp32.bin")])
    expected["zip64.bin"] = expected["fp32.bin"]

    # Legacy (pre-1.6) format.
    torch.save(fp32, os.path.join(OUT, "legacy.bin"),
               _use_new_zipfile_serialization=False)

    # --- Hostile or broken files.
    write_zip("evil_system.bin", [("archive/data.pkl", pickle.dumps(
        collections.OrderedDict(w=Evil()), protocol=2)),
        ("archive/version", b"3\n")])
    write_zip("evil_stack_global.bin", [("archive/data.pkl", pickle.dumps(
        Evil(), protocol=4)), ("archive/version", b"3\n")])

    fp32_bytes = open(os.path.join(OUT, "fp32.bin"), "rb").read()
    with open(os.path.join(OUT, "truncated.bin"), "wb") as f:
        f.write(fp32_bytes[: len(fp32_bytes) // 2])

    # Storage entry 4 bytes shorter than numel * 4.
    write_zip("wrong_storage_size.bin",
              [(n, d[:-4] if n.endswith("/data/0") else d)
               for n, d in zip_entries("fp32.bin")])
    # The same entries, deflated.
    write_zip("compressed.bin", zip_entries("fp32.bin"), zipfile.ZIP_DEFLATED)
    # One byte of a storage flipped after the CRC was computed.
    corrupt = bytearray(fp32_bytes)
    with zipfile.ZipFile(io.BytesIO(fp32_bytes)) as z:
        info = z.getinfo("fp32/data/0")
        start = info.header_offset + 30 + len(info.filename.encode()) + \
            struct.unpack_from("<H", fp32_bytes, info.header_offset + 28)[0]
    corrupt[start] ^= 0xFF
    with open(os.path.join(OUT, "bad_crc.bin"), "wb") as f:
        f.write(bytes(corrupt))

    storage = FakeStorage(torch.FloatStorage, "0", 6)
    data0 = struct.pack("<6f", *range(6))
    write_zip("view_out_of_bounds.bin", [
        ("archive/data.pkl", crafted_pickle(collections.OrderedDict(
            w=FakeTensor(storage, 2, (2, 3), (3, 1))))),
        ("archive/data/0", data0)])
    write_zip("missing_storage.bin", [
        ("archive/data.pkl", crafted_pickle(collections.OrderedDict(
            w=FakeTensor(FakeStorage(torch.FloatStorage, "7", 6), 0, (6,), (1,))))),
        ("archive/data/0", data0)])
    write_zip("huge_broadcast.bin", [
        ("archive/data.pkl", crafted_pickle(collections.OrderedDict(
            w=FakeTensor(storage, 0, (1 << 20, 1 << 20), (0, 0))))),
        ("archive/data/0", data0)])
    write_zip("not_a_dict.bin", [
        ("archive/data.pkl", crafted_pickle([FakeTensor(storage, 0, (6,), (1,))])),
        ("archive/data/0", data0)])

    write_zip("mixed_prefix.bin", [("a/data.pkl", b"\x80\x02}."),
                                   ("b/version", b"3\n")])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate
        write_zip("duplicate_entry.bin", [("archive/data.pkl", b"\x80\x02}."),
                                          ("archive/data.pkl", b"\x80\x02}.")])
    # Set the "encrypted" flag in the local and the central header.
    write_zip("encrypted.bin", [("archive/data.pkl", b"\x80\x02}.")])
    enc = bytearray(open(os.path.join(OUT, "encrypted.bin"), "rb").read())
    enc[6] |= 1
    enc[enc.rfind(b"PK\x01\x02") + 8] |= 1
    with open(os.path.join(OUT, "encrypted.bin"), "wb") as f:
        f.write(bytes(enc))

    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


def describe_dir():
    expected = {}
    for name in sorted(os.listdir(OUT)):
        if name.endswith(".bin"):
            expected[name] = describe(torch.load(os.path.join(OUT, name),
                                                 weights_only=True))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(describe_dir() if "--describe" in sys.argv else main())
