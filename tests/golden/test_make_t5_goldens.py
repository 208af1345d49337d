#!/usr/bin/env python3
"""Unit tests for the parts of make_t5_goldens.py that need only torch + numpy.

Run here with the Debian interpreter: /usr/bin/python3 tests/golden/test_make_t5_goldens.py
(transformers/peft/safetensors/sentencepiece are not needed and not imported).
"""
import json
import os
import struct
import sys
import tempfile
import unittest

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_t5_goldens as m  # noqa: E402


class Helpers(unittest.TestCase):
    def test_padded_vocab_size(self):
        for n in range(350, 400):
            v = m.padded_vocab_size(n)
            self.assertEqual(v % 8, 0)
            self.assertGreaterEqual(v - n, 9)
            self.assertLessEqual(v - n, 16)

    def test_trim_generated(self):
        self.assertEqual(m.trim_generated([0, 5, 6, 1, 0, 0], 5), [5, 6, 1])
        self.assertEqual(m.trim_generated([0, 1, 0], 2), [1])
        self.assertEqual(m.trim_generated([0, 0, 7, 0], 3), [0, 7, 0])  # no eos: pad ids are real tokens
        with self.assertRaises(RuntimeError):
            m.trim_generated([3, 5, 1], 5)  # no start token
        with self.assertRaises(RuntimeError):
            m.trim_generated([0, 5, 1, 4], 5)  # tokens after eos
        with self.assertRaises(RuntimeError):
            m.trim_generated([0, 5, 6], 5)  # no eos but shorter than max_new_tokens

    def test_shift_right(self):
        lab = torch.tensor([[5, 6, 1, -100], [7, 1, -100, -100]])
        self.assertEqual(m.shift_right(lab).tolist(), [[0, 5, 6, 1], [0, 7, 1, 0]])

    def test_ce_mean_matches_torch(self):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(3, 4, 11, generator=g) * 5
        lab = torch.tensor([[1, 2, 3, -100], [4, -100, -100, -100], [5, 6, 7, 8]])
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), lab.reshape(-1), ignore_index=-100)
        self.assertAlmostEqual(m.ce_mean(logits, lab), float(ref), places=5)

    def test_pattern_value_follows_peft_get_pattern_key(self):
        pat = {"EncDecAttention.k": 2, "decoder.block.1.layer.1.EncDecAttention.o": 6, "wo": 5}
        self.assertEqual(m.pattern_value(pat, "decoder.block.0.layer.1.EncDecAttention.k", 4), 2)
        self.assertEqual(m.pattern_value(pat, "decoder.block.1.layer.1.EncDecAttention.o", 4), 6)
        self.assertEqual(m.pattern_value(pat, "decoder.block.0.layer.1.EncDecAttention.o", 4), 4)
        self.assertEqual(m.pattern_value(pat, "encoder.block.0.layer.1.DenseReluDense.wo", 4), 5)
        # the key must match whole dotted components at the end: "o" must not hit "wo"
        self.assertEqual(m.pattern_value({"o": 9}, "encoder.block.0.layer.1.DenseReluDense.wo", 4), 4)
        self.assertEqual(m.pattern_value({"o": 9}, "encoder.block.0.layer.0.SelfAttention.o", 4), 9)
        # first matching key wins
        self.assertEqual(m.pattern_value({"q": 1, "SelfAttention.q": 2}, "x.SelfAttention.q", 0), 1)

    def test_lora_scaling(self):
        conf = {"r": 4, "lora_alpha": 8, "use_rslora": False, "rank_pattern": {"k": 2}, "alpha_pattern": {"q": 16}}
        self.assertEqual(m.lora_scaling(conf, "a.SelfAttention.v"), (4, 2.0))
        self.assertEqual(m.lora_scaling(conf, "a.SelfAttention.k"), (2, 4.0))
        self.assertEqual(m.lora_scaling(conf, "a.SelfAttention.q"), (4, 4.0))
        conf["use_rslora"] = True
        self.assertEqual(m.lora_scaling(conf, "a.SelfAttention.v"), (4, 4.0))
        self.assertAlmostEqual(m.lora_scaling(conf, "a.SelfAttention.k")[1], 8 / 2 ** 0.5)

    def test_compose_is_lorahub_rule(self):
        g = torch.Generator().manual_seed(1)
        sds = [{"x.lora_A.weight": torch.randn(2, 3, generator=g), "x.lora_B.weight": torch.randn(3, 2, generator=g)}
               for _ in range(3)]
        w = [0.5, -0.3, 0.8]
        final = m.compose(sds, w)
        for k in sds[0]:
            self.assertTrue(torch.allclose(final[k], sum(wi * sd[k] for wi, sd in zip(w, sds))))
        bad = [sds[0], {"y.lora_A.weight": torch.zeros(2, 3), "x.lora_B.weight": torch.zeros(3, 2)}]
        with self.assertRaises(RuntimeError):
            m.compose(bad, [1.0, 1.0])

    def test_read_safetensors(self):
        a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        bf = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)  # exactly representable in bf16
        bf_bits = (bf.numpy().view(np.uint32) >> 16).astype(np.uint16).tobytes()
        raw_a = a.numpy().tobytes()
        header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, len(raw_a)]},
                  "b": {"dtype": "BF16", "shape": [3], "data_offsets": [len(raw_a), len(raw_a) + len(bf_bits)]},
                  "__metadata__": {"format": "pt"}}
        h = json.dumps(header).encode()
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "t.safetensors")
            with open(p, "wb") as f:
                f.write(struct.pack("<Q", len(h)) + h + raw_a + bf_bits)
            t = m.read_safetensors(p)
        self.assertTrue(torch.equal(t["a"], a))
        self.assertTrue(torch.equal(t["b"], bf))

    def test_corpus_is_deterministic_and_covers_examples(self):
        a, b = m.corpus_lines(7), m.corpus_lines(7)
        self.assertEqual(a, b)
        self.assertNotEqual(a, m.corpus_lines(8))
        text = "\n".join(a)
        for ch in "()/:?0123456789日本中":
            self.assertIn(ch, text)

    def test_cases_are_consistent(self):
        for name, spec in m.CASES.items():
            for v in spec["tensor_variants"] + spec["greedy"] + spec["beam"]:
                self.assertIn(v, spec["variants"], name)
            for adapters, weights in list(spec["variants"].values()) + spec["loss_points"]:
                self.assertEqual(len(adapters), len(weights), name)
                for a in adapters:
                    self.assertIn(a, spec["adapters"], name)
            # the self-check needs at least one null-batch loss per case that matches a tensor variant
            tv = [spec["variants"][v] for v in spec["tensor_variants"]]
            self.assertTrue(any((list(a), list(w)) in [(list(x), list(y)) for x, y in tv]
                                for a, w in spec["loss_points"]), name)
            self.assertIn(None, spec["batch_sizes"])


if __name__ == "__main__":
    unittest.main(verbosity=1)
