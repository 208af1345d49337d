#!/usr/bin/env python3
"""One table of perf_ab.sh's serve runs (SERVE=1), from its progress log.

Why: each run prints a warm-up and GEN_ROUNDS rounds over a dozen lines
(deploy/gpu/multi_gpu.sh); comparing runs meant reading them off by hand.

  serve_rounds.py [LOG]     the table of LOG's serve runs (stdin without LOG)

A row per run: its variables, the warm-up's seconds, each round's seconds
and tokens/s, each round's p99 time to first token, the graph captures of
the warm-up and of each round, every capture of the server's life and their
seconds (with those made while idle, where its engine made any), the
engine thread's encoder passes in each round, each device's memory after
the warm-up and after the last round, and how many requests gave the same
ids as the run it was compared with. A
figure a run did not print is "-". Exits 2 on a log it cannot read.
"""
import re
import sys

RUN = re.compile(r"^== serve (\S+)\s*(.*?)\s+\[\d+ s\]$")
WARM = re.compile(r"^\s+warm-up: (\d+) tokens in ([\d.]+) s")
GEN = re.compile(r"^\s+gen: (\d+) tokens in ([\d.]+) s .*p99 ([\d.]+) ms")
MEMORY = re.compile(r"^\s+device memory (\S+): ([\d.]+) GB after the round")
ENGINE = re.compile(r"^\s+(warm-up's|round's) engine: .*; (\d+) graph captures")
PASSES = re.compile(r"encoder passes ([\d.]+)")
EXIT = re.compile(r"^lorahub engine \S+: .*; graph captures (\d+) in ([\d.]+) s"
                  r"(?:; shapes made while idle (\d+))?")
SAME = re.compile(r"^\s+outputs: (\d+) of (\d+) requests with the same ids as (\S+)")


def parse(lines):
    runs = []
    for line in lines:
        m = RUN.match(line)
        if m:
            runs.append({"tag": m.group(1), "vars": m.group(2), "warm": None,
                         "rounds": [], "p99": [], "captures": [], "passes": [],
                         "memory": {}, "same": None, "all": []})
            continue
        if not runs:
            continue
        run = runs[-1]
        if m := WARM.match(line):
            run["warm"] = float(m.group(2))
        elif m := GEN.match(line):
            tokens, seconds = int(m.group(1)), float(m.group(2))
            run["rounds"].append((seconds, tokens / seconds if seconds > 0 else 0.0))
            run["p99"].append(m.group(3))
        elif m := MEMORY.match(line):
            run["memory"].setdefault(m.group(1), []).append(float(m.group(2)))
        elif m := ENGINE.match(line):
            run["captures"].append(m.group(2))
            if m.group(1) == "round's":
                passes = PASSES.search(line)
                run["passes"].append(passes.group(1) if passes else "-")
        elif m := EXIT.match(line):
            idle = "; %s while idle" % m.group(3) if m.group(3) else ""
            run["all"].append("%s (%.2f s%s)" % (m.group(1), float(m.group(2)), idle))
        elif m := SAME.match(line):
            run["same"] = "%s of %s as %s" % m.groups()
    return runs


def table(runs):
    out = ["| run | variables | warm-up s | rounds: s (tok/s) | p99 TTFT ms | "
           "captures (warm-up, rounds) | captures in all | encoder passes s | "
           "memory GB (warm-up, last) | same ids |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        memory = "; ".join("%s %.2f, %.2f" % (d, v[0], v[-1]) for d, v in r["memory"].items())
        out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["tag"], r["vars"] or "-",
            "%.3f" % r["warm"] if r["warm"] is not None else "-",
            " / ".join("%.3f (%.0f)" % x for x in r["rounds"]) or "-",
            " / ".join(r["p99"]) or "-",
            " / ".join(r["captures"]) or "-",
            "; ".join(r["all"]) or "-",
            " / ".join(r["passes"]) or "-",
            memory or "-", r["same"] or "-"))
    return "\n".join(out)


def main(argv):
    if len(argv) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        f = open(argv[1]) if len(argv) == 2 else sys.stdin
        with f:
            runs = parse(f.read().splitlines())
    except (OSError, UnicodeDecodeError) as e:
        print("serve_rounds: %s" % e, file=sys.stderr)
        return 2
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
