#!/usr/bin/env python3
"""Records scipy's COBYLA, run exactly as bench/ref_lorahub.py runs it, on analytic functions:
minimize(f, zeros(n), method="COBYLA", options={"maxiter": budget, "rhobeg": 0.5}) with x
clipped to [-1.5, 1.5] inside f. Every point scipy proposes (before clipping) and every value is
written, so that tests/learn/cobyla_scipy_trace_test.cc can check that our cobyla walks the same
path. scipy >= 1.16 runs PRIMA's COBYLA (the one behind the reference's numbers on the GPU host).

  python3 tests/learn/scipy_cobyla_traces.py --out tests/learn/testdata/scipy118_cobyla_traces.json

Functions (all evaluated at the clipped point):
  sphere          sum x_i^2 + 0.05 mean|x|                     (minimum at 0: x0 is optimal)
  shifted_sphere  sum (x_i - c_i)^2, c_i = shift_i             (some c_i outside the box)
  rosenbrock      sum 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2
  quadratic_l1    sum (1 + i) (x_i - c_i)^2 + 0.05 mean|x|     (the LoraHub score's shape)
"""
import argparse
import json

import numpy as np
import scipy
from scipy.optimize import minimize

LOWER, UPPER, RHOBEG = -1.5, 1.5, 0.5


def shift_vector(n, kind):
    if kind == "inside":
        return [0.9 * np.sin(1.7 * i + 0.3) for i in range(n)]
    if kind == "outside":  # every third coordinate beyond the box: bounds active at the optimum
        return [2.0 if i % 3 == 0 else 0.6 * np.cos(1.1 * i) for i in range(n)]
    return None


def make_function(name, shift):
    if name == "sphere":
        return lambda x: float(np.sum(x * x) + 0.05 * np.mean(np.abs(x)))
    if name == "shifted_sphere":
        c = np.asarray(shift)
        return lambda x: float(np.sum((x - c) ** 2))
    if name == "rosenbrock":
        return lambda x: float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))
    if name == "quadratic_l1":
        c = np.asarray(shift)
        a = 1.0 + np.arange(len(c))
        return lambda x: float(np.sum(a * (x - c) ** 2) + 0.05 * np.mean(np.abs(x)))
    raise ValueError(name)


CASES = [
    # (function, n, budget, shift kind)
    ("sphere", 5, 40, None),
    ("shifted_sphere", 5, 40, "inside"),
    ("shifted_sphere", 10, 40, "outside"),
    ("shifted_sphere", 20, 40, "outside"),
    ("shifted_sphere", 20, 120, "inside"),
    ("rosenbrock", 5, 40, None),
    ("rosenbrock", 10, 150, None),
    ("rosenbrock", 20, 40, None),
    ("quadratic_l1", 5, 60, "inside"),
    ("quadratic_l1", 20, 40, "outside"),
    ("quadratic_l1", 20, 40, "inside"),
    ("quadratic_l1", 20, 200, "outside"),
]


def run_case(name, n, budget, shift_kind):
    shift = shift_vector(n, shift_kind)
    f = make_function(name, shift)
    points, values = [], []

    def obj(x):
        points.append([float(v) for v in x])
        s = f(np.clip(x, LOWER, UPPER))
        values.append(s)
        return s

    res = minimize(obj, np.zeros(n), method="COBYLA", options={"maxiter": budget, "rhobeg": RHOBEG})
    return {"function": name, "n": n, "budget": budget, "rhobeg": RHOBEG, "lower": LOWER,
            "upper": UPPER, "clip": True, "shift": None if shift is None else [float(v) for v in shift],
            "points": points, "values": values, "scipy_message": str(res.message),
            "scipy_nfev": int(res.nfev), "scipy_fun": float(res.fun)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    cases = [run_case(*c) for c in CASES]
    with open(a.out, "w") as f:
        json.dump({"scipy_version": scipy.__version__, "numpy_version": np.__version__,
                   "cases": cases}, f, indent=None)
        f.write("\n")
    for c in cases:
        print("%s n=%d budget=%d: %d evaluations, best %.6g (%s)" % (
            c["function"], c["n"], c["budget"], len(c["values"]), min(c["values"]), c["scipy_message"]))


if __name__ == "__main__":
    main()
