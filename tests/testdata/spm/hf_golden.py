#!/usr/bin/env python3
"""Writes hf_golden.tsv: what Hugging Face's T5Tokenizer (legacy=True, the
default of t5/flan-t5 checkpoints) gives for the tiny spiece.model, so that
tests/tokenizer/hf_parity_test.cc can check lorahub's tokenizer against HF
itself rather than against our reading of HF's code.

Run where transformers + sentencepiece are installed (the GPU host):
    cd tests/testdata/spm && python3 hf_golden.py > hf_golden.tsv
then commit hf_golden.tsv. Lines: "encode<TAB>text<TAB>ids" and
"decode<TAB>ids<TAB>text" (decode with skip_special_tokens=True).
"""
import sys

import transformers
from transformers import T5Tokenizer

tok = T5Tokenizer(vocab_file="spiece.model", extra_ids=100, legacy=True)
texts = [line.rstrip("\n") for line in open("texts.txt", encoding="utf-8")]
texts += [
    "",
    "Hello <extra_id_0>.",
    "Summarize:<extra_id_5>the garden is green",
    "a <extra_id_1> b <extra_id_2>  c",
    "<extra_id_99>",
    "<pad>x<unk>Hello",
    "Hello</s>",
    "Hello</s>x",
]
out = sys.stdout
out.write(f"# transformers {transformers.__version__}\n")
for text in texts:
    ids = tok(text)["input_ids"]
    out.write("encode\t%s\t%s\n" % (text, " ".join(map(str, ids))))
for ids in ([3, 393, 206, 149, 1], [0, 3, 393, 206, 499, 3, 6, 1, 0, 0],
            [3, 393, 206, 2, 3, 6], [499, 498, 400], []):
    text = tok.decode(ids, skip_special_tokens=True)
    out.write("decode\t%s\t%s\n" % (" ".join(map(str, ids)), text))
