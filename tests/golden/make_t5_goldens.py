#!/usr/bin/env python3
"""Golden fixtures for the C++ T5 + LoRA engine: tiny random T5 checkpoints, PEFT adapters, a
sentencepiece model and the outputs of transformers + peft on them (the parity oracle of issue 3).

Run on a machine with torch, transformers 5.x, peft, safetensors and sentencepiece (the GPU host):

  python3 tests/golden/make_t5_goldens.py --out tests/testdata/t5           # write + self-check
  python3 tests/golden/make_t5_goldens.py --check tests/testdata/t5         # re-verify with HF/peft
  python3 tests/golden/make_t5_goldens.py --self-check tests/testdata/t5    # torch + numpy only

Everything is computed on the CPU in float32 (CUDA is hidden before torch is imported), with
fixed seeds and one thread, so the goldens do not depend on the GPU. The goldens are always
computed from the files as written (the checkpoint is reloaded with from_pretrained and the
adapters with PeftModel.from_pretrained), never from the in-memory objects that produced them.

Layout, per case (see tests/testdata/t5/README.md for the full contract):
  <case>/model/      config.json, generation_config.json, weights, spiece.model, tokenizer_config.json
  <case>/adapters/<name>/  adapter_config.json + adapter_model.safetensors | adapter_model.bin
  <case>/golden.json       ids, losses, generation outputs, config facts, tensor index
  <case>/golden.safetensors  encoder_hidden.<variant> [B,S,d], logits.<variant> [B,T,V] (fp32)

Choices (why):
- Weights are initialised by this script (init_weights), not by transformers' _init_weights, so
  the checkpoint does not change when transformers changes its init; layer-norm weights are
  1 + 0.2*N(0,1) so a port that ignores them fails; the relative-attention bias has std 1 so the
  bucket logic matters; q is scaled x2 for sharper attention.
- Logits are made peaky (untied: lm_head x gain; tied: decoder final_layer_norm x gain, since
  the tied lm_head is the embedding) so greedy decoding is not a near tie; the per-step top-2
  margin of every greedy row is recorded (for bf16 comparisons).
- LoRA A and B are N(0, 0.3^2) so adapters change the outputs substantially (PEFT's default
  init has B = 0, which would make every adapter golden equal the base).
- Composition is the LoraHub rule: A = sum_i w_i A_i and B = sum_i w_i B_i per key (in fp32, in
  the order of the adapter list), loaded with set_peft_model_state_dict into a PeftModel built
  on the first adapter, exactly as the LoraHub reference does (bench/ref_lorahub.py set_weights).
- The loss is the LoraHub reference definition: for batches of batch_size examples (null = all
  in one batch), each padded to its own longest sequence, sum of HF's per-batch mean token CE
  (labels padded with -100) divided by the number of examples. score = loss + 0.05*mean|w|.
- Teacher-forced tensors use the whole example set as one padded batch, labels as above and
  decoder_input_ids = shift_right(labels) (start token 0, -100 replaced by pad 0); the logits
  rows at label positions of -100 are included (they are well defined).
- Generation: do_sample=False, explicit decoder_start/eos/pad ids, num_return_sequences=1,
  beams with length_penalty 1.0, early_stopping False. The odd-shape case (encoder and decoder
  depths differ) uses use_cache=False because transformers 5.x generate fails with a cache index
  error there; every teacher-forced forward also passes use_cache=False.
"""
import argparse
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import traceback

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # goldens are CPU fp32; keep the GPU out

import numpy as np  # noqa: E402
import torch  # noqa: E402

PAD, EOS, UNK = 0, 1, 2
LORA_STD = 0.3
# Largest fp32-vs-float64 difference (relative to the scale) a new fixture may have: 10x below the
# 1e-4 parity bound, so that the bound measures the port and not rounding order (fp32_noise_floor).
MAX_NOISE_FLOOR = 1e-5
L1_COEF = 0.05
SIZE_WARN_BYTES = 4 * 1024 * 1024

# ----------------------------------------------------------------------------------------------
# Data: sentencepiece corpus, examples, hard tokenizer strings
# ----------------------------------------------------------------------------------------------

WORDS = ["date", "today", "tomorrow", "yesterday", "week", "month", "year", "options", "answer",
         "infer", "the", "from", "context", "what", "is", "in", "a", "of", "was", "on", "ago",
         "born", "concert", "leap", "first", "last", "day", "birthday", "two", "days", "one",
         "because", "and", "march", "her", "it", "q", "translate", "english", "to", "german",
         "house", "wonderful", "café", "naïve", "über", "straße"]
CJK_LINES = ["日本語のテキストです。", "中文文本，今天是星期一。", "東京は日本の首都です", "你好世界 再见"]

SHORT_EXAMPLES = [
    ("infer the date: today is 03/31/2021. what is the date tomorrow?", "04/01/2021"),
    ("what day was yesterday? options: (A) monday (B) sunday", "(B)"),
    ("the concert was two days ago on 06/15/2018.", "the answer is 06/17/2018"),
    ("born on the first day of 2001", "01/01/2001"),
    ("leap year", "(C) 02/29/2016"),
]

LONG_EXAMPLES = [
    ("infer the date from context: today is the last day of march 2021 and the concert was two days ago. "
     "what is the date one week from today? options: (A) 04/07/2021 (B) 04/08/2021",
     "the answer is (A) because today is 03/31/2021 and one week from today is the first week"),
    ("q: what is in a leap year? a: one more day", "the last day of the month is 02/29"),
    ("yesterday was 12/31/1999. what is the date today? options: (A) 01/01/2000 (B) 01/02/2000", "(A) 01/01/2000"),
    ("translate english to german: the house is wonderful", "das haus ist wunderbar"),
]

HARD_STRINGS = [
    "",
    " ",
    "hello",
    "the date today",
    "  leading two spaces",
    "trailing spaces   ",
    "runs   of    spaces  inside",
    "tab\tseparated\twords",
    "new\nline\n\nand blank line\n",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "date 03/31/2021 (A) (B)",
    "unicode café naïve über straße Ünïcödé",
    "中文文本 日本語のテキスト",
    "emoji 😀🎉 mixed with text",
    "<extra_id_0>",
    "Hello <extra_id_0>.",
    "fill <extra_id_0> and <extra_id_99> here",
    "<extra_id_99>x<extra_id_1> y",
    "</s> inside text",
    "full-width ＡＢＣ １２３ and ligature ﬁ",
    "non\u00a0breaking and zero\u200bwidth",
    "UPPER lower MiXeD",
]


def corpus_lines(seed):
    """A fixed corpus: the examples, the word list in random sentences, dates, options, CJK."""
    rng = np.random.default_rng(seed)
    lines = [x + " " + y for x, y in SHORT_EXAMPLES + LONG_EXAMPLES]
    lines += CJK_LINES * 20
    for _ in range(4000):
        parts = []
        for _ in range(int(rng.integers(4, 25))):
            r = rng.random()
            if r < 0.65:
                parts.append(WORDS[int(rng.integers(len(WORDS)))])
            elif r < 0.8:
                parts.append("%02d/%02d/%04d" % (rng.integers(1, 13), rng.integers(1, 29), rng.integers(1900, 2100)))
            elif r < 0.88:
                parts.append("(%s)" % "ABCD"[int(rng.integers(4))])
            elif r < 0.93:
                parts.append(str(int(rng.integers(0, 100000))) + ",.:?!"[int(rng.integers(5))])
            else:
                parts.append("".join(chr(int(c)) for c in rng.integers(97, 123, size=int(rng.integers(2, 8)))))
        lines.append(" ".join(parts))
    return lines


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

def _lora(r, alpha, targets, **kw):
    d = dict(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=kw.pop("lora_dropout", 0.1))
    d.update(kw)
    return d


CASES = {
    # 1. flan-like: gated-gelu, untied lm_head, fp32 model.safetensors, three q/v adapters (the LoraHub format).
    "gated_untied": dict(
        description="flan-t5-like: gated-gelu, untied lm_head, fp32 model.safetensors; 3 LoraHub-style "
                    "q,v adapters (r=4, alpha=8, safetensors) for composition",
        config=dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        seed=101, logit_gain=1.5, weights="safetensors", store_dtype="float32", shard=None, use_cache=True,
        examples="short",
        adapters={
            "m0": dict(format="safetensors", dtype="float32", seed=1, lora=_lora(4, 8, ["q", "v"])),
            "m1": dict(format="safetensors", dtype="float32", seed=2, lora=_lora(4, 8, ["q", "v"])),
            "m2": dict(format="safetensors", dtype="float32", seed=3, lora=_lora(4, 8, ["q", "v"])),
        },
        variants={
            "base": ([], []),
            "m0": (["m0"], [1.0]),
            "mix_a": (["m0", "m1", "m2"], [0.5, -0.3, 0.8]),
            "mix_b": (["m0", "m1", "m2"], [-1.5, 1.5, 0.2]),
        },
        tensor_variants=["base", "m0", "mix_a", "mix_b"],
        loss_points=[([], []), (["m0"], [1.0]), (["m0", "m1", "m2"], [0.0, 0.0, 0.0]),
                     (["m0", "m1", "m2"], [1.0, 0.0, 0.0]),
                     (["m0", "m1", "m2"], [0.5, -0.3, 0.8]), (["m0", "m1", "m2"], [-0.5, 0.3, -0.8]),
                     (["m0", "m1", "m2"], [-1.5, 1.5, 0.2]), (["m0", "m1", "m2"], [0.3, 0.3, 0.3])],
        batch_sizes=[None, 2],
        greedy=["base", "m0", "mix_a"], beam=["base", "mix_a"], max_new_tokens=12, beam_max_new_tokens=10,
        bf16_loss=False,
        # Written before the floor was measured: logits.mix_b's floor is 6.2e-5 (2026-11-30, --check; with
        # alpha 2 it would still be 1.2e-5). Many service tests use this case, so it stays as it is.
        max_noise_floor=7e-5,
    ),
    # 2. original T5 v1.0: relu, tied embeddings (d_model^-0.5 rescale), pytorch_model.bin, rslora adapter on all linears.
    "relu_tied_bin": dict(
        description="t5 v1.0-like: relu, tied embeddings, pytorch_model.bin (zip pickle, embeddings share one "
                    "storage, no lm_head.weight key); adapter on q,k,v,o,wi,wo as adapter_model.bin with rslora",
        config=dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="relu", tie_word_embeddings=True),
        seed=202, logit_gain=8.0, weights="bin", store_dtype="float32", shard=None, use_cache=True,
        examples="short",
        adapters={
            "full": dict(format="bin", dtype="float32", seed=11,
                         lora=_lora(4, 8, ["q", "k", "v", "o", "wi", "wo"], use_rslora=True)),
        },
        variants={
            "base": ([], []),
            "full": (["full"], [1.0]),
            "full_w07": (["full"], [0.7]),
        },
        tensor_variants=["base", "full", "full_w07"],
        loss_points=[([], []), (["full"], [1.0]), (["full"], [0.7]), (["full"], [-0.7]), (["full"], [0.0])],
        batch_sizes=[None, 2],
        greedy=["base", "full"], beam=["base", "full"], max_new_tokens=12, beam_max_new_tokens=10,
        bf16_loss=False,
    ),
    # 3. odd shapes: 8 buckets / max distance 20, d_kv*heads != d_model, 3 encoder vs 2 decoder layers.
    "odd_shapes": dict(
        description="gated-gelu untied; 8 buckets, max distance 20; num_heads*d_kv=36 != d_model=32; 3 encoder "
                    "and 2 decoder layers (use_cache=False); regex targets in cross attention and wi_0/wi_1 with "
                    "rank_pattern/alpha_pattern (safetensors), list targets with patterns (bin)",
        config=dict(d_model=32, d_kv=12, num_heads=3, d_ff=48, num_layers=3, num_decoder_layers=2,
                    relative_attention_num_buckets=8, relative_attention_max_distance=20,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        seed=303, logit_gain=1.5, weights="safetensors", store_dtype="float32", shard=None, use_cache=False,
        examples="long",
        adapters={
            # alphas a quarter of the first version's (8 -> 2, q 16 -> 4): its logits' fp32 noise floor was
            # 6.9e-5 of scale (fp32_noise_floor), and CUDA fp32 with fused GEMMs landed at 1.27e-4.
            "xattn": dict(format="safetensors", dtype="float32", seed=21, lora=_lora(
                4, 2, r".*\.(EncDecAttention\.(q|k|v|o)|DenseReluDense\.wi_[01])",
                rank_pattern={"EncDecAttention.k": 2, "decoder.block.1.layer.1.EncDecAttention.o": 6},
                alpha_pattern={"wi_1": 3, "EncDecAttention.q": 4})),
            "selfkv": dict(format="bin", dtype="float32", seed=22, lora=_lora(
                3, 5, ["SelfAttention.k", "v", "wo"], lora_dropout=0.0,
                rank_pattern={"wo": 5}, alpha_pattern={"encoder.block.2.layer.0.SelfAttention.k": 1})),
        },
        variants={
            "base": ([], []),
            "xattn": (["xattn"], [1.0]),
            "selfkv": (["selfkv"], [1.0]),
            "xattn_wm08": (["xattn"], [-0.8]),
        },
        tensor_variants=["base", "xattn", "selfkv"],
        loss_points=[([], []), (["xattn"], [1.0]), (["selfkv"], [1.0]), (["xattn"], [-0.8])],
        batch_sizes=[None, 2],
        greedy=["base", "xattn", "selfkv"], beam=["base", "xattn"], max_new_tokens=24, beam_max_new_tokens=24,
        bf16_loss=False,
    ),
    # 4. bf16-stored, sharded safetensors checkpoint; goldens in fp32 from the bf16 weights, plus bf16 losses.
    "bf16_sharded": dict(
        description="gated-gelu untied stored in bfloat16, sharded (model-0000k-of-0000n.safetensors + index); "
                    "2 bf16 adapters on q,k,v,o (safetensors); goldens computed in fp32 from the bf16 weights, "
                    "plus bf16 losses",
        config=dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        seed=404, logit_gain=1.5, weights="safetensors", store_dtype="bfloat16", shard="40KB", use_cache=True,
        examples="short",
        adapters={
            # alpha 4 (scaling 1): with alpha 16 the composed delta was 4x the base weights, the attention
            # saturated, and fp32 rounding alone moved the "mix" logits by 1e-4 of their scale
            # (fp32_noise_floor), the parity bound itself.
            "b0": dict(format="safetensors", dtype="bfloat16", seed=31, lora=_lora(4, 4, ["q", "k", "v", "o"])),
            "b1": dict(format="safetensors", dtype="bfloat16", seed=32, lora=_lora(4, 4, ["q", "k", "v", "o"])),
        },
        variants={
            "base": ([], []),
            "mix": (["b0", "b1"], [0.6, -0.9]),
        },
        tensor_variants=["base", "mix"],
        loss_points=[([], []), (["b0", "b1"], [0.6, -0.9]), (["b0", "b1"], [1.0, 1.0])],
        batch_sizes=[None, 2],
        greedy=["base", "mix"], beam=["mix"], max_new_tokens=12, beam_max_new_tokens=10,
        bf16_loss=True,
    ),
}

NUM_BEAMS = 4
LENGTH_PENALTY = 1.0
EARLY_STOPPING = False


def examples_for(spec):
    return SHORT_EXAMPLES if spec["examples"] == "short" else LONG_EXAMPLES


def fail(msg):
    raise RuntimeError(msg)


# ----------------------------------------------------------------------------------------------
# Small helpers that need only torch/numpy (unit-tested locally by test_make_t5_goldens.py)
# ----------------------------------------------------------------------------------------------

def padded_vocab_size(tokenizer_len):
    """Model rows >= tokenizer size, rounded to a multiple of 8 with 9..16 spare rows (like 32100 -> 32128)."""
    return tokenizer_len + 16 - tokenizer_len % 8


def trim_generated(row, max_new_tokens):
    """generate() row -> tokens without the start token, up to and including eos, no padding."""
    row = [int(t) for t in row]
    if not row or row[0] != PAD:
        fail("generated row does not start with the decoder start token 0: %r" % row[:4])
    gen = row[1:]
    if EOS in gen:
        k = gen.index(EOS)
        rest = gen[k + 1:]
        if any(t != PAD for t in rest):
            fail("non-pad tokens after eos in generated row: %r" % row)
        gen = gen[:k + 1]
    elif len(gen) != max_new_tokens:
        fail("row without eos has %d tokens, expected max_new_tokens=%d: %r" % (len(gen), max_new_tokens, row))
    if len(gen) > max_new_tokens:
        fail("row longer than max_new_tokens: %r" % row)
    return gen


def shift_right(labels):
    """T5 _shift_right: start token 0, then labels[:-1] with -100 replaced by pad."""
    dec = torch.full_like(labels, PAD)
    dec[:, 1:] = labels[:, :-1]
    dec[dec == -100] = PAD
    return dec


def ce_mean(logits, labels):
    """HF seq2seq loss: mean token cross entropy over labels != -100, computed in float64 here."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    mask = labels != -100
    tgt = labels.clamp(min=0)
    nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return float(nll[mask].sum() / mask.sum())


def pattern_value(pattern, module_name, default):
    """PEFT get_pattern_key: first key k with re.match(r'(.*\\.)?(k)$', name) wins, else the default."""
    for key in pattern:
        if re.match(r"(.*\.)?(%s)$" % key, module_name):
            return pattern[key]
    return default


def lora_scaling(conf, module_name):
    """(rank, scaling) of one LoRA module from adapter_config.json, computed without peft."""
    r = pattern_value(conf.get("rank_pattern") or {}, module_name, conf["r"])
    alpha = pattern_value(conf.get("alpha_pattern") or {}, module_name, conf["lora_alpha"])
    return r, (alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r)


_ST_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "I64": (np.int64, 8), "BF16": (None, 2)}


def read_safetensors(path):
    """Minimal safetensors reader (torch + numpy only) for --self-check on machines without the package."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        if dt not in _ST_DTYPES:
            fail("%s: tensor %s has unsupported dtype %s" % (path, name, dt))
        a, b = info["data_offsets"]
        raw = data[base + a:base + b]
        shape = info["shape"]
        if dt == "BF16":
            u16 = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            t = torch.from_numpy(u16.view(np.float32).copy()).reshape(shape)
        else:
            t = torch.from_numpy(np.frombuffer(raw, dtype=_ST_DTYPES[dt][0]).copy()).reshape(shape)
        out[name] = t
    return out


def dir_size(path):
    total = 0
    for root, _, files in os.walk(path):
        for fn in files:
            total += os.path.getsize(os.path.join(root, fn))
    return total


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Building the checkpoints
# ----------------------------------------------------------------------------------------------

def train_spm(work_dir, seed):
    import sentencepiece as spm
    prefix = os.path.join(work_dir, "spiece")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines(seed)), model_prefix=prefix,
                                   vocab_size=256, model_type="unigram", pad_id=PAD, eos_id=EOS, unk_id=UNK,
                                   bos_id=-1, hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
                                   minloglevel=2)
    os.remove(prefix + ".vocab")
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    if sp.pad_id() != PAD or sp.eos_id() != EOS or sp.unk_id() != UNK or sp.bos_id() != -1:
        fail("spm special ids are wrong: pad %d eos %d unk %d bos %d" % (sp.pad_id(), sp.eos_id(), sp.unk_id(),
                                                                        sp.bos_id()))
    return prefix + ".model"


def write_tokenizer_files(model_dir, spm_path):
    shutil.copyfile(spm_path, os.path.join(model_dir, "spiece.model"))
    # the same tokenizer_config.json as bench/ref_lorahub.py writes (the LoraHub fixture format)
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 512, "extra_ids": 100, "eos_token": "</s>", "pad_token": "<pad>",
                   "unk_token": "<unk>", "tokenizer_class": "T5Tokenizer"}, f, indent=1)


def init_weights(model, cfg, seed, logit_gain):
    """Deterministic explicit init (independent of transformers' _init_weights); see module docstring."""
    g = torch.Generator().manual_seed(seed)
    d, dkv, nh, dff = cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff
    std = {"shared": 1.0, "embed_tokens": 1.0, "lm_head": 1.0,
           "q": 2.0 * (d * dkv) ** -0.5, "k": d ** -0.5, "v": d ** -0.5, "o": (nh * dkv) ** -0.5,
           "relative_attention_bias": 1.0, "wi": d ** -0.5, "wi_0": d ** -0.5, "wi_1": d ** -0.5,
           "wo": dff ** -0.5}
    seen = 0
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            parts = name.split(".")
            if parts[-1] != "weight":
                fail("unexpected parameter %s" % name)
            leaf = parts[-2]
            if leaf in ("layer_norm", "final_layer_norm"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif leaf in std:
                p.copy_(torch.randn(p.shape, generator=g) * std[leaf])
            else:
                fail("no init rule for parameter %s" % name)
            seen += 1
        if cfg.tie_word_embeddings:
            model.decoder.final_layer_norm.weight.mul_(logit_gain)
        else:
            model.lm_head.weight.mul_(logit_gain)
    if seen < 10:
        fail("only %d parameters initialised" % seen)


def check_ties(model, tied):
    """Hard-fails on a wrong lm_head tie; returns whether encoder/decoder embed_tokens share `shared`."""
    sp = model.shared.weight.data_ptr()
    if tied != (model.lm_head.weight.data_ptr() == sp):
        fail("lm_head tie state %s does not match tie_word_embeddings=%s"
             % (model.lm_head.weight.data_ptr() == sp, tied))
    return (model.encoder.embed_tokens.weight.data_ptr() == sp
            and model.decoder.embed_tokens.weight.data_ptr() == sp)


def check_tie_values(model, tied):
    """After loading: the embeddings (and a tied lm_head) must hold the values of shared.weight."""
    w = model.shared.weight
    pairs = [("encoder.embed_tokens", model.encoder.embed_tokens.weight),
             ("decoder.embed_tokens", model.decoder.embed_tokens.weight)]
    if tied:
        pairs.append(("lm_head", model.lm_head.weight))
    for name, t in pairs:
        if not torch.equal(t, w):
            fail("%s.weight differs from shared.weight after loading" % name)


LOAD_NOTES = []


def load_base(model_dir, dtype):
    """The base model as a user loads it: from_pretrained(dir, dtype=...), eval mode.

    Should from_pretrained refuse pytorch_model.bin, the .bin is loaded by hand (weights_only torch.load
    into a model built from config.json; only a tied lm_head.weight may be missing) and this is recorded
    in golden.json under "load_notes", so the goldens are still produced.
    """
    from transformers import T5Config, T5ForConditionalGeneration
    try:
        model = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    except Exception:
        binp = os.path.join(model_dir, "pytorch_model.bin")
        if not os.path.exists(binp):
            raise
        note = "from_pretrained failed on pytorch_model.bin; loaded by hand: " + traceback.format_exc(limit=2)
        if note not in LOAD_NOTES:
            LOAD_NOTES.append(note)
            print("WARNING: " + note, file=sys.stderr)
        cfg = T5Config.from_pretrained(model_dir)
        model = T5ForConditionalGeneration(cfg)
        sd = torch.load(binp, map_location="cpu", weights_only=True)
        res = model.load_state_dict(sd, strict=False)
        allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        allowed |= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
        if res.unexpected_keys or set(res.missing_keys) - allowed:
            fail("manual .bin load: missing %s unexpected %s" % (res.missing_keys, res.unexpected_keys))
        model = model.to(dtype)
    model.eval()
    if model.training:
        fail("model is in training mode")
    return model


def build_model(case_dir, spec, spm_path, tokenizer_len):
    from transformers import T5Config, T5ForConditionalGeneration
    model_dir = os.path.join(case_dir, "model")
    os.makedirs(model_dir)
    cfg = T5Config(vocab_size=padded_vocab_size(tokenizer_len), dropout_rate=0.1, layer_norm_epsilon=1e-6,
                   decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS, use_cache=True,
                   **spec["config"])
    tied = spec["config"]["tie_word_embeddings"]
    # transformers 5.17 drops tie_word_embeddings=False given to T5Config(...) (the saved
    # config.json says true and lm_head is tied): set the attribute after construction.
    cfg.tie_word_embeddings = tied
    torch.manual_seed(spec["seed"])
    model = T5ForConditionalGeneration(cfg).eval()
    if not tied and model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
        print("WARNING: transformers tied lm_head despite tie_word_embeddings=False; untying by hand",
              file=sys.stderr)
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
        model.config.tie_word_embeddings = False
    embed_shared = check_ties(model, tied)
    init_weights(model, cfg, spec["seed"], spec["logit_gain"])
    if not embed_shared:  # should not happen (T5 ties them); keep the values equal anyway and say so
        print("WARNING: encoder/decoder embed_tokens are separate parameters; copying shared into them",
              file=sys.stderr)
        with torch.no_grad():
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    check_ties(model, tied)
    check_tie_values(model, tied)
    if spec["store_dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}

    if spec["weights"] == "bin":
        # transformers 5 dropped saving .bin (safe_serialization=False), so write it the way transformers 4
        # did: torch.save of the state dict (zip format). The tied lm_head.weight is left out and the
        # embeddings share one storage, as in old checkpoints.
        model.config.save_pretrained(model_dir)
        gc = getattr(model, "generation_config", None)
        if gc is not None:
            gc.save_pretrained(model_dir)
        sd = model.state_dict()
        if spec["config"]["tie_word_embeddings"]:
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        torch.save(sd, os.path.join(model_dir, "pytorch_model.bin"))
    elif spec["shard"]:
        model.save_pretrained(model_dir, max_shard_size=spec["shard"])
    else:
        model.save_pretrained(model_dir)
    write_tokenizer_files(model_dir, spm_path)

    files = sorted(os.listdir(model_dir))
    shards = [f for f in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]
    if spec["weights"] == "bin":
        if "pytorch_model.bin" not in files:
            fail("pytorch_model.bin not written: %s" % files)
    elif spec["shard"]:
        if "model.safetensors.index.json" not in files or len(shards) < 2:
            fail("expected a sharded checkpoint (index + >= 2 shards), got %s" % files)
    elif "model.safetensors" not in files:
        fail("model.safetensors not written: %s" % files)

    # reload as a user would and verify every tensor round-trips
    loaded = load_base(model_dir, torch.float32)
    check_ties(loaded, tied)
    check_tie_values(loaded, tied)
    lsd = loaded.state_dict()
    for k, v in reference.items():
        if k not in lsd:
            fail("reloaded model lacks %s" % k)
        if not torch.equal(lsd[k], v.float()):
            fail("reloaded tensor %s differs from the saved one" % k)
    return model_dir, {"embed_tokens_share_storage_in_memory": embed_shared}


def checkpoint_keys(model_dir):
    """name -> [dtype, shape] as stored in the checkpoint files (what the C++ loader will see)."""
    out = {}
    for fn in sorted(os.listdir(model_dir)):
        p = os.path.join(model_dir, fn)
        if fn.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(p, framework="pt") as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    out[k] = [str(t.dtype).replace("torch.", ""), list(t.shape), fn]
        elif fn.endswith(".bin"):
            sd = torch.load(p, map_location="cpu", weights_only=True)
            for k, t in sd.items():
                out[k] = [str(t.dtype).replace("torch.", ""), list(t.shape), fn]
    return out


def write_adapter_config(adir, peft_config):
    conf = peft_config.to_dict()
    for k, v in list(conf.items()):
        if isinstance(v, set):
            conf[k] = sorted(v)
    conf["base_model_name_or_path"] = "../../model"
    conf["inference_mode"] = True
    text = json.dumps(conf, indent=2, sort_keys=True, default=str)
    with open(os.path.join(adir, "adapter_config.json"), "w") as f:
        f.write(text + "\n")


def build_adapter(model_dir, adir, aspec):
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.utils.save_and_load import get_peft_model_state_dict
    os.makedirs(adir)
    base = load_base(model_dir, torch.float32)
    pm = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, **aspec["lora"]))
    sd = get_peft_model_state_dict(pm)
    if not sd:
        fail("adapter %s selects no modules" % adir)
    g = torch.Generator().manual_seed(aspec["seed"])
    dtype = getattr(torch, aspec["dtype"])
    out = {}
    for k in sorted(sd):
        if not (k.startswith("base_model.model.") and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))):
            fail("unexpected adapter key %s" % k)
        out[k] = (torch.randn(sd[k].shape, generator=g) * LORA_STD).to(dtype).contiguous()
    write_adapter_config(adir, pm.peft_config["default"])
    if aspec["format"] == "bin":
        torch.save(out, os.path.join(adir, "adapter_model.bin"))
    else:
        from safetensors.torch import save_file
        save_file(out, os.path.join(adir, "adapter_model.safetensors"), metadata={"format": "pt"})


def read_adapter(adir):
    st = os.path.join(adir, "adapter_model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file
        sd = load_file(st)
    else:
        sd = torch.load(os.path.join(adir, "adapter_model.bin"), map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in sd.items()}


def compose(sds, weights):
    """LoraHub: final[k] = sum_i w_i * sd_i[k] for every key (lora_A and lora_B alike), in list order."""
    keys = sorted(sds[0])
    for i, sd in enumerate(sds[1:], 1):
        if sorted(sd) != keys:
            fail("adapter %d has different keys from adapter 0" % i)
        for k in keys:
            if sd[k].shape != sds[0][k].shape:
                fail("adapter %d key %s shape %s != %s" % (i, k, tuple(sd[k].shape), tuple(sds[0][k].shape)))
    final = {}
    for i, sd in enumerate(sds):
        for k in keys:
            final[k] = weights[i] * sd[k] if i == 0 else final[k] + weights[i] * sd[k]
    return final


def variant_model(case_dir, adapters, weights, dtype):
    """Base alone, or a PeftModel on adapters[0] with the composed state dict loaded (the reference path)."""
    model = load_base(os.path.join(case_dir, "model"), dtype)
    if not adapters:
        return model
    if len(adapters) != len(weights):
        fail("adapters %s and weights %s differ in length" % (adapters, weights))
    from peft import PeftModel
    from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict
    adirs = [os.path.join(case_dir, "adapters", a) for a in adapters]
    pm = PeftModel.from_pretrained(model, adirs[0], is_trainable=False)
    final = compose([read_adapter(d) for d in adirs], weights)
    res = set_peft_model_state_dict(pm, dict(final))
    if res.unexpected_keys:
        fail("set_peft_model_state_dict: unexpected keys %s" % res.unexpected_keys[:5])
    missing = [k for k in res.missing_keys if "lora_" in k]
    if missing:
        fail("set_peft_model_state_dict: missing LoRA keys %s" % missing[:5])
    got = get_peft_model_state_dict(pm)
    if sorted(got) != sorted(final):
        fail("PEFT state dict keys differ from the composed keys")
    for k, v in got.items():
        if not torch.equal(v.float(), final[k].to(v.dtype).float()):
            fail("PEFT did not take the composed tensor %s" % k)
    pm.eval()
    return pm


def lora_modules(pm):
    """module name -> {r, scaling, in, out} as PEFT instantiated them (adapter 'default')."""
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "scaling") and "default" in getattr(mod, "lora_A", {}):
            short = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
            out[short] = {"r": int(mod.r["default"]), "scaling": float(mod.scaling["default"]),
                          "in_features": int(mod.lora_A["default"].weight.shape[1]),
                          "out_features": int(mod.lora_B["default"].weight.shape[0])}
    if not out:
        fail("no LoRA modules found in the PEFT model")
    return out


# ----------------------------------------------------------------------------------------------
# Computing the goldens
# ----------------------------------------------------------------------------------------------

def load_tokenizer(model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id != PAD or tok.eos_token_id != EOS or tok.unk_token_id != UNK:
        fail("tokenizer special ids: pad %s eos %s unk %s" % (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id))
    return tok


def tokenizer_info(tok, sp):
    mism = [i for i in range(sp.get_piece_size()) if tok.convert_ids_to_tokens(i) != sp.id_to_piece(i)]
    legacy = getattr(tok, "legacy", None)
    if not isinstance(legacy, (bool, type(None))):
        legacy = str(legacy)
    return {"class": type(tok).__name__, "is_fast": bool(getattr(tok, "is_fast", False)),
            "legacy": legacy, "len": len(tok), "sp_piece_size": sp.get_piece_size(),
            "pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id, "unk_id": tok.unk_token_id,
            "extra_id_0": tok.convert_tokens_to_ids("<extra_id_0>"),
            "extra_id_99": tok.convert_tokens_to_ids("<extra_id_99>"),
            "pieces_differing_from_sp": mism[:20], "num_pieces_differing_from_sp": len(mism)}


def tokenizer_goldens(tok, sp):
    rows = []
    for text in HARD_STRINGS:
        ids = [int(i) for i in tok(text)["input_ids"]]
        sp_ids = [int(i) for i in sp.encode(text, out_type=int)]
        rows.append({"text": text, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids), "sp_ids": sp_ids,
                     "sp_pieces": sp.encode(text, out_type=str),
                     "decoded": tok.decode(ids, skip_special_tokens=True), "sp_decoded": sp.decode(sp_ids),
                     "ids_equal_sp_plus_eos": ids == sp_ids + [EOS]})
    return rows


def encode_batch(tok, inputs, outputs):
    enc = tok(list(inputs), max_length=2048, padding=True, truncation=True, return_tensors="pt")
    lab = tok(list(outputs), max_length=2048, padding=True, truncation=True, return_tensors="pt")["input_ids"].clone()
    lab[lab == tok.pad_token_id] = -100
    return enc["input_ids"], enc["attention_mask"], lab


def ref_loss(model, tok, inputs, outputs, batch_size):
    n = len(inputs)
    bs = n if batch_size is None else min(n, batch_size)
    total = 0.0
    for i in range(0, n, bs):
        ids, mask, lab = encode_batch(tok, inputs[i:i + bs], outputs[i:i + bs])
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False)
        total += float(out.loss.detach().float())
    return total / n


def generate(model, ids, mask, num_beams, max_new_tokens, use_cache):
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=num_beams, num_return_sequences=1,
              max_new_tokens=max_new_tokens, decoder_start_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD,
              use_cache=use_cache, return_dict_in_generate=True, output_scores=num_beams > 1)
    if num_beams > 1:
        kw.update(length_penalty=LENGTH_PENALTY, early_stopping=EARLY_STOPPING)
    with torch.no_grad():
        out = model.generate(**kw)
    rows = [trim_generated(r, max_new_tokens) for r in out.sequences.tolist()]
    scores = getattr(out, "sequences_scores", None)
    return rows, (None if scores is None else [float(s) for s in scores.float().tolist()])


def greedy_margins(model, ids, mask, rows):
    """Teacher-force each greedy row; per-step top1-top2 logit margin; argmax must equal the token."""
    margins = []
    for b, row in enumerate(rows):
        dec = torch.tensor([[PAD] + row[:-1]])
        with torch.no_grad():
            logits = model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], decoder_input_ids=dec,
                           use_cache=False).logits[0].float()
        top = logits.topk(2, dim=-1).values
        m = (top[:, 0] - top[:, 1]).tolist()
        am = logits.argmax(-1).tolist()
        for t, tokid in enumerate(row):
            if am[t] != tokid and m[t] > 1e-3:
                fail("greedy row %d step %d: generate chose %d but the teacher-forced argmax is %d (margin %.4g)"
                     % (b, t, tokid, am[t], m[t]))
        margins.append([round(x, 6) for x in m])
    return margins


class ModelCache:
    def __init__(self, case_dir):
        self.case_dir = case_dir
        self.models = {}

    def get(self, adapters, weights, dtype=torch.float32):
        key = (tuple(adapters), tuple(float(w) for w in weights), str(dtype))
        if key not in self.models:
            self.models[key] = variant_model(self.case_dir, list(adapters), list(weights), dtype)
        return self.models[key]


def effective_config(cfg):
    keys = ["vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
            "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj",
            "dense_act_fn", "is_gated_act", "tie_word_embeddings", "layer_norm_epsilon", "pad_token_id",
            "eos_token_id", "decoder_start_token_id", "is_encoder_decoder"]
    optional = {"decoder_start_token_id", "is_encoder_decoder", "dense_act_fn", "is_gated_act"}
    out = {}
    for k in keys:
        if not hasattr(cfg, k) and k not in optional:
            fail("config lacks %s" % k)
        v = getattr(cfg, k, None)
        out[k] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


def versions():
    import peft
    import safetensors
    import sentencepiece
    import transformers
    mods = {"torch": torch, "transformers": transformers, "peft": peft, "safetensors": safetensors,
            "sentencepiece": sentencepiece, "numpy": np}
    out = {"python": sys.version.split()[0]}
    out.update({k: str(getattr(m, "__version__", "unknown")) for k, m in mods.items()})
    return out


def compute_goldens(case, spec, case_dir, spm_path):
    import sentencepiece as spm
    model_dir = os.path.join(case_dir, "model")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "spiece.model"))
    tok = load_tokenizer(model_dir)
    ex = examples_for(spec)
    inputs, outputs = [x for x, _ in ex], [y for _, y in ex]
    ids, mask, lab = encode_batch(tok, inputs, outputs)
    dec = shift_right(lab)
    cache = ModelCache(case_dir)
    base = cache.get([], [])
    gen_cfg = getattr(base, "generation_config", None)

    g = {"case": case, "description": spec["description"], "versions": versions(),
         "dtype": spec["store_dtype"], "compute_dtype": "float32", "device": "cpu",
         "config": effective_config(base.config), "weights_format": spec["weights"],
         "model_files": sorted(os.listdir(model_dir)), "checkpoint_keys": checkpoint_keys(model_dir),
         "spiece_sha256": sha256(os.path.join(model_dir, "spiece.model")),
         "tokenizer_info": tokenizer_info(tok, sp), "tokenizer": tokenizer_goldens(tok, sp),
         "inputs": inputs, "outputs": outputs, "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
         "label_ids": lab.tolist(), "decoder_input_ids": dec.tolist(),
         "use_cache": spec["use_cache"],
         "generation": {"do_sample": False, "num_beams_greedy": 1, "num_beams": NUM_BEAMS,
                        "length_penalty": LENGTH_PENALTY, "early_stopping": EARLY_STOPPING,
                        "num_return_sequences": 1, "decoder_start_token_id": PAD, "eos_token_id": EOS,
                        "pad_token_id": PAD, "use_cache": spec["use_cache"],
                        "saved_generation_config": None if gen_cfg is None else
                        json.loads(json.dumps(gen_cfg.to_dict(), default=str))},
         "load_notes": list(LOAD_NOTES), "lora_std": LORA_STD, "l1_coef": L1_COEF,
         "adapters": {}, "variants": {}, "tensors": {}, "loss": [], "loss_bf16": [], "greedy": [], "beam": []}

    vocab = g["config"]["vocab_size"]
    if g["tokenizer_info"]["len"] > vocab or int(ids.max()) >= vocab or int(lab.max()) >= vocab:
        fail("tokenizer size %d / ids exceed the model vocab %d" % (g["tokenizer_info"]["len"], vocab))
    for name, aspec in spec["adapters"].items():
        adir = os.path.join(case_dir, "adapters", name)
        with open(os.path.join(adir, "adapter_config.json")) as f:
            conf = json.load(f)
        pm = cache.get([name], [1.0])
        mods = lora_modules(pm)
        disagree = []
        for mname, info in mods.items():  # our own reading of the config should agree with PEFT
            r, s = lora_scaling(conf, mname)
            if r != info["r"] or abs(s - info["scaling"]) > 1e-12:
                disagree.append(mname)
                print("WARNING: adapter %s module %s: PEFT r=%d scaling=%g, config parse gives r=%d scaling=%g"
                      % (name, mname, info["r"], info["scaling"], r, s), file=sys.stderr)
        files = sorted(os.listdir(adir))
        g["adapters"][name] = {"dir": "adapters/" + name, "files": files, "format": aspec["format"],
                               "stored_dtype": aspec["dtype"], "r": conf["r"], "lora_alpha": conf["lora_alpha"],
                               "use_rslora": conf.get("use_rslora", False),
                               "target_modules": conf["target_modules"],
                               "rank_pattern": conf.get("rank_pattern"), "alpha_pattern": conf.get("alpha_pattern"),
                               "num_tensors": 2 * len(mods), "modules": mods,
                               "modules_where_config_parse_disagrees_with_peft": disagree}

    tensors = {}
    for v in spec["tensor_variants"]:
        adapters, weights = spec["variants"][v]
        g["variants"][v] = {"adapters": adapters, "weights": weights}
        model = cache.get(adapters, weights)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False)
            out2 = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False)
        if not torch.allclose(out.logits, out2.logits, rtol=0, atol=1e-6):
            fail("%s/%s: logits with labels differ from logits with our shift_right" % (case, v))
        enc = out.encoder_last_hidden_state.float().contiguous()
        logits = out.logits.float().contiguous()
        if enc.shape != (ids.shape[0], ids.shape[1], g["config"]["d_model"]):
            fail("encoder_hidden shape %s" % (tuple(enc.shape),))
        if logits.shape != (lab.shape[0], lab.shape[1], g["config"]["vocab_size"]):
            fail("logits shape %s" % (tuple(logits.shape),))
        tensors["encoder_hidden." + v] = enc
        tensors["logits." + v] = logits
        g["tensors"]["encoder_hidden." + v] = {"variant": v, "kind": "encoder_hidden", "shape": list(enc.shape)}
        g["tensors"]["logits." + v] = {"variant": v, "kind": "logits", "shape": list(logits.shape),
                                       "max_abs": float(logits.abs().max())}
    for v in set(spec["greedy"]) | set(spec["beam"]):
        g["variants"].setdefault(v, {"adapters": spec["variants"][v][0], "weights": spec["variants"][v][1]})

    for adapters, weights in spec["loss_points"]:
        model = cache.get(adapters, weights)
        reg = L1_COEF * (sum(abs(w) for w in weights) / len(weights) if weights else 0.0)
        for bs in spec["batch_sizes"]:
            loss = ref_loss(model, tok, inputs, outputs, bs)
            g["loss"].append({"adapters": adapters, "weights": weights, "batch_size": bs, "loss": loss,
                              "score": loss + reg})
        if spec["bf16_loss"]:
            mb = cache.get(adapters, weights, torch.bfloat16)
            wo = [m for n, m in mb.named_modules() if n.endswith("DenseReluDense.wo")][0]
            wo_dtype = str(getattr(wo, "base_layer", wo).weight.dtype).replace("torch.", "")
            for bs in spec["batch_sizes"]:
                loss = ref_loss(mb, tok, inputs, outputs, bs)
                g["loss_bf16"].append({"adapters": adapters, "weights": weights, "batch_size": bs, "loss": loss,
                                       "score": loss + reg, "dtype": "bfloat16", "device": "cpu",
                                       "wo_weight_dtype": wo_dtype})

    for v in spec["greedy"]:
        adapters, weights = spec["variants"][v]
        model = cache.get(adapters, weights)
        rows, _ = generate(model, ids, mask, 1, spec["max_new_tokens"], spec["use_cache"])
        g["greedy"].append({"variant": v, "adapters": adapters, "weights": weights,
                            "max_new_tokens": spec["max_new_tokens"], "use_cache": spec["use_cache"],
                            "output_ids": rows, "top2_margin": greedy_margins(model, ids, mask, rows)})
    for v in spec["beam"]:
        adapters, weights = spec["variants"][v]
        model = cache.get(adapters, weights)
        rows, scores = generate(model, ids, mask, NUM_BEAMS, spec["beam_max_new_tokens"], spec["use_cache"])
        g["beam"].append({"variant": v, "adapters": adapters, "weights": weights, "num_beams": NUM_BEAMS,
                          "length_penalty": LENGTH_PENALTY, "early_stopping": EARLY_STOPPING,
                          "max_new_tokens": spec["beam_max_new_tokens"], "use_cache": spec["use_cache"],
                          "output_ids": rows, "sequence_scores": scores})
    return g, tensors


def write_goldens(case_dir, g, tensors):
    from safetensors.torch import save_file
    save_file(tensors, os.path.join(case_dir, "golden.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(case_dir, "golden.json"), "w") as f:
        json.dump(g, f, indent=1, ensure_ascii=False)
        f.write("\n")


def make_case(case, spec, out_dir, spm_path, tokenizer_len):
    case_dir = os.path.join(out_dir, case)
    if os.path.exists(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    model_dir, _ = build_model(case_dir, spec, spm_path, tokenizer_len)
    for name, aspec in spec["adapters"].items():
        build_adapter(model_dir, os.path.join(case_dir, "adapters", name), aspec)
    g, tensors = compute_goldens(case, spec, case_dir, spm_path)
    floor = fp32_noise_floor(case_dir, g, tensors)
    g["fp32_noise_floor"] = floor
    print("[%s] fp32 noise floor (vs float64): %s" % (case, json.dumps({k: float("%.3g" % v) for k, v in floor.items()})),
          flush=True)
    limit = spec.get("max_noise_floor", MAX_NOISE_FLOOR)
    bad = {k: v for k, v in floor.items() if v > limit}
    if bad:
        fail("%s: fp32 rounding alone moves %s by more than %g of scale: the fixture is too ill-conditioned "
             "for the 1e-4 parity bound" % (case, bad, limit))
    write_goldens(case_dir, g, tensors)
    self_check_case(case_dir)
    print("[%s] wrote %s (%.0f KB)" % (case, case_dir, dir_size(case_dir) / 1024.0), flush=True)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def rel_err(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def self_check_case(case_dir):
    """Consistency of the written files, torch + numpy only: loss(null batch) from the stored logits."""
    with open(os.path.join(case_dir, "golden.json")) as f:
        g = json.load(f)
    t = read_safetensors(os.path.join(case_dir, "golden.safetensors"))
    if sorted(t) != sorted(g["tensors"]):
        fail("%s: golden.safetensors names %s != golden.json tensors %s" % (case_dir, sorted(t), sorted(g["tensors"])))
    lab = torch.tensor(g["label_ids"])
    ids = torch.tensor(g["input_ids"])
    n = len(g["inputs"])
    if ids.shape[0] != n or lab.shape[0] != n or torch.tensor(g["attention_mask"]).shape != ids.shape:
        fail("%s: inconsistent batch shapes" % case_dir)
    if not torch.equal(shift_right(lab), torch.tensor(g["decoder_input_ids"])):
        fail("%s: decoder_input_ids != shift_right(label_ids)" % case_dir)
    checked = 0
    for name, info in g["tensors"].items():
        if list(t[name].shape) != info["shape"]:
            fail("%s: %s shape %s != %s" % (case_dir, name, list(t[name].shape), info["shape"]))
        if not torch.isfinite(t[name]).all():
            fail("%s: %s has non-finite values" % (case_dir, name))
        if info["kind"] != "logits":
            continue
        var = g["variants"][info["variant"]]
        for e in g["loss"]:
            if e["batch_size"] is None and e["adapters"] == var["adapters"] and e["weights"] == var["weights"]:
                mine = ce_mean(t[name], lab) / n
                if rel_err(mine, e["loss"]) > 1e-5:
                    fail("%s: loss of %s from stored logits %.8g != golden %.8g" % (case_dir, name, mine, e["loss"]))
                checked += 1
    if checked == 0:
        fail("%s: no loss entry could be checked against the stored logits" % case_dir)
    for e in g["loss"] + g["loss_bf16"]:
        reg = L1_COEF * (sum(abs(w) for w in e["weights"]) / len(e["weights"]) if e["weights"] else 0.0)
        if abs(e["score"] - e["loss"] - reg) > 1e-9:
            fail("%s: score != loss + 0.05*mean|w|" % case_dir)
    for e in g["greedy"]:
        if len(e["top2_margin"]) != n or any(len(m) != len(r) for m, r in zip(e["top2_margin"], e["output_ids"])):
            fail("%s: top2_margin does not align with output_ids" % case_dir)
    for e in g["greedy"] + g["beam"]:
        for r in e["output_ids"]:
            if not r or len(r) > e["max_new_tokens"] or (EOS in r and r.index(EOS) != len(r) - 1):
                fail("%s: bad output row %r" % (case_dir, r))
            if EOS not in r and len(r) != e["max_new_tokens"]:
                fail("%s: row without eos shorter than max_new_tokens %r" % (case_dir, r))
    return checked


def merged_model(case_dir, adapters, weights, dtype=torch.float32):
    """Independent of peft: fold s * (sum w B)(sum w A) into a plain T5 (fp32, or float64 for the exact
    answer), scaling from our own parse."""
    model = load_base(os.path.join(case_dir, "model"), dtype)
    if not adapters:
        return model
    confs, sds = [], []
    for a in adapters:
        adir = os.path.join(case_dir, "adapters", a)
        with open(os.path.join(adir, "adapter_config.json")) as f:
            confs.append(json.load(f))
        sds.append(read_adapter(adir))
    final = compose(sds, weights)
    conf = confs[0]  # LoraHub takes the scaling from the first module's config
    sd = model.state_dict()
    prefix = "base_model.model."
    count = 0
    for k in sorted(final):
        if not k.endswith(".lora_A.weight"):
            continue
        mod = k[len(prefix):-len(".lora_A.weight")]
        A, B = final[k], final[prefix + mod + ".lora_B.weight"]
        r, s = lora_scaling(conf, mod)
        if A.shape[0] != r or B.shape[1] != r:
            fail("%s: rank %d from config, tensors have %d/%d" % (mod, r, A.shape[0], B.shape[1]))
        sd[mod + ".weight"] = sd[mod + ".weight"] + s * (B.double() @ A.double()).to(dtype)
        count += 1
    if count == 0:
        fail("no LoRA pairs merged")
    model.load_state_dict(sd)
    return model.eval()


def fp32_noise_floor(case_dir, g, t):
    """name -> max |fp32 golden - float64 answer| / max|golden| for each golden tensor.

    The float64 answer folds the composed deltas into a float64 copy of the (stored) weights; the
    difference is what fp32 rounding alone does on this fixture. A port that computes in fp32 can only
    be held to the 1e-4 bound where this floor is well below it: a fixture whose floor approaches the
    bound is ill-conditioned (saturated attention, large adapters) and measures rounding order, not
    parity. make_case refuses a fixture whose floor exceeds MAX_NOISE_FLOOR."""
    ids = torch.tensor(g["input_ids"])
    mask = torch.tensor(g["attention_mask"])
    lab = torch.tensor(g["label_ids"])
    floor = {}
    for name, info in g["tensors"].items():
        var = g["variants"][info["variant"]]
        model = merged_model(case_dir, var["adapters"], var["weights"], torch.float64)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False)
        exact = out.logits if info["kind"] == "logits" else out.encoder_last_hidden_state
        want = t[name].double()
        floor[name] = float((exact - want).abs().max() / want.abs().max())
    return floor


def check_case(case_dir):
    """Reload the written fixtures with transformers/peft and re-verify them (see --check)."""
    import sentencepiece as spm
    with open(os.path.join(case_dir, "golden.json")) as f:
        g = json.load(f)
    t = read_safetensors(os.path.join(case_dir, "golden.safetensors"))
    model_dir = os.path.join(case_dir, "model")
    tok = load_tokenizer(model_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "spiece.model"))
    for row in g["tokenizer"]:
        if [int(i) for i in tok(row["text"])["input_ids"]] != row["ids"]:
            fail("tokenizer ids changed for %r" % row["text"])
        if sp.encode(row["text"], out_type=int) != row["sp_ids"]:
            fail("sentencepiece ids changed for %r" % row["text"])
    ids, mask, lab = encode_batch(tok, g["inputs"], g["outputs"])
    if ids.tolist() != g["input_ids"] or mask.tolist() != g["attention_mask"] or lab.tolist() != g["label_ids"]:
        fail("re-tokenised inputs/labels differ from golden.json")
    cache = ModelCache(case_dir)
    worst = {}
    for name, info in g["tensors"].items():
        var = g["variants"][info["variant"]]
        model = cache.get(var["adapters"], var["weights"])
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False)
        got = (out.logits if info["kind"] == "logits" else out.encoder_last_hidden_state).float()
        scale = max(1.0, float(t[name].abs().max()))
        err = float((got - t[name]).abs().max()) / scale
        if err > 1e-5:
            fail("%s: recomputed %s differs, max abs err / scale = %.3g" % (case_dir, name, err))
        worst[name] = err
        if info["kind"] == "logits":  # independent path: merged weights, our own scaling
            mm = merged_model(case_dir, var["adapters"], var["weights"])
            with torch.no_grad():
                lm = mm(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False).logits.float()
            err = float((lm - t[name]).abs().max()) / scale
            if err > 1e-4:
                fail("%s: merged-weights logits for %s differ from PEFT's, max abs err / scale = %.3g"
                     % (case_dir, name, err))
            worst["merged." + name] = err
    for e in g["loss"]:
        model = cache.get(e["adapters"], e["weights"])
        loss = ref_loss(model, tok, g["inputs"], g["outputs"], e["batch_size"])
        if rel_err(loss, e["loss"]) > 1e-5:
            fail("%s: loss %s w=%s bs=%s: %.8g != golden %.8g" % (case_dir, e["adapters"], e["weights"],
                                                                   e["batch_size"], loss, e["loss"]))
    for e in g["greedy"] + g["beam"]:
        model = cache.get(e["adapters"], e["weights"])
        nb = e.get("num_beams", 1)
        rows, _ = generate(model, ids, mask, nb, e["max_new_tokens"], e["use_cache"])
        if rows != e["output_ids"]:
            fail("%s: %s generation for %s changed" % (case_dir, "beam" if nb > 1 else "greedy", e["variant"]))
    for name, v in fp32_noise_floor(case_dir, g, t).items():
        worst["fp64." + name] = v
    self_check_case(case_dir)
    return worst


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def run_cases(names, fn):
    failures = []
    for case in names:
        try:
            fn(case)
        except Exception:  # report every case, then fail
            failures.append(case)
            print("[%s] FAILED:\n%s" % (case, traceback.format_exc()), file=sys.stderr, flush=True)
    return failures


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", help="write the fixtures into this directory (e.g. tests/testdata/t5)")
    mode.add_argument("--check", metavar="DIR", help="re-verify written fixtures with transformers/peft")
    mode.add_argument("--self-check", metavar="DIR", help="consistency check with torch + numpy only")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ",".join(CASES))
    p.add_argument("--spm-seed", type=int, default=7)
    a = p.parse_args()
    names = [c for c in a.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error("unknown cases %s" % unknown)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    if a.self_check:
        failures = run_cases(names, lambda c: print("[%s] self-check ok (%d losses vs logits)"
                                                    % (c, self_check_case(os.path.join(a.self_check, c)))))
    elif a.check:
        def one(c):
            worst = check_case(os.path.join(a.check, c))
            print("[%s] check ok; worst rel errors: %s" % (c, json.dumps({k: float("%.3g" % v) for k, v in worst.items()})),
                  flush=True)
        failures = run_cases(names, one)
    else:
        os.makedirs(a.out, exist_ok=True)
        work = os.path.join(a.out, ".spm_work")
        if os.path.exists(work):
            shutil.rmtree(work)
        os.makedirs(work)
        import sentencepiece as spm
        spm_path = train_spm(work, a.spm_seed)
        sp = spm.SentencePieceProcessor(model_file=spm_path)
        tokenizer_len = sp.get_piece_size() + 100
        print("spm: %d pieces, tokenizer size %d, model vocab %d" % (sp.get_piece_size(), tokenizer_len,
                                                                     padded_vocab_size(tokenizer_len)), flush=True)
        failures = run_cases(names, lambda c: make_case(c, CASES[c], a.out, spm_path, tokenizer_len))
        shutil.rmtree(work)
        total = sum(dir_size(os.path.join(a.out, c)) for c in names if os.path.isdir(os.path.join(a.out, c)))
        print("total fixture size: %.0f KB" % (total / 1024.0))
        if total > SIZE_WARN_BYTES:
            print("WARNING: fixtures exceed %d bytes" % SIZE_WARN_BYTES, file=sys.stderr)
    if failures:
        print("FAILED cases: %s" % ",".join(failures), file=sys.stderr)
        sys.exit(1)
    print("ok: %s" % ",".join(names))


if __name__ == "__main__":
    main()
