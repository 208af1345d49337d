#!/usr/bin/env python3
"""Record every ATen op the reference (ref_lorahub.py: transformers + PEFT) runs for one score.

Run ON THE GPU HOST, where transformers and peft are installed:
  python3 deploy/gpu/ref_op_trace.py --ref .gpu/bench/ref_lorahub.py --fixture DIR \
      --weights 0.1,-0.2,... --out ops.tsv

Each line of the output: index, op name, then for each argument its shape/stride/dtype (tensors)
or value (scalars), then the float64 sum and absolute sum of the op's first tensor output. The
sequence is what an engine must call, in this order and with these shapes, to reproduce the
reference's fp32 scores bit for bit (the same library kernels give the same rounding).
"""
import argparse
import importlib.util
import json
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def describe(x):
    if isinstance(x, torch.Tensor):
        return "T%s/%s/%s" % (list(x.shape), list(x.stride()), str(x.dtype).replace("torch.", ""))
    if isinstance(x, (list, tuple)):
        return "[" + ",".join(describe(y) for y in x) + "]"
    if isinstance(x, float):
        return repr(x)
    return str(x)


class Logger(TorchDispatchMode):
    def __init__(self, out):
        super().__init__()
        self.out = out
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        r = func(*args, **kwargs)
        first = r[0] if isinstance(r, (list, tuple)) and r and isinstance(r[0], torch.Tensor) else r
        check = ""
        if isinstance(first, torch.Tensor) and first.numel() and first.dtype.is_floating_point:
            d = first.detach().double()
            check = "%.17g %.17g" % (d.sum().item(), d.abs().sum().item())
        a = " ".join(describe(x) for x in args)
        k = " ".join("%s=%s" % (key, describe(v)) for key, v in kwargs.items())
        self.out.write("%d\t%s\t%s\t%s\t%s\n" % (self.n, func, a, k, check))
        self.n += 1
        return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ref", required=True)
    p.add_argument("--fixture", required=True)
    p.add_argument("--weights", default="")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("ref_lorahub", a.ref)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    r = ref.Ref(a.fixture, dev)
    n = len(r.cache)
    w = [float(x) for x in a.weights.split(",")] if a.weights else [0.0] * n
    w = (w + [0.0] * n)[:n]
    import numpy as np
    w = list(np.clip(np.array(w, dtype=np.float64), -1.5, 1.5))  # numpy float64, as learn() passes
    with open(a.out, "w") as f:
        f.write("# torch %s cuda %s tf32 matmul %s cudnn %s\n" % (
            torch.__version__, torch.version.cuda, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32))
        with Logger(f):
            s = r.score(w)
        f.write("# score %.17g\n" % s)
    print(json.dumps({"score": s, "weights": [float(x) for x in w]}))


if __name__ == "__main__":
    sys.exit(main())
