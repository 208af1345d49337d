#!/usr/bin/env python3
"""Reads the Kineto traces `lorahub bench --profile-out F.json` writes (F.generate.json,
F.generate_base.json, ...) and prints what the performance notes quote, over kernels only
(copies and memsets left out): the decode steps' span and busy time, the prompts' pass
(everything up to the first greedy pick), and the kernels by total time, each with its mean
per call; with a second trace, that trace's figures beside them.

  python3 deploy/gpu/profile_compare.py A.generate.json [B.generate.json] [--top 25]
      [--grid NAME]   (split kernels whose name contains NAME by launch grid)

A decode step is the kernels after one GreedyTokensKernel up to and including the next.
Runs here or on the GPU host; reads JSON only.
"""
import argparse
import collections
import json
import re
import statistics
import sys



def short(name):
    name = re.sub(r"\(anonymous namespace\)::|lorahub::model::kernels::|at::native::", "", name)
    return re.sub(r"^void ", "", name)[:100]


def load(path):
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not kernels:
        sys.exit(f"{path}: no kernels (was the trace written with device events?)")
    return kernels


def span_busy(kernels):
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    return span, sum(e["dur"] for e in kernels)


def summary(events, grid_name):
    picks = [i for i, e in enumerate(events) if "GreedyTokensKernel" in e["name"]]
    steps = [events[a + 1:b + 1] for a, b in zip(picks, picks[1:])]
    out = {"total": span_busy(events)}
    if picks:
        out["prompts"] = span_busy(events[:picks[0] + 1])
    if steps:
        spans, busies = zip(*(span_busy(s) for s in steps))
        out["steps"] = (len(steps), statistics.mean(spans), statistics.mean(busies),
                        statistics.median(len(s) for s in steps))
    per_kernel = collections.defaultdict(list)
    for e in events:
        key = short(e["name"])
        if grid_name and grid_name in e["name"]:
            key += " grid=" + str(e.get("args", {}).get("grid"))
        per_kernel[key].append(e["dur"])
    out["kernels"] = per_kernel
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", help="one or two Kineto JSON traces")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--grid", default="", help="split these kernels by grid")
    args = parser.parse_args()
    if len(args.traces) > 2:
        sys.exit("at most two traces")
    runs = [summary(load(p), args.grid) for p in args.traces]
    for path, s in zip(args.traces, runs):
        print(path)
        print("  all: span %.1f us, kernels busy %.1f us" % s["total"])
        if "prompts" in s:
            print("  prompts' pass (to the first pick): span %.1f us, busy %.1f us" % s["prompts"])
        if "steps" in s:
            print("  decode steps: %d, span %.1f us, busy %.1f us, %d kernels (means)" % s["steps"])
    first = runs[0]["kernels"]
    other = runs[1]["kernels"] if len(runs) > 1 else {}
    print("\n%8s %8s %10s   %s" % ("calls", "mean us", "total ms", "kernel (second trace after |)"))
    for name, durs in sorted(first.items(), key=lambda kv: -sum(kv[1]))[:args.top]:
        line = "%8d %8.2f %10.3f" % (len(durs), sum(durs) / len(durs), sum(durs) / 1000)
        if name in other:
            o = other[name]
            line += " | %6d %8.2f %10.3f" % (len(o), sum(o) / len(o), sum(o) / 1000)
        print(line + "   " + name)


if __name__ == "__main__":
    main()
