#!/usr/bin/env bash
# Regenerates spiece.model, the tiny SentencePiece model the tokenizer tests use,
# from corpus.txt (text written for this project). T5-like settings: unigram,
# pad=0, eos=1, unk=2, no bos, no byte fallback, full character coverage.
# Needs spm_train from Debian's `sentencepiece` package (0.1.97).
#   tests/testdata/spm/make_spm.sh
set -euo pipefail
cd "$(dirname "$0")"
spm_train --input=corpus.txt --model_prefix=spiece --model_type=unigram \
  --vocab_size=400 --character_coverage=1.0 \
  --pad_id=0 --eos_id=1 --unk_id=2 --bos_id=-1 \
  --pad_piece='<pad>' --eos_piece='</s>' --unk_piece='<unk>' \
  --num_threads=1 --seed_sentencepiece_size=100000 \
  --minloglevel=2 >/dev/null 2>&1
rm -f spiece.vocab
ls -l spiece.model
# golden.tsv: for each line of texts.txt, "text<TAB>ids<TAB>decoded" as
# spm_encode/spm_decode give them (ids without T5's eos, which the tokenizer adds).
spm_encode --model=spiece.model --output_format=id < texts.txt > /tmp/lh_spm_ids.$$
spm_decode --model=spiece.model --input_format=id < /tmp/lh_spm_ids.$$ > /tmp/lh_spm_dec.$$
paste texts.txt /tmp/lh_spm_ids.$$ /tmp/lh_spm_dec.$$ > golden.tsv
rm -f /tmp/lh_spm_ids.$$ /tmp/lh_spm_dec.$$
