#!/usr/bin/env python3
"""Checks core/learn/composition against PEFT's LoraModel.add_weighted_adapter.

Input: the JSON written by //tests/learn:composition_dump (checked in as
tests/learn/testdata/composition_cases.json). Needs torch and peft (the GPU host has both; CPU
is used so that dare's masks come from the same mt19937 stream as ours).

  python3 tests/learn/check_composition_vs_peft.py tests/learn/testdata/composition_cases.json

For each method it builds a toy model with two Linear targets t0, t1, loads the three adapters
with the stored factors (adapter i gets lora_alpha = alphas[i], r = rank), calls
add_weighted_adapter and compares the merged adapter's lora_A / lora_B (and, for lorahub, the
reference formula sum w A, sum w B) with ours. Prints one line per method and exits non-zero
on a mismatch.
"""
import json
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
            torch.manual_seed(c["dare_seed"])
            peft_model.base_model.add_weighted_adapter(names, weights, "merged", combination_type=kind, **kw)
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
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
