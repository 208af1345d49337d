#!/usr/bin/env python3
"""deploy/gpu/profile_compare.py's evaluation mode over a made-up Kineto trace.

The trace is an objective evaluation shaped as the seventy-ninth session's (a
composition and a merge, an encoder of 3 layers, a merge on another stream, a
decoder of 3 blocks, the LM head), each kernel a known length and every gap
0.5 us, so that every printed figure has a known value; and a generation trace
(greedy picks) keeps to its own summary.
"""
import json
import os
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
script = os.path.join(os.environ.get("TEST_SRCDIR", ""), os.environ.get("TEST_WORKSPACE", ""),
                      "deploy/gpu/profile_compare.py")
if not os.path.exists(script):
    script = os.path.join(here, "../../deploy/gpu/profile_compare.py")
failures = []


def expect(cond, what):
    if not cond:
        failures.append(what)


class Trace:
    """Kernels one after another on stream 7, 0.5 us apart."""

    def __init__(self):
        self.events, self.t = [], 1000.0

    def kernel(self, name, dur, stream=7, at=None):
        ts = self.t if at is None else at
        self.events.append({"cat": "kernel", "name": name, "ts": ts, "dur": dur,
                            "args": {"stream": stream}})
        if at is None:
            self.t = ts + dur + 0.5

    def write(self, path):
        with open(path, "w") as f:
            json.dump({"traceEvents": self.events}, f)


ATT = "void lorahub::RegisterTiledAttentionKernel<float, 3, 5, 8>(AttentionArgs)"
SPLIT = "void lorahub::SplitKeyAttentionKernel<float, 16>(AttentionArgs, DecodeStepArgs)"
NORM = "void lorahub::AddRmsNormKernel<bf16>(float const*)"

ev = Trace()
ev.kernel("ComposeBf16Kernel", 69.0)
ev.kernel("LowRankMergeMmaKernel<4>", 80.0)
ev.kernel("LowRankMergeMmaKernel<4>", 258.0, stream=143, at=ev.t)  # beside the encoder
ev.kernel("void lorahub::RmsNormKernel<bf16>(float const*)", 5.0)  # the encoder's first norm
ev.kernel("nvjet_qkv", 8.0)
for layer in range(3):
    ev.kernel(ATT, 11.0)
    ev.kernel("nvjet_o", 5.0)
    ev.kernel(NORM, 2.0)
    ev.kernel("nvjet_wi", 9.0)
    ev.kernel("GatedGeluTanhVecKernel", 3.0)
    ev.kernel("nvjet_wo", 8.0)
    ev.kernel(NORM, 2.5)  # the next layer's norm, or the encoder's final one
    if layer < 2:
        ev.kernel("nvjet_qkv", 8.0)
encoder_end = ev.t - 0.5
ev.kernel("indexSelectSmallIndex", 6.0)
ev.kernel("void lorahub::RmsNormKernel<bf16>(float const*)", 2.0)
ev.kernel("nvjet_dec_qkv", 5.0)
for block in range(3):
    ev.kernel(SPLIT, 3.0)
    ev.kernel("nvjet_dec_o", 3.5)
    ev.kernel(NORM, 1.5)
    ev.kernel("nvjet_cross_q", 4.0)
    ev.kernel(SPLIT, 6.0)
    ev.kernel("nvjet_cross_o", 3.5)
    ev.kernel(NORM, 1.5)
    ev.kernel("nvjet_dec_wi", 6.0)
    ev.kernel("GatedGeluTanhVecKernel", 2.0)
    ev.kernel("nvjet_dec_wo", 4.5)
    ev.kernel(NORM, 1.5)
    if block < 2:
        ev.kernel("nvjet_dec_qkv", 5.0)
ev.kernel("nvjet_lm_head", 26.0)
ev.kernel("TokenNllKernel", 5.0)

with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "profile.json")
    ev.write(path)
    out = subprocess.run([sys.executable, script, path, "--top", "0"], capture_output=True,
                         text=True)
    expect(out.returncode == 0, "exit %d: %s" % (out.returncode, out.stderr))
    text = out.stdout
    lines = text.splitlines()

    def has(line):
        expect(line in lines, "missing %r in:\n%s" % (line, text))

    has("  set-up (to the encoder's first norm): 150.0 us, 2 kernels")
    # From the first norm (at 1,150 us) to the end of the final one, named in 40 characters.
    has("  encoder: 3 layers, %.1f us (to the end of lorahub::AddRmsNormKernel<bf16>(float co)"
        % (encoder_end - 1150.0))
    has("  after the encoder: 185.0 us, 40 kernels")
    has("  other streams: 1 kernels, 258.0 us busy, from 150.0 to 408.0 us")
    has("encoder layers (attention to attention): 2 periods of 8 kernels (2 of that length), "
        "median period 52.5 us")
    has("   11.00      nan   lorahub::RegisterTiledAttentionKernel<float, 3, 5, 8>(AttentionArgs)")
    has("    2.50     0.50   lorahub::AddRmsNormKernel<bf16>(float const*)")
    has("   48.50            kernels' sum; gaps 4.00")
    has("decoder blocks (self-attention to self-attention): 2 periods of 12 kernels "
        "(2 of that length), median period 48.0 us")
    has("   42.00            kernels' sum; gaps 6.00")

    # A generation trace (greedy picks) keeps to its decode-step summary.
    gen = Trace()
    for step in range(3):
        gen.kernel("nvjet_step", 4.0)
        gen.kernel("GreedyTokensKernel<bf16, 2>", 6.0)
    gpath = os.path.join(tmp, "profile.generate.json")
    gen.write(gpath)
    g = subprocess.run([sys.executable, script, gpath, "--top", "0"], capture_output=True,
                       text=True)
    expect(g.returncode == 0, "generation: exit %d: %s" % (g.returncode, g.stderr))
    expect("  decode steps: 2, span 10.5 us, busy 10.0 us, 2 kernels (means)" in
           g.stdout.splitlines(), "generation summary: %s" % g.stdout)
    expect("encoder" not in g.stdout, "generation trace read as an evaluation: %s" % g.stdout)

for f in failures:
    print("FAIL:", f)
sys.exit(1 if failures else 0)
