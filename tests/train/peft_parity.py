#!/usr/bin/env python3
"""Checks an adapter (from `lorahub train-module` or `lorahub learn --out`) against transformers+peft.

Run on a host with torch, transformers, peft and sentencepiece (the GPU host):
  python3 tests/train/peft_parity.py --model BASE_DIR --adapter ADAPTER_DIR \
      --examples FILE.jsonl [--lorahub PATH/TO/lorahub]

It loads the base (config.json + model.safetensors + spiece.model, as written by
`lorahub train-base` or ref_lorahub.py fixture) with T5ForConditionalGeneration in fp32 on the
CPU, the adapter with PeftModel.from_pretrained, and computes the LoraHub reference loss: all
examples in one batch, inputs padded with pad (attention mask 0), labels padded with -100, the
model's mean token cross-entropy (eos included) divided by the number of examples, as
shared/bench/ref_lorahub.py's Ref.loss does. With --lorahub it runs
`lorahub score --model BASE --adapter ADAPTER --examples FILE --json` and fails unless both
losses agree to 1e-4 relative. Exit 0 on success, 1 on a loss mismatch, 2 on a setup problem.

Tokenizer: AutoTokenizer.from_pretrained(BASE_DIR), as the reference loads it, when the
directory has a tokenizer_config.json; else SentencePiece directly (spiece.model ids + eos,
what T5's legacy tokenizer gives for text without special tokens). Either way the ids of every
example are checked against spiece.model's, because a tokenizer that silently does not use the
vocabulary makes the loss meaningless. (That happened: under transformers 5.x,
`T5Tokenizer(vocab_file=...)` ignores vocab_file and builds a minimal Unigram vocabulary of
the special tokens and "▁", so every word became "▁" <unk>; this script used it until the
issue-4 GPU run showed PEFT's loss off by 0.5-20%.)
"""
import argparse
import json
import os
import subprocess
import sys

import torch


def spm_ids(model_dir, texts, eos_id):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "spiece.model"))
    return [list(sp.encode(t)) + [eos_id] for t in texts]


def tokenize(model_dir, texts, eos_id):
    """ids per text, and the name of the tokenizer that gave them."""
    reference = spm_ids(model_dir, texts, eos_id)
    if not os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
        return reference, "sentencepiece"
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [list(x) for x in tok(texts)["input_ids"]]
    for i, (got, want) in enumerate(zip(ids, reference)):
        if got != want:
            print("%s: %s gives ids %s for %r, spiece.model gives %s" %
                  (model_dir, type(tok).__name__, got[:12], texts[i][:40], want[:12]), file=sys.stderr)
            sys.exit(2)
    return ids, type(tok).__name__


def pad(rows, value):
    n = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=torch.long)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--examples", required=True)
    p.add_argument("--lorahub")
    a = p.parse_args()
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration
    rows = [json.loads(l) for l in open(a.examples) if l.strip()]
    if not rows:
        print("%s: no examples" % a.examples, file=sys.stderr)
        sys.exit(2)
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    pad_id, eos_id = cfg.get("pad_token_id", 0), cfg.get("eos_token_id", 1)
    inputs, tok_name = tokenize(a.model, [r["input"] for r in rows], eos_id)
    labels, _ = tokenize(a.model, [r["output"] for r in rows], eos_id)
    base = T5ForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a.adapter).eval()
    input_ids = pad(inputs, pad_id)
    attention_mask = pad([[1] * len(r) for r in inputs], 0)
    lab = pad(labels, -100)
    with torch.no_grad():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=lab).loss.item() / len(rows)
    print(json.dumps({"peft_loss": loss, "examples": len(rows), "tokenizer": tok_name}))
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
