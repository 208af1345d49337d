#!/usr/bin/env python3
"""The serving engine's counters over one load round, from two scrapes of
`lorahub serve`'s Prometheus endpoint (deploy/gpu/multi_gpu.sh).

Why: the engine's exit line sums everything since the server started, the
warm-up round included; a long warm-up (WARM_REQUESTS) then hides what the
measured round itself cost.

  round_metrics.py scrape PORT FILE     the metrics text now -> FILE ("" if none)
  round_metrics.py diff BEFORE AFTER    one line: the counters' growth between
                                        (after a line per CUDA device: what its
                                        engine's allocator held before and after)

A failed scrape prints nothing and exits 0 (the round's other figures
stand on their own); bad arguments exit 2.
"""
import sys
import urllib.request


def scrape(port, path):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%s/metrics" % port,
                                    timeout=10) as r:
            text = r.read().decode()
    except OSError as e:
        print("round_metrics: no scrape of port %s: %s" % (port, e), file=sys.stderr)
        text = ""
    with open(path, "w") as f:
        f.write(text)


def read(path):
    """{'name{labels}': value} of every sample in a Prometheus text file."""
    out = {}
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return out
    for line in lines:
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def diff(before_path, after_path):
    before, after = read(before_path), read(after_path)
    if not before or not after:
        return
    grew = lambda k: after.get(k, 0.0) - before.get(k, 0.0)
    busy = lambda phase: grew('lorahub_engine_busy_seconds_total{phase="%s"}' % phase)
    part = lambda p: grew('lorahub_engine_admission_seconds_total{part="%s"}' % p)
    memory = 'lorahub_device_memory_used_bytes{device="'
    memory_keys = sorted(k for k in after if k.startswith(memory))
    for key in memory_keys:
        print("   device memory %s: %.3f GB after the round (%.3f before)" % (
            key[len(memory):-2], after[key] / 1e9, before.get(key, 0.0) / 1e9))
    if not memory_keys:  # a CUDA engine sets it; say so rather than print nothing
        print("   device memory: no lorahub_device_memory_used_bytes sample (%s)" % (
            ", ".join(sorted(k for k in after if k.startswith("lorahub_device"))) or
            "no lorahub_device* sample at all"))
    rows = grew('lorahub_engine_admitted_rows_total{path="slots"}') + grew(
        'lorahub_engine_admitted_rows_total{path="eager"}')
    print("   round's engine: admissions %.3f s (adapters %.3f, slot loads %.3f, "
          "encoder passes %.3f, decoder rows %.3f; %d rows admitted), steps %.3f s "
          "(%d queued ahead of admissions), emitting %.3f s; %d tokens; %d graph captures "
          "(%.3f s)" % (
              busy("admit"), part("adapters"), part("slot_loads"), part("encoder"),
              part("decoder_rows"), rows, busy("step"),
              grew("lorahub_engine_steps_ahead_total"), busy("emit"),
              grew("lorahub_generated_tokens_total"),
              grew("lorahub_engine_graph_captures_total"),
              grew("lorahub_engine_graph_capture_seconds_total")))
    # Compose jobs' device work (a closure each scoring pass): how long each held the
    # engine thread, from the histogram's buckets (an upper bound per quantile).
    work = "lorahub_engine_device_work_seconds"
    count = grew(work + "_count")
    if count > 0:
        bounds = sorted((float(k.split('le="')[1].split('"')[0]), grew(k))
                        for k in after if k.startswith(work + "_bucket{"))
        upto = lambda q: next((le for le, n in bounds if n >= q * count), float("inf"))
        print("   compose work on the engine: %d closures, %.3f s in all (mean %.2f ms), "
              "p50 <= %g s, p99 <= %g s, max <= %g s" % (
                  count, grew(work + "_sum"), 1e3 * grew(work + "_sum") / count,
                  upto(0.5), upto(0.99), upto(1.0)))


def main(argv):
    if len(argv) == 4 and argv[1] == "scrape":
        scrape(argv[2], argv[3])
    elif len(argv) == 4 and argv[1] == "diff":
        diff(argv[2], argv[3])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
