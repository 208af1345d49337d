// Test helpers for tests/train: a tiny T5 config and learnable toy tasks
// over token ids (0 = pad, 1 = eos, 2.. = symbols).
#ifndef LORAHUB_TESTS_TRAIN_TOY_DATA_H_
#define LORAHUB_TESTS_TRAIN_TOY_DATA_H_

#include <cstdint>
#include <random>
#include <vector>

#include <ATen/ATen.h>

#include "core/config/t5_config.h"
#include "core/model/lora.h"
#include "core/model/scorer.h"
#include "core/model/t5_forward.h"
#include "core/train/train_forward.h"

namespace lorahub::train::testing {

// gated-gelu, untied, 2+2 layers, d_model 32: about 30k parameters.
inline config::T5Config TinyConfig() {
  config::T5Config c;
  c.vocab_size = 24;
  c.d_model = 32;
  c.d_kv = 8;
  c.num_heads = 4;
  c.d_ff = 48;
  c.num_layers = 2;
  c.num_decoder_layers = 2;
  c.relative_attention_num_buckets = 8;
  c.relative_attention_max_distance = 16;
  c.feed_forward_proj = "gated-gelu";
  c.is_gated_act = true;
  c.dense_act_fn = "gelu_new";
  c.tie_word_embeddings = false;
  return c;
}

enum class ToyTask {
  kReverse,     // output = the input symbols reversed
  kFirstTwice,  // output = the first input symbol, twice
};

// `n` examples of 3..5 symbols in [2, vocab) with eos appended.
inline std::vector<model::Example> ToyExamples(ToyTask task, int n,
                                               uint64_t seed, int vocab) {
  std::mt19937_64 rng(seed);
  std::vector<model::Example> out;
  for (int i = 0; i < n; ++i) {
    model::Example e;
    const int len = 3 + static_cast<int>(rng() % 3);
    for (int j = 0; j < len; ++j) {
      e.input_ids.push_back(2 + static_cast<int64_t>(rng() % (vocab - 2)));
    }
    if (task == ToyTask::kReverse) {
      e.label_ids.assign(e.input_ids.rbegin(), e.input_ids.rend());
    } else {
      e.label_ids = {e.input_ids[0], e.input_ids[0]};
    }
    e.input_ids.push_back(1);
    e.label_ids.push_back(1);
    out.push_back(e);
  }
  return out;
}

// Logits of the inference engine (model::Encode + DecodeFull) for a
// training batch, with `adapter` on every row when not null. Dies on error.
inline at::Tensor EngineLogits(const model::T5Weights& w,
                               const model::LoraAdapter* adapter,
                               const Batch& batch) {
  model::AdapterBank bank;
  model::RowAdapters rows;
  if (adapter != nullptr) {
    bank = model::MakeAdapterBank(w, {adapter}).value();
    rows = model::MakeRowAdapters(
               w, &bank,
               std::vector<int64_t>(batch.input_ids.size(0), 0))
               .value();
  }
  model::EncoderOutput enc =
      model::Encode(w, batch.input_ids, batch.attention_mask, rows).value();
  return model::DecodeFull(w, batch.decoder_ids, enc, rows).value();
}

}  // namespace lorahub::train::testing

#endif  // LORAHUB_TESTS_TRAIN_TOY_DATA_H_
