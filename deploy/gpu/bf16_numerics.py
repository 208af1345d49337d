#!/usr/bin/env python3
"""bf16 against the fp32 reference at the same weights (issue 7's numerics target: within 1%).

Run ON THE GPU HOST after the build (deploy/gpu/build_and_test.sh), on the flan-t5-large-shaped
fixture (ref_lorahub.py fixture --size large --format bin):

  python3 deploy/gpu/bf16_numerics.py --ref .gpu/bench/ref_lorahub.py --fixture /tmp/lorahub_large \
      --lorahub .gpu/build/bin/server/lorahub [--ref-trace TRACE.json] [--ours-trace NAME=FILE.jsonl]... \
      [--out numerics.md]

--no-ref (no transformers/peft, e.g. on a machine without them; --ref not needed): ours in fp32
on --device is the baseline instead (on CUDA it was the reference bit for bit at every point
measured, fifth and sixth sessions); the columns are then ours fp32, bf16, bf16 --objective.

Weight vectors: w = 0; the best point of the reference's COBYLA trace (ref_learn_trace.py's JSON)
and of each of our `learn --trace` files when given; three uniform draws in [-1.5, 1.5] (the
search box) and three normal draws with sigma 0.3 (seeds 1-3). For each: the reference's score
(upcast to fp32, loaded once, in this process), `lorahub score` in fp32 (the default on CUDA: the exact
reference numerics), in bf16 (the adapter applied unmerged, ScoreCandidates) and in bf16 with
--objective (what `learn` evaluates: the objective runner, which merges the composed adapter into
the weights). Prints a markdown table with each minus the reference, relative to the reference;
writes it to --out too.
"""
import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys


def best_of_reference(path):
    evals = json.load(open(path))["evaluations"]
    return min(evals, key=lambda e: e["score"])["w"]


def best_of_ours(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    return min(rows, key=lambda r: r["score"])["weights"]


def ours(lorahub, fixture, adapters, w, dtype, device, objective=False, env=None):
    cmd = [lorahub, "score", "--model", os.path.join(fixture, "base")]
    if objective:
        cmd.append("--objective")
    for a in adapters:
        cmd += ["--adapter", a]
    cmd += ["--weights", ",".join(repr(float(v)) for v in w), "--examples",
            os.path.join(fixture, "examples.jsonl"), "--device", device, "--dtype", dtype,
            "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    if p.returncode != 0:
        raise RuntimeError("lorahub score %s exit %d: %s" % (dtype, p.returncode, p.stderr[-300:]))
    return json.loads(p.stdout.strip().splitlines()[-1])["score"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref")
    ap.add_argument("--no-ref", action="store_true")
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--lorahub", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--ref-trace")
    ap.add_argument("--ours-trace", action="append", default=[])
    ap.add_argument("--out")
    # A/B of the objective path: one more "bf16 objective" column per NAME=VALUE, run with that
    # environment variable set (e.g. LORAHUB_COMPOSE_FP32=1); --objective-only drops the bf16
    # unmerged column.
    ap.add_argument("--objective-env", action="append", default=[])
    ap.add_argument("--objective-only", action="store_true")
    a = ap.parse_args()
    if not a.no_ref and not a.ref:
        ap.error("--ref or --no-ref")

    adapters = sorted(os.path.join(a.fixture, "modules", d)
                      for d in os.listdir(os.path.join(a.fixture, "modules")) if d.startswith("m"))
    n = len(adapters)
    if a.no_ref:
        reference = lambda w: ours(a.lorahub, a.fixture, adapters, w, "fp32", a.device)
        ref_name = "ours fp32"
    else:
        spec = importlib.util.spec_from_file_location("ref_lorahub", a.ref)
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)
        r = ref.Ref(a.fixture, "cuda")
        # transformers 5 loads a checkpoint in its stored dtype: a bf16-stored base
        # (models/default) would make the "fp32 reference" a bf16 one. Upcast the model and the
        # module cache.
        ref_dtype = str(next(r.model.parameters()).dtype)
        r.model = r.model.float()
        r.cache = [{k: v.float() for k, v in sd.items()} for sd in r.cache]
        print("reference loaded as %s, scoring in float32" % ref_dtype, file=sys.stderr)
        # The reference's module order (its cache) is the modules' sorted names, as ours.
        assert len(adapters) == len(r.cache), (len(adapters), len(r.cache))
        reference = lambda w: float(r.score(w))
        ref_name = "reference fp32"

    points = [("w = 0", [0.0] * n)]
    if a.ref_trace and os.path.exists(a.ref_trace):
        points.append(("reference COBYLA-40 best w", best_of_reference(a.ref_trace)))
    for spec_ in a.ours_trace:
        name, _, path = spec_.partition("=")
        if os.path.exists(path):
            points.append(("ours %s best w" % name, best_of_ours(path)))
    for seed in (1, 2, 3):
        g = random.Random(seed)
        points.append(("uniform [-1.5, 1.5], seed %d" % seed,
                       [g.uniform(-1.5, 1.5) for _ in range(n)]))
    for seed in (1, 2, 3):
        g = random.Random(100 + seed)
        points.append(("normal sigma 0.3, seed %d" % seed, [g.gauss(0.0, 0.3) for _ in range(n)]))

    runs = [("fp32", False, None), ("bf16", False, None), ("bf16", True, None)]
    if a.no_ref:
        runs = runs[1:]  # ours fp32 is the baseline
    if a.objective_only:
        runs = [r for r in runs if r[0] == "bf16" and r[1]]
    for assignment in a.objective_env:
        name, _, value = assignment.partition("=")
        runs.append(("bf16", True, {name: value}))
    head = "| weights | %s |" % ref_name
    for dtype, objective, env in runs:
        name = "ours %s%s%s" % (dtype, " objective" if objective else "",
                                "".join(" %s=%s" % kv for kv in (env or {}).items()))
        head += " %s | %s - baseline (rel) |" % (name, name)
    lines = [head, "|---|---:|" + "---:|---:|" * len(runs)]
    for label, w in points:
        want = reference(w)
        row = [label, "%.6f" % want]
        for dtype, objective, env in runs:
            try:
                got = ours(a.lorahub, a.fixture, adapters, w, dtype, a.device, objective, env)
                row += ["%.6f" % got, "%+.3g" % ((got - want) / abs(want))]
            except Exception as e:  # report and go on
                print("FAILED %s %s: %s" % (label, dtype, e), file=sys.stderr)
                row += ["failed", "-"]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        open(a.out, "w").write(text)


if __name__ == "__main__":
    main()
