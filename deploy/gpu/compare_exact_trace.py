#!/usr/bin/env python3
"""Locates the first intermediate of the exact reference path that differs from the reference.

  python3 deploy/gpu/compare_exact_trace.py OURS.tsv OPS.tsv

OURS.tsv: what `lorahub score --exact-reference` writes with LORAHUB_EXACT_TRACE=OURS.tsv
(name, [shape]/[strides], float64 sum, float64 abs-sum; one line per major intermediate).
OPS.tsv: deploy/gpu/ref_op_trace.py's op trace of the reference for the same fixture and
weights (index, op, args, kwargs, "sum abs-sum"). Both sums are printed with %.17g, so equal
tensors give equal strings. For each of our intermediates this prints the index of the first
reference op (after the previous match) with the same sums, or MISSING; after the first MISSING
it shows the reference ops of the same shape that follow the last match (the candidates for
the op that rounds differently). Runs anywhere (no torch needed).
"""
import sys


def main():
    ours_path, ops_path = sys.argv[1:3]
    ops = []
    for line in open(ops_path):
        if line.startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 5:
            continue
        ops.append((int(parts[0]), parts[1], parts[2], parts[4]))
    last = -1
    missing = 0
    for line in open(ours_path):
        if line.startswith("#") or not line.strip():
            continue
        name, layout, s, a = line.rstrip("\n").split("\t")
        key = "%s %s" % (s, a)
        hit = next((i for i, o in enumerate(ops) if i > last and o[3] == key), None)
        if hit is None:
            hit_any = next((i for i, o in enumerate(ops) if o[3] == key), None)
            if hit_any is not None:
                print("%-40s %-28s matches op %d (out of order)" % (name, layout, ops[hit_any][0]))
                continue
            missing += 1
            print("%-40s %-28s MISSING  ours: %s" % (name, layout, key))
            if missing == 1:
                shape = layout.split("/")[0].replace(",", ", ")
                print("  reference ops after op %d:" % (ops[last][0] if last >= 0 else -1))
                shown = 0
                for o in ops[last + 1:]:
                    if o[3]:
                        print("    %d %s %s -> %s" % (o[0], o[1], o[2][:120], o[3]))
                        shown += 1
                    if shown >= 12:
                        break
            continue
        last = hit
        print("%-40s %-28s = op %d %s" % (name, layout, ops[hit][0], ops[hit][1]))
    print("missing: %d" % missing)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
