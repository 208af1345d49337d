#!/usr/bin/env python3
"""The reference's learning (bench/ref_lorahub.py learn: scipy COBYLA, x0 = 0, rhobeg 0.5,
maxiter = budget, weights clipped to [-1.5, 1.5] in the objective) with every evaluation
recorded, so that our cobyla's path can be compared with it point by point.

  python3 deploy/gpu/ref_learn_trace.py --ref .gpu/bench/ref_lorahub.py --fixture DIR \
      [--budget 40] [--device cuda|cpu] > trace.json

Output (one JSON object): scipy_version, device, best_score, load_seconds (the reference's
load of the base and modules: Ref(...)), and evaluations: a list of {"x": proposed point,
"w": clipped weights, "score": objective, "seconds": wall seconds (time.perf_counter) from the
start of the optimisation, after loading, to the end of this evaluation}.
"""
import argparse
import importlib.util
import json
import time

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ref", required=True)
    p.add_argument("--fixture", required=True)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--device", default=None)
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("ref_lorahub", a.ref)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    import scipy
    import torch
    from scipy.optimize import minimize
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t_load = time.perf_counter()
    r = ref.Ref(a.fixture, dev)
    load_seconds = time.perf_counter() - t_load
    n = len(r.cache)
    evals = []

    def f(x):
        w = list(np.clip(x, -1.5, 1.5))
        s = r.score(w)
        evals.append({"x": [float(v) for v in x], "w": [float(v) for v in w], "score": float(s),
                      "seconds": time.perf_counter() - t0})
        return s

    t0 = time.perf_counter()
    minimize(f, np.zeros(n), method="COBYLA", options={"maxiter": a.budget, "rhobeg": 0.5})
    print(json.dumps({"scipy_version": scipy.__version__, "device": dev, "fixture": a.fixture,
                      "modules": n, "best_score": min(e["score"] for e in evals),
                      "load_seconds": load_seconds,
                      "evaluations": evals}))


if __name__ == "__main__":
    main()
