#!/usr/bin/env python3
"""Compares our cobyla (NLopt LN_COBYLA, via bazel-bin/tests/learn/cobyla_trace) with scipy's
COBYLA run exactly as bench/ref_lorahub.py runs it: minimize(f, zeros(n), method="COBYLA",
options={"maxiter": budget, "rhobeg": 0.5}) with the weights clipped to [-1.5, 1.5] inside f.

Run with Debian's interpreter (python3-scipy): /usr/bin/python3 tests/learn/compare_cobyla_scipy.py
Prints, per case: scipy version, evaluations, the first evaluation index where the two traces
differ (by more than 1e-12 in any weight), and both best scores.

Where our binary cannot be built (the GPU host has scipy but no Bazel), use recorded traces:
  here:      /usr/bin/python3 tests/learn/compare_cobyla_scipy.py --dump-ours tests/learn/testdata/nlopt_cobyla_traces.json
  GPU host:  python3 tests/learn/compare_cobyla_scipy.py --ours-json tests/learn/testdata/nlopt_cobyla_traces.json
(scipy >= 1.16 runs PRIMA's COBYLA instead of Powell's Fortran one; this shows how far apart
they are on the same functions.)
"""
import json
import math
import subprocess
import sys

import numpy as np
import scipy
from scipy.optimize import minimize

BIN = "bazel-bin/tests/learn/cobyla_trace"


def lorahub_like(w):
    n, m = len(w), 6
    a = np.zeros(m)
    b = np.zeros(m)
    for i in range(n):
        for j in range(m):
            a[j] += w[i] * math.sin(1.3 * i + 0.7 * j + 0.1)
            b[j] += w[i] * math.cos(0.9 * i - 1.1 * j + 0.2)
    s = 0.0
    for r in range(m):
        for c in range(m):
            d = b[r] * a[c] - math.sin(0.5 * r) * math.cos(0.3 * c)
            s += d * d
    return s / (m * m) + 0.05 * sum(abs(x) for x in w) / n


FUNCS = {
    "sphere1": lambda x: float(np.sum((np.asarray(x) - 1.0) ** 2)),
    "shifted": lambda x: float(sum((x[i] - (2.0 if i % 2 == 0 else -2.0)) ** 2 for i in range(len(x)))),
    "rosenbrock": lambda x: float(sum(100 * (x[i + 1] - x[i] ** 2) ** 2 + (1 - x[i]) ** 2 for i in range(len(x) - 1))),
    "lorahub": lorahub_like,
}


def scipy_trace(name, n, budget):
    f = FUNCS[name]
    trace = []

    def obj(x):
        w = list(np.clip(x, -1.5, 1.5))
        s = f(w)
        trace.append((s, w))
        return s

    minimize(obj, np.zeros(n), method="COBYLA", options={"maxiter": budget, "rhobeg": 0.5})
    return trace


def ours(name, n, budget, bounds=True):
    args = [BIN, name, str(n), str(budget)] + ([] if bounds else ["nobounds"])
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    trace = []
    for line in out.strip().splitlines():
        v = [float(t) for t in line.split()]
        trace.append((v[0], v[1:]))
    return trace


def first_diff(a, b):
    for i, ((_, wa), (_, wb)) in enumerate(zip(a, b)):
        if max(abs(x - y) for x, y in zip(wa, wb)) > 1e-12:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


CASES = [(f, n, b) for f in ["lorahub", "sphere1", "shifted", "rosenbrock"]
         for n, b in [(5, 40), (20, 40), (20, 100), (20, 400), (5, 400)]]


def key(f, n, b, bounds):
    return "%s/%d/%d/%s" % (f, n, b, "bounds" if bounds else "nobounds")


def main():
    args = sys.argv[1:]
    recorded = None
    if len(args) == 2 and args[0] == "--dump-ours":
        # Budgets <= 100 only, to keep the file small.
        out = {key(f, n, b, bd): ours(f, n, b, bd) for f, n, b in CASES if b <= 100
               for bd in (True, False)}
        with open(args[1], "w") as fh:
            json.dump(out, fh)
        return 0
    if len(args) == 2 and args[0] == "--ours-json":
        with open(args[1]) as fh:
            recorded = {k: [(t[0], t[1]) for t in v] for k, v in json.load(fh).items()}

    def get(f, n, b, bd):
        return recorded[key(f, n, b, bd)] if recorded is not None else ours(f, n, b, bd)

    print("scipy", scipy.__version__)
    print("%-10s %3s %5s | %5s %5s %5s | %-6s %-6s | %12s %12s %12s" % (
        "function", "n", "budget", "ev_sp", "ev_nl", "ev_nb", "div", "div_nb", "best_scipy", "best_nlopt", "best_nobnd"))
    cases = [c for c in CASES if recorded is None or key(*c, True) in recorded]
    worse = 0
    for f, n, b in cases:
        s = scipy_trace(f, n, b)
        o = get(f, n, b, True)
        nb = get(f, n, b, False)
        bs, bo, bn = min(t[0] for t in s), min(t[0] for t in o), min(t[0] for t in nb)
        if bo > bs + 1e-4:
            worse += 1
        print("%-10s %3d %5d | %5d %5d %5d | %-6s %-6s | %12.6g %12.6g %12.6g" % (
            f, n, b, len(s), len(o), len(nb), first_diff(s, o), first_diff(s, nb), bs, bo, bn))
    print("cases where ours (bounds) is worse than scipy + 1e-4:", worse, "of", len(cases))


if __name__ == "__main__":
    sys.exit(main())
