#!/usr/bin/env python3
"""Plots for docs/BENCHMARKS.md (issue 7): score vs wall time of learning runs, and generation
tokens/s vs batch size with no adapter, one shared adapter and a distinct adapter per row.

  python3 deploy/gpu/plot_bench.py --bench bench.json \
      --trace "ours cobyla bf16=cobyla_bf16.jsonl" --trace "reference=ref_trace.json" \
      --out DIR [--check]

Inputs:
  --bench FILE   `lorahub bench ... --gen-sweep B1,B2,...` output: one JSON object (the last
                 line of FILE that parses as one with "generation_sweep" is used).
  --trace NAME=FILE (repeatable) one learning run, either
                 `lorahub learn --trace FILE.jsonl`: one JSON line per evaluation with
                 "evaluation", "score", "seconds" (since the search started), or
                 deploy/gpu/ref_learn_trace.py's JSON object: "evaluations", a list of
                 {"score", "seconds"}, and "load_seconds".
Writes DIR/score_vs_time.png (best-so-far score, lower is better, vs wall seconds, log x; one
line per trace), DIR/tokens_vs_batch.png (tokens/s vs batch size, log2 x, log y) and
DIR/plots.md (the image links and tables of the plotted numbers). A missing or unreadable
input is reported on stderr and left out; the exit code is 1 only if nothing could be plotted.
--check: read and check the inputs, print plots.md's text to stdout, write nothing and do not
import matplotlib (for machines without it).
"""
import argparse
import json
import math
import os
import sys

SWEEP_KEYS = [
    ("base", "no adapter (base)", ("base_tokens_per_second",)),
    ("shared", "one adapter shared by all rows",
     ("shared_adapter_tokens_per_second", "merged_tokens_per_second")),
    ("distinct", "a distinct adapter per row", ("distinct_adapters_tokens_per_second",)),
]


def warn(msg):
    print("plot_bench: " + msg, file=sys.stderr)


def finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_bench(path):
    """The bench JSON object with a non-empty generation_sweep, and its sweep rows."""
    with open(path) as f:
        text = f.read()
    candidates = [text] + [l for l in reversed(text.splitlines()) if l.strip().startswith("{")]
    for c in candidates:
        try:
            j = json.loads(c)
        except ValueError:
            continue
        if isinstance(j, dict) and isinstance(j.get("generation_sweep"), list):
            break
    else:
        raise ValueError("%s: no JSON object with \"generation_sweep\"" % path)
    rows = []
    for i, p in enumerate(j["generation_sweep"]):
        if not isinstance(p, dict) or not finite(p.get("batch")) or p["batch"] < 1:
            raise ValueError("%s: generation_sweep[%d]: want an object with a batch >= 1" % (path, i))
        row = {"batch": int(p["batch"])}
        for key, _, names in SWEEP_KEYS:
            v = next((p[n] for n in names if n in p), None)
            if not finite(v) or v <= 0:
                raise ValueError("%s: generation_sweep[%d]: %s is %r, want a positive number"
                                 % (path, i, names[0], v))
            row[key] = float(v)
        rows.append(row)
    if not rows:
        raise ValueError("%s: generation_sweep is empty" % path)
    rows.sort(key=lambda r: r["batch"])
    return j, rows


def load_trace(path):
    """[(seconds, score)] in evaluation order, and the load seconds (None when unknown)."""
    with open(path) as f:
        text = f.read()
    evals, load_seconds = None, None
    try:
        j = json.loads(text)
        if isinstance(j, dict) and "evaluations" in j:  # ref_learn_trace.py
            evals = j["evaluations"]
            load_seconds = j.get("load_seconds")
    except ValueError:
        pass
    if evals is None:  # lorahub learn --trace: JSON lines
        evals = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                evals.append(json.loads(line))
            except ValueError as e:
                raise ValueError("%s:%d: not JSON (%s)" % (path, n, e))
        if evals and all(finite(e.get("evaluation")) for e in evals if isinstance(e, dict)):
            evals.sort(key=lambda e: e["evaluation"])
    if not isinstance(evals, list) or not evals:
        raise ValueError("%s: no evaluations" % path)
    points = []
    for i, e in enumerate(evals):
        if not isinstance(e, dict) or not finite(e.get("score")) or not finite(e.get("seconds")):
            raise ValueError("%s: evaluation %d: want numbers \"score\" and \"seconds\" (got %r)"
                             % (path, i + 1, e if not isinstance(e, dict) else
                                {k: e.get(k) for k in ("score", "seconds")}))
        points.append((float(e["seconds"]), float(e["score"])))
    return points, load_seconds if finite(load_seconds) else None


def best_so_far(points):
    """Points sorted by time (stable), with the running minimum of the score."""
    out, best = [], float("inf")
    for t, s in sorted(points, key=lambda p: p[0]):
        best = min(best, s)
        out.append((t, best))
    return out


def markdown(bench, sweep, traces, bench_path):
    md = ["# Benchmark plots", ""]
    if traces:
        md += ["## Learning: best score so far vs wall time", "",
               "![best score vs wall time](score_vs_time.png)", "",
               "Wall seconds from the start of the search (loading excluded); lower scores are "
               "better.", "",
               "| run | evaluations | wall s | best score | s to best | load s |",
               "|---|---:|---:|---:|---:|---:|"]
        for name, curve, load in traces:
            best = curve[-1][1]
            t_best = next(t for t, b in curve if b == best)
            md.append("| %s | %d | %.3f | %.6f | %.3f | %s |" % (
                name, len(curve), curve[-1][0], best, t_best,
                "%.2f" % load if load is not None else "-"))
        md.append("")
    if sweep:
        md += ["## Generation: tokens/s vs batch size", "",
               "![tokens/s vs batch size](tokens_vs_batch.png)", "",
               "`%s` (device %s, dtype %s, up to %s new tokens per row, greedy)." % (
                   os.path.basename(bench_path), bench.get("device", "?"), bench.get("dtype", "?"),
                   bench.get("generation", {}).get("max_new_tokens", "?")), "",
               "| batch | base tok/s | one shared adapter tok/s | distinct adapters tok/s "
               "| distinct / base | distinct / shared |",
               "|---:|---:|---:|---:|---:|---:|"]
        for r in sweep:
            md.append("| %d | %.0f | %.0f | %.0f | %.2f | %.2f |" % (
                r["batch"], r["base"], r["shared"], r["distinct"], r["distinct"] / r["base"],
                r["distinct"] / r["shared"]))
        md.append("")
    return "\n".join(md)


def plot_traces(plt, traces, path):
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve, _ in traces:
        xs = [max(t, 1e-4) for t, _ in curve]  # log x: the first evaluation's time is > 0
        ys = [b for _, b in curve]
        ax.step(xs, ys, where="post", marker=".", markersize=3,
                label="%s (%d evals, best %.4f)" % (name, len(curve), ys[-1]))
    ax.set_xscale("log")
    ax.set_xlabel("wall seconds since the search started (log)")
    ax.set_ylabel("best objective so far (lower is better)")
    ax.set_title("LoraHub learning: best score vs wall time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(plt, sweep, bench, path):
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [r["batch"] for r in sweep]
    for key, label, _ in SWEEP_KEYS:
        ax.plot(xs, [r[key] for r in sweep], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("batch size (rows; log2)")
    ax.set_ylabel("generated tokens/s (log)")
    ax.set_title("Greedy generation on %s (%s): tokens/s vs batch size"
                 % (bench.get("device", "?"), bench.get("dtype", "?")))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench")
    p.add_argument("--trace", action="append", default=[], metavar="NAME=FILE")
    p.add_argument("--out")
    p.add_argument("--check", action="store_true")
    a = p.parse_args()
    if not a.check and not a.out:
        p.error("--out is required (or --check)")

    bench, sweep = {}, []
    if a.bench:
        try:
            bench, sweep = load_bench(a.bench)
        except (OSError, ValueError) as e:
            warn("bench left out: %s" % e)
    traces = []
    for spec in a.trace:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            warn("--trace %r: want NAME=FILE; left out" % spec)
            continue
        try:
            points, load = load_trace(path)
        except (OSError, ValueError) as e:
            warn("trace %s left out: %s" % (name, e))
            continue
        traces.append((name, best_so_far(points), load))

    md = markdown(bench, sweep, traces, a.bench or "")
    if a.check:
        print(md)
        return 0 if (sweep or traces) else 1
    if not sweep and not traces:
        warn("nothing to plot")
        return 1
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(a.out, exist_ok=True)
    if traces:
        plot_traces(plt, traces, os.path.join(a.out, "score_vs_time.png"))
    if sweep:
        plot_sweep(plt, sweep, bench, os.path.join(a.out, "tokens_vs_batch.png"))
    with open(os.path.join(a.out, "plots.md"), "w") as f:
        f.write(md)
    print("wrote %s" % ", ".join(os.path.join(a.out, n) for n, ok in
                                 [("score_vs_time.png", traces), ("tokens_vs_batch.png", sweep),
                                  ("plots.md", True)] if ok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
