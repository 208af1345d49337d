#!/usr/bin/env python3
"""Checks a module trained by `lorahub train-module` against transformers+peft.

Run on a host with torch, transformers, peft and sentencepiece (the GPU host):
  python3 tests/train/peft_parity.py --model BASE_DIR --adapter ADAPTER_DIR \
      --examples FILE.jsonl [--lorahub PATH/TO/lorahub]

It loads the base (config.json + model.safetensors + spiece.model, as written
by `lorahub train-base`) with T5ForConditionalGeneration in fp32, the adapter
with PeftModel.from_pretrained, and computes the LoraHub reference loss (mean
token cross-entropy per batch of all examples, eos included). With --lorahub
it runs `lorahub score --model BASE --adapter ADAPTER --examples FILE --json`
and fails unless both losses agree to 1e-4 relative. Exit 0 on success.
"""
import argparse
import json
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import T5ForConditionalGeneration, T5Tokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--examples", required=True)
    p.add_argument("--lorahub")
    a = p.parse_args()
    rows = [json.loads(l) for l in open(a.examples) if l.strip()]
    tok = T5Tokenizer(vocab_file=f"{a.model}/spiece.model", legacy=True)
    base = T5ForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    enc = tok([r["input"] for r in rows], return_tensors="pt", padding=True)
    lab = tok([r["output"] for r in rows], return_tensors="pt", padding=True).input_ids
    lab[lab == tok.pad_token_id] = -100
    with torch.no_grad():
        loss = model(**enc, labels=lab).loss.item() / len(rows)
    print(json.dumps({"peft_loss": loss, "examples": len(rows)}))
    if a.lorahub:
        out = subprocess.run([a.lorahub, "score", "--model", a.model, "--adapter",
                              a.adapter, "--examples", a.examples, "--json"],
                             check=True, capture_output=True, text=True).stdout
        ours = json.loads(out.strip().splitlines()[-1])["loss"]
        rel = abs(ours - loss) / max(abs(loss), 1e-12)
        print(json.dumps({"lorahub_loss": ours, "relative_error": rel}))
        if rel > 1e-4:
            sys.exit(1)


if __name__ == "__main__":
    main()
