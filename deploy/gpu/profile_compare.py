#!/usr/bin/env python3
"""Reads the Kineto traces `lorahub bench --profile-out F.json` writes (F.generate.json,
F.generate_base.json, ...) and prints what the performance notes quote, over kernels only
(copies and memsets left out): the decode steps' span and busy time, the prompts' pass
(everything up to the first greedy pick), and the kernels by total time, each with its mean
per call; with a second trace, that trace's figures beside them.

  python3 deploy/gpu/profile_compare.py A.generate.json [B.generate.json] [--top 25]
      [--grid NAME]   (split kernels whose name contains NAME by launch grid)

A decode step is the kernels after one GreedyTokensKernel up to and including the next.
A trace with no GreedyTokensKernel is an objective evaluation (F.json, F.population.json): its
parts on the encoder's stream (set-up, encoder, after the encoder), the kernels of other streams
(the decoder's merge beside the encoder), and the median kernel and gap at each place of an
encoder layer and of a decoder block (a block: one decoder self-attention to the next).
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


ENCODER_ATTENTION = re.compile(r"RegisterTiledAttention|MmaAttentionKernel|TiledAttentionKernel")
DECODER_ATTENTION = re.compile(r"SplitKeyAttentionKernel|StepAttentionKernel")


def end(e):
    return e["ts"] + e["dur"]


def period_table(title, events, marks):
    """The kernels from each mark to the next, place by place (the windows of the commonest
    length): median duration, median gap before it, and each period's median span."""
    windows = [(events[a:b], events[b]["ts"] - events[a]["ts"]) for a, b in zip(marks, marks[1:])]
    if not windows:
        return
    n = statistics.mode(len(w) for w, _ in windows)
    same = [w for w, _ in windows if len(w) == n]
    span = statistics.median(s for w, s in windows if len(w) == n)
    print("\n%s: %d periods of %d kernels (%d of that length), median period %.1f us" %
          (title, len(windows), n, len(same), span))
    print("%8s %8s   %s" % ("us", "gap us", "kernel"))
    total = 0.0
    for p in range(n):
        dur = statistics.median(w[p]["dur"] for w in same)
        gap = statistics.median(w[p]["ts"] - end(w[p - 1]) for w in same) if p else float("nan")
        total += dur
        print("%8.2f %8.2f   %s" % (dur, gap, short(same[0][p]["name"])))
    print("%8.2f %8s   kernels' sum; gaps %.2f" % (total, "", span - total))


def evaluation(events):
    """An objective evaluation's parts (see the module's docstring)."""
    enc = [i for i, e in enumerate(events) if ENCODER_ATTENTION.search(e["name"])]
    if not enc:
        print("  no encoder attention kernel: not an evaluation's trace")
        return
    stream = events[enc[0]].get("args", {}).get("stream")
    side = [e for e in events if e.get("args", {}).get("stream") != stream]
    main_stream = [e for e in events if e.get("args", {}).get("stream") == stream]
    enc = [i for i, e in enumerate(main_stream) if ENCODER_ATTENTION.search(e["name"])]
    dec = [i for i, e in enumerate(main_stream) if DECODER_ATTENTION.search(e["name"])]
    norms = [i for i in range(enc[0]) if "RmsNorm" in main_stream[i]["name"]]
    first = norms[-1] if norms else enc[0]
    t0 = main_stream[0]["ts"]
    print("  set-up (to the encoder's first norm): %.1f us, %d kernels" %
          (main_stream[first]["ts"] - t0, first))
    if len(enc) > 1:
        # The last layer: its attention and the kernels a layer has after it, the final norm
        # in place of the next layer's first.
        n = statistics.mode(b - a for a, b in zip(enc, enc[1:]))
        last = min(len(main_stream) - 1, enc[-1] + n - (enc[0] - first))
        print("  encoder: %d layers, %.1f us (to the end of %s)" %
              (len(enc), end(main_stream[last]) - main_stream[first]["ts"],
               short(main_stream[last]["name"])[:40]))
        print("  after the encoder: %.1f us, %d kernels" %
              (end(main_stream[-1]) - end(main_stream[last]), len(main_stream) - 1 - last))
    for e in main_stream:
        if "PersistentDecoder" in e["name"]:
            print("  persistent decoder: %.1f us" % e["dur"])
    if side:
        print("  other streams: %d kernels, %.1f us busy, from %.1f to %.1f us" %
              (len(side), sum(e["dur"] for e in side), side[0]["ts"] - t0, end(side[-1]) - t0))
    period_table("encoder layers (attention to attention)", main_stream, enc)
    if len(dec) == 2 * len(enc):  # a self- and a cross-attention a block
        period_table("decoder blocks (self-attention to self-attention)", main_stream, dec[0::2])


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
        else:
            evaluation(load(path))
    first = runs[0]["kernels"]
    other = runs[1]["kernels"] if len(runs) > 1 else {}
    if args.top <= 0:
        return
    print("\n%8s %8s %10s   %s" % ("calls", "mean us", "total ms", "kernel (second trace after |)"))
    for name, durs in sorted(first.items(), key=lambda kv: -sum(kv[1]))[:args.top]:
        line = "%8d %8.2f %10.3f" % (len(durs), sum(durs) / len(durs), sum(durs) / 1000)
        if name in other:
            o = other[name]
            line += " | %6d %8.2f %10.3f" % (len(o), sum(o) / len(o), sum(o) / 1000)
        print(line + "   " + name)


if __name__ == "__main__":
    main()
