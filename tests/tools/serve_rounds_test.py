#!/usr/bin/env python3
"""deploy/gpu/serve_rounds.py: the table of perf_ab.sh's serve runs.

Reads testdata/serve_runs_s75.log (two runs of the seventy-fifth session's
call 1, as perf_ab.sh printed them on an H100), testdata/serve_runs_s76.log
(two of the seventy-sixth session's call 3: every shape captured ahead, and
the shapes made while idle) and a made-up log of two devices and a run cut
short, and checks the usage errors.
"""
import os
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
script = os.path.join(os.environ.get("TEST_SRCDIR", ""), os.environ.get("TEST_WORKSPACE", ""),
                      "deploy/gpu/serve_rounds.py")
if not os.path.exists(script):
    script = os.path.join(here, "../../deploy/gpu/serve_rounds.py")
failures = []


def run(*args, stdin=None):
    return subprocess.run([sys.executable, script, *args], input=stdin,
                          capture_output=True, text=True)


def expect(cond, what):
    if not cond:
        failures.append(what)


real = run(os.path.join(here, "testdata/serve_runs_s75.log"))
expect(real.returncode == 0, "real log: exit %d: %s" % (real.returncode, real.stderr))
rows = real.stdout.splitlines()
expect(len(rows) == 4, "real log: header, rule and 2 rows, got %r" % rows)
expect(rows[2:] == [
    "| main | - | 1.748 | 0.679 (13296) / 0.401 (22514) / 0.436 (20706) | 159.3 / 66.7 / 84.4 "
    "| 12 / 8 / 0 / 1 | 23 (1.32 s) | 0.260 / 0.010 / 0.061 | cuda:0 14.28, 15.65 | - |",
    "| l256 | GEN_CONC=256 SERVE_REF=s256 | 1.560 | 0.814 (11091) / 0.550 (16415) / 0.437 (20659) "
    "| 520.6 / 211.7 / 195.9 | 14 / 5 / 4 / 1 | 26 (1.49 s) | 0.324 / 0.140 / 0.062 "
    "| cuda:0 13.06, 17.10 | 512 of 512 as s256 |"], "real log rows: %r" % rows[2:])

idle = run(os.path.join(here, "testdata/serve_runs_s76.log"))
expect(idle.returncode == 0, "idle log: exit %d: %s" % (idle.returncode, idle.stderr))
expect(idle.stdout.splitlines()[2:] == [
    "| main | - | 3.349 | 0.402 (22458) / 0.391 (23090) / 0.393 (22972) | 63.7 / 45.0 / 44.3 "
    "| 33 / 0 / 0 / 0 | 35 (2.27 s) | 0.012 / 0.016 / 0.014 | cuda:0 14.61, 15.81 | - |",
    "| idle | LORAHUB_SERVE_CAPTURES_AHEAD=off LORAHUB_SERVE_IDLE_CAPTURES=cuda | 1.969 "
    "| 0.566 (15951) / 0.423 (21343) / 0.397 (22741) | 181.8 / 72.9 / 48.0 | 16 / 2 / 0 / 0 "
    "| 30 (2.10 s; 17 while idle) | 0.013 / 0.012 / 0.013 | cuda:0 12.81, 14.21 "
    "| 512 of 512 as main |"], "idle log rows: %r" % idle.stdout.splitlines()[2:])

# Two devices, and a run whose server printed no round.
made_up = """\
== serve two A=1  [10 s]
   warm-up: 100 tokens in 0.500 s (0 failed)
   device memory cuda:0: 1.000 GB after the round (0.5 before)
   device memory cuda:1: 2.000 GB after the round (0.5 before)
   gen: 100 tokens in 0.250 s (0 failed), TTFT p50 1.0 ms p99 2.5 ms [1 s]
   device memory cuda:0: 1.500 GB after the round (1.0 before)
   device memory cuda:1: 2.500 GB after the round (2.0 before)
   round's engine: admissions 0.010 s (adapters 0.001); 7 graph captures (0.100 s)
== serve cut  [20 s]
   lorahub serve: did not start
"""
made = run(stdin=made_up)
expect(made.returncode == 0, "made-up log: exit %d" % made.returncode)
expect(made.stdout.splitlines()[2:] == [
    "| two | A=1 | 0.500 | 0.250 (400) | 2.5 | 7 | - | - | cuda:0 1.00, 1.50; cuda:1 2.00, 2.50 | - |",
    "| cut | - | - | - | - | - | - | - | - | - |"], "made-up rows: %r" % made.stdout)

expect(run("a", "b").returncode == 2, "two arguments: not exit 2")
with tempfile.TemporaryDirectory() as d:
    expect(run(os.path.join(d, "none.log")).returncode == 2, "a missing log: not exit 2")

for f in failures:
    print("FAIL:", f)
sys.exit(1 if failures else 0)
