#!/usr/bin/env python3
"""Checks core/learn/composition against PEFT's LoraModel.add_weighted_adapter.

Input: the JSON written by //tests/learn:composition_dump (checked in as
tests/learn/testdata/composition_cases.json). Needs torch and peft (the GPU host has both).
Everything runs on the CPU, whatever GPU the host has: the check is about the semantics, and
dare's masks must come from torch's CPU (mt19937) generator, the one our dump draws from.

dare_linear and PEFT's random stream: add_weighted_adapter draws its Bernoulli masks from
torch's global generator, per target module in named_modules order (t0, then t1), for each
module first every adapter's lora_A (in adapter order), then every adapter's lora_B, each with
torch.bernoulli(torch.full_like(factor, density)) on the factor's device and dtype (float32
here). BUT before the first mask it calls inject_adapter for the new adapter, whose layer
construction draws from the same global generator (nn.Linear init of lora_A and lora_B, then
kaiming_uniform_ of lora_A, for every target). A torch.manual_seed(seed) before
add_weighted_adapter is therefore consumed partly by that initialisation, and the masks come
from a later point of the stream. This script reseeds torch's global generator right after the
merged adapter is injected (a wrapper around the LoraModel's inject_adapter), i.e. immediately
before the first mask: that is the state our dump's CPU generator (seeded with dare_seed) starts
from. A second line, dare_linear/torch, replays the masks with torch alone in the order above,
so a mismatch can be told apart: PEFT's order (dare_linear fails, dare_linear/torch passes)
or torch's CPU RNG itself (both fail).

  python3 tests/learn/check_composition_vs_peft.py tests/learn/testdata/composition_cases.json

For each method it builds a toy model with two Linear targets t0, t1, loads the three adapters
with the stored factors (adapter i gets lora_alpha = alphas[i], r = rank), calls
add_weighted_adapter and compares the merged adapter's lora_A / lora_B (and, for lorahub, the
reference formula sum w A, sum w B) with ours. Prints one line per method and exits non-zero
on a mismatch.
"""
import json
import math
import sys

import torch
from torch import nn


def tensor(j):
    return torch.tensor(j["data"], dtype=torch.float64).reshape(j["shape"]).float()


class Toy(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.t0 = nn.Linear(d_in, d_out, bias=False)
        self.t1 = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.t0(x) + self.t1(x)


def main():
    from peft import LoraConfig, get_peft_model
    if hasattr(torch, "set_default_device"):
        torch.set_default_device("cpu")  # CPU tensors, CPU generator: see the docstring
    c = json.load(open(sys.argv[1]))
    n, r = c["modules"], c["rank"]
    weights = c["weights"]
    targets = [(tensor(t["a"]), tensor(t["b"])) for t in c["targets"]]
    ok = True
    for name, res in c["results"].items():
        torch.manual_seed(0)
        model = Toy(c["in"], c["out"])
        names = ["m%d" % i for i in range(n)]
        cfgs = [LoraConfig(r=r, lora_alpha=c["alphas"][i], target_modules=["t0", "t1"], lora_dropout=0.0)
                for i in range(n)]
        peft_model = get_peft_model(model, cfgs[0], adapter_name=names[0])
        for i in range(1, n):
            peft_model.add_adapter(names[i], cfgs[i])
        base = peft_model.base_model.model
        for t, layer in enumerate([base.t0, base.t1]):
            for i in range(n):
                layer.lora_A[names[i]].weight.data = targets[t][0][i].clone()
                layer.lora_B[names[i]].weight.data = targets[t][1][i].clone()
        if name == "lorahub":
            got = [(sum(w * targets[t][0][i] for i, w in enumerate(weights)),
                    sum(w * targets[t][1][i] for i, w in enumerate(weights))) for t in range(2)]
        else:
            kind = {"cat": "cat", "ties_total": "ties", "ties_frequency": "ties",
                    "dare_linear": "dare_linear"}[name]
            kw = {}
            if kind != "cat":
                kw["density"] = res["density"]
            if name == "ties_frequency":
                kw["majority_sign_method"] = "frequency"
            lora_model = peft_model.base_model
            inject = lora_model.inject_adapter

            injected = []

            def inject_then_seed(*args, **kwargs):
                out = inject(*args, **kwargs)
                torch.manual_seed(c["dare_seed"])  # the masks start from this state
                injected.append(True)
                return out

            torch.manual_seed(c["dare_seed"])
            lora_model.inject_adapter = inject_then_seed
            try:
                lora_model.add_weighted_adapter(names, weights, "merged", combination_type=kind, **kw)
            finally:
                del lora_model.inject_adapter
            if not injected:
                print("%s: add_weighted_adapter did not call self.inject_adapter; torch was seeded"
                      " only before the call (this PEFT draws in another order)" % name)
            got = [(layer.lora_A["merged"].weight.data.clone(), layer.lora_B["merged"].weight.data.clone())
                   for layer in [base.t0, base.t1]]
        worst = 0.0
        for t in range(2):
            ours_a, ours_b = tensor(res["targets"][t]["a"]), tensor(res["targets"][t]["b"])
            pa, pb = got[t]
            if pa.shape != ours_a.shape or pb.shape != ours_b.shape:
                print(name, "target", t, "shape mismatch", tuple(pa.shape), tuple(ours_a.shape),
                      tuple(pb.shape), tuple(ours_b.shape))
                ok = False
                continue
            worst = max(worst, (pa - ours_a).abs().max().item(), (pb - ours_b).abs().max().item())
        status = "OK" if worst <= 1e-5 else "MISMATCH"
        ok = ok and worst <= 1e-5
        print("%-15s max |peft - ours| = %.3g  %s" % (name, worst, status))
    if "dare_linear" in c["results"]:
        worst = dare_torch_only(c, targets)
        status = "OK" if worst <= 1e-5 else "MISMATCH"
        ok = ok and worst <= 1e-5
        print("%-15s max |torch - ours| = %.3g  %s" % ("dare_linear/torch", worst, status))
    return 0 if ok else 1


def dare_torch_only(c, targets):
    """dare_linear replayed with torch alone, masks in PEFT's order (see the docstring)."""
    res = c["results"]["dare_linear"]
    d = res["density"]
    n, r = c["modules"], c["rank"]
    ws = [w * a / r for w, a in zip(c["weights"], c["alphas"])]
    wa = torch.tensor([math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in ws])
    wb = torch.tensor([math.sqrt(abs(v)) for v in ws])
    torch.manual_seed(c["dare_seed"])
    worst = 0.0
    for t in range(len(targets)):
        for side, key, w in ((0, "a", wa), (1, "b", wb)):
            x = targets[t][side]
            pruned = torch.stack([x[i] * torch.bernoulli(torch.full_like(x[i], d)) / d for i in range(n)])
            got = (pruned * w.view(n, 1, 1)).sum(0)
            worst = max(worst, (got - tensor(res["targets"][t][key])).abs().max().item())
    return worst


if __name__ == "__main__":
    sys.exit(main())
