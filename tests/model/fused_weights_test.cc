// The fused weights of t5_weights.h (self-attention q|k|v, gated wi_0|wi_1,
// all decoder blocks' cross k|v): their layout and memory, that the fused
// GEMMs give the separate GEMMs' results with every per-row adapter layout,
// that merging writes through the views without touching the base, and that
// autograd callers fall back to the separate weights. Runs on
// $LORAHUB_TEST_DEVICE (tiny_t5.h; default cpu).
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/model/fused_ops.h"
#include "core/model/lora.h"
#include "core/model/objective_runner.h"
#include "core/model/scorer.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_layers.h"
#include "core/model/t5_weights.h"
#include "gtest/gtest.h"
#include "tests/model/op_name_counter.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

using testing::GatedConfig;
using testing::MakeLoraConfig;
using testing::RandomAdapter;
using testing::RandomT5;
using testing::ReluTiedConfig;

struct Batch {
  at::Tensor ids, mask, labels;
};

Batch MakeBatch(const config::T5Config& c, int rows, uint64_t seed) {
  at::manual_seed(seed);
  const int64_t S = 6, T = 4;
  Batch b;
  b.ids = at::randint(2, c.vocab_size, {rows, S}, at::kLong);
  b.mask = at::ones({rows, S}, at::kLong);
  for (int r = 0; r < rows; ++r) {
    const int64_t len = S - (r % 2);
    b.mask[r].narrow(0, len, S - len).zero_();
    b.ids[r].narrow(0, len, S - len).zero_();
  }
  b.labels = at::randint(2, c.vocab_size, {rows, T}, at::kLong);
  return b;
}

// Random q,v adapters (r 4, alpha 8), one per seed; a failed build is a test
// failure and leaves that adapter out.
std::vector<LoraAdapter> QvAdapters(const T5Weights& w,
                                    const std::vector<uint64_t>& seeds) {
  const config::LoraConfig cfg = MakeLoraConfig({"q", "v"}, 4, 8.0);
  std::vector<LoraAdapter> ads;
  for (uint64_t seed : seeds) {
    auto ad = BuildLoraAdapter(w, cfg, RandomAdapter(w, cfg, seed), "qv");
    EXPECT_TRUE(ad.ok()) << ad.status();
    if (ad.ok()) ads.push_back(*std::move(ad));
  }
  return ads;
}

at::Tensor Logits(const T5Weights& w, const Batch& b, const RowAdapters& rows) {
  auto enc = Encode(w, b.ids.to(w.device), b.mask.to(w.device), rows);
  EXPECT_TRUE(enc.ok()) << enc.status();
  auto logits =
      DecodeFull(w, ShiftRight(b.labels, 0, 0).to(w.device), *enc, rows);
  EXPECT_TRUE(logits.ok()) << logits.status();
  return *logits;
}

double MaxDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.cpu().to(at::kDouble) - b.cpu().to(at::kDouble))
      .abs()
      .max()
      .item<double>();
}

WeightOptions Options(at::ScalarType dtype = at::kFloat) {
  WeightOptions opts;
  opts.dtype = dtype;
  auto device = testing::TestDevice();
  EXPECT_TRUE(device.ok()) << device.status();
  if (device.ok()) opts.device = *device;
  return opts;
}

// A copy of `w` whose fused members are separate tensors again (the forward
// pass then runs one GEMM per projection: the reference arithmetic).
T5Weights Unfused(const T5Weights& w) {
  T5Weights u = w;
  for (auto* stack : {&u.encoder, &u.decoder}) {
    for (BlockWeights& b : *stack) {
      for (Linear* l : {&b.self_attn.q, &b.self_attn.k, &b.self_attn.v,
                        &b.cross_attn.k, &b.cross_attn.v, &b.ff.wi_0,
                        &b.ff.wi_1}) {
        if (l->weight.defined()) l->weight = l->weight.clone();
      }
    }
  }
  return u;
}

const void* StorageOf(const at::Tensor& t) {
  return t.storage().data_ptr().get();
}

class FusedTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    config_ = GetParam() == 0 ? GatedConfig() : ReluTiedConfig();
    host_ = RandomT5(config_, 21);
    auto w = BuildT5Weights(config_, host_, Options());
    ASSERT_TRUE(w.ok()) << w.status();
    base_ = *w;
  }
  LoraAdapter Adapter(std::vector<std::string> targets, int r, double alpha,
                      uint64_t seed) {
    auto cfg = MakeLoraConfig(targets, r, alpha);
    auto a = BuildLoraAdapter(base_, cfg, RandomAdapter(base_, cfg, seed),
                              "adapter");
    EXPECT_TRUE(a.ok()) << a.status();
    return *a;
  }
  std::vector<std::string> AllTargets() const {
    if (config_.is_gated_act) return {"q", "k", "v", "o", "wi_0", "wi_1", "wo"};
    return {"q", "k", "v", "o", "wi", "wo"};
  }
  config::T5Config config_;
  io::TensorMap host_;
  T5Weights base_;
};

TEST_P(FusedTest, LayoutIsViewsWithNoExtraMemory) {
  const int64_t inner = int64_t{config_.num_heads} * config_.d_kv;
  EXPECT_TRUE(FusedCrossKv(base_));
  EXPECT_EQ(base_.cross_kv.size(0),
            config_.num_decoder_layers * 2 * inner);
  for (size_t i = 0; i < base_.decoder.size(); ++i) {
    const AttentionWeights& x = base_.decoder[i].cross_attn;
    EXPECT_EQ(FusedRowOffset(base_.cross_kv, x.k.weight),
              static_cast<int64_t>(2 * i) * inner);
    EXPECT_EQ(FusedRowOffset(base_.cross_kv, x.v.weight),
              static_cast<int64_t>(2 * i + 1) * inner);
  }
  std::set<const void*> storages;
  int64_t bytes = 0;
  auto count = [&](const at::Tensor& t) {
    if (t.defined() && storages.insert(StorageOf(t)).second) {
      bytes += static_cast<int64_t>(t.storage().nbytes());
    }
  };
  int64_t params = 0;
  for (const auto& [name, t] : host_) {
    if (name != "encoder.embed_tokens.weight" &&
        name != "decoder.embed_tokens.weight") {
      params += t.NumElements();
    }
  }
  count(base_.shared);
  count(base_.lm_head);
  count(base_.encoder_bias_table);
  count(base_.decoder_bias_table);
  count(base_.encoder_final_norm);
  count(base_.decoder_final_norm);
  for (const auto* stack : {&base_.encoder, &base_.decoder}) {
    for (size_t i = 0; i < stack->size(); ++i) {
      const BlockWeights& b = (*stack)[i];
      const std::string where =
          (stack == &base_.encoder ? "encoder " : "decoder ") +
          std::to_string(i);
      EXPECT_TRUE(FusedQkv(b.self_attn)) << where;
      EXPECT_EQ(StorageOf(b.self_attn.q.weight), StorageOf(b.self_attn.qkv));
      EXPECT_EQ(StorageOf(b.self_attn.v.weight), StorageOf(b.self_attn.qkv));
      EXPECT_EQ(FusedWi01(b.ff), config_.is_gated_act) << where;
      for (const at::Tensor* t :
           {&b.self_norm, &b.cross_norm, &b.ff_norm, &b.self_attn.q.weight,
            &b.self_attn.k.weight, &b.self_attn.v.weight,
            &b.self_attn.o.weight, &b.cross_attn.q.weight,
            &b.cross_attn.k.weight, &b.cross_attn.v.weight,
            &b.cross_attn.o.weight, &b.ff.wi.weight, &b.ff.wi_0.weight,
            &b.ff.wi_1.weight, &b.ff.wo.weight}) {
        count(*t);
      }
    }
  }
  // Every parameter is stored once (fp32): fusing did not copy.
  EXPECT_EQ(bytes, params * 4);
  // The views hold the checkpoint's tensors.
  const std::string q0 = "encoder.block.0.layer.0.SelfAttention.v.weight";
  at::Tensor expected = at::from_blob(const_cast<uint8_t*>(host_.at(q0).data),
                                      host_.at(q0).shape, at::kFloat);
  EXPECT_TRUE(at::equal(base_.encoder[0].self_attn.v.weight.cpu(), expected));
  const int last = config_.num_decoder_layers - 1;
  const std::string kd = "decoder.block." + std::to_string(last) +
                         ".layer.1.EncDecAttention.k.weight";
  expected = at::from_blob(const_cast<uint8_t*>(host_.at(kd).data),
                           host_.at(kd).shape, at::kFloat);
  EXPECT_TRUE(
      at::equal(base_.decoder[last].cross_attn.k.weight.cpu(), expected));
}

// Fused and separate GEMMs agree with adapters on every site, in each of the
// forward pass' adapter layouts (one slot; runs per slot with a common
// scaling; mixed rows with a gather; one slot with per-slot scalings).
TEST_P(FusedTest, FusedEqualsSeparateForEveryAdapterLayout) {
  LoraAdapter a1 = Adapter(AllTargets(), 4, 8.0, 31);
  LoraAdapter a2 = Adapter(AllTargets(), 4, 8.0, 32);
  LoraAdapter a3 = Adapter({"q", "v", "k"}, 2, 3.0, 33);  // other scaling
  auto bank = MakeAdapterBank(base_, {&a1, &a2});
  ASSERT_TRUE(bank.ok()) << bank.status();
  auto mixed_bank = MakeAdapterBank(base_, {&a1, &a3});
  ASSERT_TRUE(mixed_bank.ok()) << mixed_bank.status();
  const T5Weights separate = Unfused(base_);
  EXPECT_FALSE(FusedQkv(separate.encoder[0].self_attn));
  EXPECT_FALSE(FusedCrossKv(separate));
  Batch b = MakeBatch(config_, 4, 41);
  struct Case {
    const AdapterBank* bank;
    std::vector<int64_t> slots;
    const char* what;
  };
  const std::vector<Case> cases = {
      {nullptr, {-1, -1, -1, -1}, "no adapters"},
      {&*bank, {1, 1, 1, 1}, "uniform slot"},
      {&*bank, {0, 0, 1, 1}, "runs per slot"},
      {&*bank, {1, -1, 0, 1}, "mixed rows"},
      {&*mixed_bank, {1, 1, 1, 1}, "uniform, no common scaling"},
      {&*mixed_bank, {0, 0, 1, 1}, "runs, no common scaling"},
  };
  at::Tensor plain;
  for (const Case& k : cases) {
    auto rows = MakeRowAdapters(base_, k.bank, k.slots);
    ASSERT_TRUE(rows.ok()) << rows.status();
    at::Tensor fused = Logits(base_, b, *rows);
    at::Tensor sep = Logits(separate, b, *rows);
    const double scale = sep.abs().max().item<double>();
    // 1e-4 of scale: one fused GEMM and three separate ones sum in orders
    // that differ with the BLAS's kernels for the shape (OpenBLAS 0.3.21 on
    // an AVX-512 CPU: up to 3.8e-5 here; 1e-5 held on an AVX2 one), and
    // these random adapters (alpha 16, rank 4) amplify that.
    EXPECT_LT(MaxDiff(fused, sep), 1e-4 * scale) << k.what;
    if (k.bank == nullptr) {
      plain = sep;
    } else {  // the adapters matter (the comparison can fail)
      EXPECT_GT(MaxDiff(plain, sep), 1e-3) << k.what;
    }
  }
  EXPECT_EQ(MakeRowAdapters(base_, &*bank, {0, 0, 1, 1})->rows_per_slot, 2);
}

// bf16 with adapters on q, v, then on every projection, feed-forward ones
// included: fused tracks separate. The norm before an adapted feed-forward
// sublayer keeps its fp32 output (the deltas' input; without it
// FeedForward refuses), and the adapted rows differ from the base model's.
TEST_P(FusedTest, Bf16FusedTracksSeparate) {
  auto w = BuildT5Weights(config_, host_, Options(at::kBFloat16));
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE(FusedQkv(w->encoder[0].self_attn));
  Batch b = MakeBatch(config_, 3, 52);
  for (const std::vector<std::string>& targets :
       {std::vector<std::string>{"q", "v"}, AllTargets()}) {
    SCOPED_TRACE(::testing::Message() << targets.size() << " targets");
    LoraAdapter ad = Adapter(targets, 4, 8.0, 51);
    auto bank = MakeAdapterBank(*w, {&ad});
    ASSERT_TRUE(bank.ok());
    auto rows = MakeRowAdapters(*w, &*bank, {0, -1, 0});
    ASSERT_TRUE(rows.ok());
    at::Tensor fused = Logits(*w, b, *rows);
    at::Tensor sep = Logits(Unfused(*w), b, *rows);
    ASSERT_TRUE(fused.defined() && sep.defined());
    EXPECT_EQ(fused.scalar_type(), at::kFloat);
    const double scale = sep.abs().max().item<double>();
    EXPECT_LT(MaxDiff(fused, sep), 2e-2 * scale);
    auto none = MakeRowAdapters(*w, &*bank, {-1, -1, -1});
    ASSERT_TRUE(none.ok());
    at::Tensor plain = Logits(*w, b, *none);
    EXPECT_GT(MaxDiff(fused.select(0, 0), plain.select(0, 0)), 1e-3 * scale);
  }
}

// DecodeFullNll against DecodeFull's logits through log_softmax and the
// label's entry, summed per row, with -100 labels: fp32 and bf16 models
// with a per-row adapter. Off CUDA (and for fp32) the same ATen ops run,
// so the sums are the same bits; a bf16 model on CUDA takes the TokenNll
// kernel (its sums in another order). Labels of another shape: an error.
TEST_P(FusedTest, DecodeFullNllSumsTheLogSoftmaxAtTheLabels) {
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(dtype == at::kFloat ? "fp32" : "bf16");
    auto w = BuildT5Weights(config_, host_, Options(dtype));
    ASSERT_TRUE(w.ok()) << w.status();
    Batch b = MakeBatch(config_, 3, 53);
    b.labels[1][3] = -100;
    b.labels[2][2] = -100;
    LoraAdapter ad = Adapter({"q", "v"}, 4, 8.0, 54);
    auto bank = MakeAdapterBank(*w, {&ad});
    ASSERT_TRUE(bank.ok());
    auto rows = MakeRowAdapters(*w, &*bank, {0, -1, 0});
    ASSERT_TRUE(rows.ok());
    const at::Tensor labels = b.labels.to(w->device);
    const at::Tensor dec = ShiftRight(b.labels, 0, 0).to(w->device);
    auto enc = Encode(*w, b.ids.to(w->device), b.mask.to(w->device), *rows);
    ASSERT_TRUE(enc.ok()) << enc.status();
    auto logits = DecodeFull(*w, dec, *enc, *rows);
    ASSERT_TRUE(logits.ok()) << logits.status();
    const at::Tensor logp = at::log_softmax(*logits, -1);
    const at::Tensor nll =
        (-logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1))
            .masked_fill(labels == -100, 0.0);
    const at::Tensor want = nll.sum(1);
    auto got = DecodeFullNll(*w, dec, *enc, *rows, labels);
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->scalar_type(), at::kFloat);
    ASSERT_EQ(got->sizes(), want.sizes());
    if (w->device.is_cuda() && dtype == at::kBFloat16) {
      EXPECT_LT(MaxDiff(*got, want), 1e-5 * want.abs().max().item<double>());
    } else {
      EXPECT_TRUE(at::equal(*got, want)) << MaxDiff(*got, want);
    }
    EXPECT_EQ(DecodeFullNll(*w, dec, *enc, *rows, labels.narrow(1, 0, 3))
                  .status()
                  .code(),
              absl::StatusCode::kInvalidArgument);
  }
}

TEST_P(FusedTest, CachedDecodingAndChunkedCrossKeyValues) {
  LoraAdapter ad = Adapter(AllTargets(), 3, 6.0, 61);
  auto bank = MakeAdapterBank(base_, {&ad});
  ASSERT_TRUE(bank.ok());
  Batch b = MakeBatch(config_, 3, 62);
  auto rows = MakeRowAdapters(base_, &*bank, {0, -1, 0});
  ASSERT_TRUE(rows.ok());
  auto enc = Encode(base_, b.ids.to(base_.device), b.mask.to(base_.device),
                    *rows);
  ASSERT_TRUE(enc.ok());
  // One chunk for all blocks, one block per chunk, and separate weights.
  internal::CrossKeyValues all(base_, *enc, *rows);
  internal::CrossKeyValues one_each(base_, *enc, *rows, /*max_bytes=*/1);
  const T5Weights separate = Unfused(base_);
  internal::CrossKeyValues sep(separate, *enc, *rows);
  const int64_t L = static_cast<int64_t>(base_.decoder.size());
  const int64_t B = b.ids.size(0), S = b.ids.size(1);
  at::Tensor copied =
      at::zeros({2, L, B, config_.num_heads, S, config_.d_kv},
                at::TensorOptions().dtype(at::kFloat).device(base_.device));
  internal::CrossKeyValues(base_, *enc, *rows, 1).CopyTo(copied);
  for (int64_t i = 0; i < L; ++i) {
    auto x = all.Block(i);
    auto y = one_each.Block(i);
    auto z = sep.Block(i);
    EXPECT_LT(MaxDiff(x.first, z.first), 1e-5) << i;
    EXPECT_LT(MaxDiff(x.second, z.second), 1e-5) << i;
    EXPECT_LT(MaxDiff(x.first, y.first), 1e-5) << i;
    EXPECT_LT(MaxDiff(x.second, y.second), 1e-5) << i;
    EXPECT_TRUE(at::equal(copied[0][i], y.first)) << i;
    EXPECT_TRUE(at::equal(copied[1][i], y.second)) << i;
  }
  // Incremental decoding over the fused cross keys/values.
  at::Tensor dec_ids = ShiftRight(b.labels, 0, 0);
  auto full = DecodeFull(separate, dec_ids.to(base_.device), *enc, *rows);
  ASSERT_TRUE(full.ok());
  auto cache = InitDecoderCache(base_, *enc, *rows, dec_ids.size(1));
  ASSERT_TRUE(cache.ok());
  for (int64_t t = 0; t < dec_ids.size(1); ++t) {
    auto step = DecodeStep(base_, *cache,
                           dec_ids.select(1, t).contiguous().to(base_.device),
                           *rows);
    ASSERT_TRUE(step.ok()) << step.status();
    EXPECT_LT(MaxDiff(*step, full->select(1, t)), 1e-4) << "t=" << t;
  }
}

// A CrossKvBuffer (rows [B, S] of every block's k and v) holds what the
// block-major buffer holds: written by the GEMM itself without adapters on
// cross k/v, by the chunks' copies with them (a delta on v only, rows of
// different slots).
TEST_P(FusedTest, CrossKvBufferHoldsEveryBlocksKeysAndValues) {
  LoraAdapter ad = Adapter({"v"}, 3, 6.0, 63);
  auto bank = MakeAdapterBank(base_, {&ad});
  ASSERT_TRUE(bank.ok());
  Batch b = MakeBatch(config_, 3, 64);
  const int64_t L = static_cast<int64_t>(base_.decoder.size());
  const int64_t B = b.ids.size(0), S = b.ids.size(1);
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(base_.device);
  for (bool adapted : {false, true}) {
    absl::StatusOr<RowAdapters> rows = RowAdapters{};
    if (adapted) rows = MakeRowAdapters(base_, &*bank, {0, -1, 0});
    ASSERT_TRUE(rows.ok()) << rows.status();
    auto enc = Encode(base_, b.ids.to(base_.device), b.mask.to(base_.device),
                      *rows);
    ASSERT_TRUE(enc.ok());
    at::Tensor block_major =
        at::zeros({2, L, B, config_.num_heads, S, config_.d_kv}, opts);
    internal::CrossKeyValues(base_, *enc, *rows).CopyTo(block_major);
    at::Tensor buffer = internal::CrossKvBuffer(base_, B, S, opts);
    ASSERT_EQ(buffer.sizes(), block_major.sizes());
    // The storage order the GEMM writes: batch, key, block, k|v, head, d.
    EXPECT_TRUE(buffer.permute({2, 4, 1, 0, 3, 5}).is_contiguous());
    buffer.fill_(std::numeric_limits<float>::quiet_NaN());  // all overwritten
    internal::CrossKeyValues(base_, *enc, *rows).CopyTo(buffer);
    EXPECT_LT(MaxDiff(buffer, block_major), 1e-5) << "adapted " << adapted;
    EXPECT_FALSE(at::isnan(buffer).any().item<bool>()) << "adapted " << adapted;
    if (adapted) {
      // The delta reached the adapted rows' values and not their keys.
      internal::CrossKeyValues plain(base_, *enc, RowAdapters{});
      const auto kv = plain.Block(0);
      EXPECT_GT(MaxDiff(buffer[1][0][0], kv.second[0]), 1e-3);
      EXPECT_LT(MaxDiff(buffer[0][0][0], kv.first[0]), 1e-5);
      EXPECT_LT(MaxDiff(buffer[1][0][1], kv.second[1]), 1e-5);
    }
  }
}

// A bf16 model with a different adapter per row (a per-row prefill): the
// keys' GEMM writes the bf16 CrossKvBuffer and the values' deltas are
// rounded into it by the run kernels (CUDA; elsewhere the chunk's copy):
// either way the buffer holds each block's fp32 keys and values, deltas
// included, rounded once to bf16.
TEST_P(FusedTest, RowRunValueDeltasRoundedIntoABf16Buffer) {
  auto w = BuildT5Weights(config_, host_, Options(at::kBFloat16));
  ASSERT_TRUE(w.ok()) << w.status();
  const config::LoraConfig cfg = MakeLoraConfig({"q", "v"}, 4, 8.0);
  std::vector<LoraAdapter> ads;
  for (uint64_t seed : {81, 82, 83}) {
    auto ad = BuildLoraAdapter(*w, cfg, RandomAdapter(*w, cfg, seed), "qv");
    ASSERT_TRUE(ad.ok()) << ad.status();
    ads.push_back(*std::move(ad));
  }
  auto bank = MakeAdapterBank(*w, {&ads[0], &ads[1], &ads[2]});
  ASSERT_TRUE(bank.ok()) << bank.status();
  auto rows = MakeRowAdapters(*w, &*bank, {0, 1, 2});
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->rows_per_slot, 1);
  Batch b = MakeBatch(config_, 3, 85);
  auto enc = Encode(*w, b.ids.to(w->device), b.mask.to(w->device), *rows);
  ASSERT_TRUE(enc.ok()) << enc.status();
  const int64_t L = static_cast<int64_t>(w->decoder.size());
  at::Tensor buffer = internal::CrossKvBuffer(
      *w, b.ids.size(0), b.ids.size(1),
      at::TensorOptions().dtype(at::kBFloat16).device(w->device));
  buffer.fill_(std::numeric_limits<float>::quiet_NaN());  // all overwritten
  internal::CrossKeyValues(*w, *enc, *rows).CopyTo(buffer);
  EXPECT_FALSE(at::isnan(buffer).any().item<bool>());
  internal::CrossKeyValues fp32(*w, *enc, *rows);  // attention dtype fp32
  internal::CrossKeyValues plain(*w, *enc, RowAdapters{});
  for (int64_t i = 0; i < L; ++i) {
    const auto kv = fp32.Block(i);
    const auto base_kv = plain.Block(i);
    for (int kind = 0; kind < 2; ++kind) {
      const at::Tensor want = kind == 0 ? kv.first : kv.second;
      const at::Tensor got = buffer[kind][i].to(at::kFloat);
      // One rounding to bf16 (2^-9 relative) of a sum the GEMMs may order
      // differently.
      const double tol = 1e-2 * want.abs().max().item<double>() + 1e-6;
      EXPECT_LT(MaxDiff(got, want), tol) << "block " << i << " kind " << kind;
    }
    // Every row's values carry its own delta; the keys none.
    EXPECT_GT(MaxDiff(buffer[1][i].to(at::kFloat), base_kv.second), 1e-2) << i;
    EXPECT_LT(MaxDiff(buffer[0][i].to(at::kFloat), base_kv.first),
              1e-2 * base_kv.first.abs().max().item<double>() + 1e-6)
        << i;
  }
}

TEST_P(FusedTest, MergeWritesThroughViewsAndKeepsTheBase) {
  // q and v (self and cross), k of cross via "k", and the gated FFN.
  std::vector<std::string> targets = {"q", "k", "v"};
  if (config_.is_gated_act) targets.push_back("wi_0");
  LoraAdapter ad = Adapter(targets, 3, 6.0, 71);
  const at::Tensor qkv_before = base_.encoder[0].self_attn.qkv.clone();
  const at::Tensor cross_before = base_.cross_kv.clone();
  auto merged = MergeAdapter(base_, ad);
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_TRUE(at::equal(base_.encoder[0].self_attn.qkv, qkv_before));
  EXPECT_TRUE(at::equal(base_.cross_kv, cross_before));
  EXPECT_TRUE(FusedQkv(merged->encoder[0].self_attn));
  EXPECT_TRUE(FusedCrossKv(*merged));
  EXPECT_NE(StorageOf(merged->encoder[0].self_attn.qkv),
            StorageOf(base_.encoder[0].self_attn.qkv));
  // Sites the adapter does not touch keep sharing the base's storage.
  EXPECT_TRUE(merged->encoder[0].self_attn.o.weight.is_same(
      base_.encoder[0].self_attn.o.weight));
  if (config_.is_gated_act) {
    EXPECT_TRUE(FusedWi01(merged->encoder[0].ff));
    EXPECT_FALSE(at::equal(merged->encoder[0].ff.wi_01,
                           base_.encoder[0].ff.wi_01));
  }
  auto bank = MakeAdapterBank(base_, {&ad});
  ASSERT_TRUE(bank.ok());
  Batch b = MakeBatch(config_, 3, 72);
  auto rows = MakeRowAdapters(base_, &*bank, {0, 0, 0});
  auto none = MakeRowAdapters(*merged, nullptr, {-1, -1, -1});
  ASSERT_TRUE(rows.ok() && none.ok());
  at::Tensor unmerged = Logits(base_, b, *rows);
  at::Tensor folded = Logits(*merged, b, *none);
  const double scale = unmerged.abs().max().item<double>();
  EXPECT_LT(MaxDiff(unmerged, folded), 1e-4 * scale);
  EXPECT_GT(MaxDiff(folded, Logits(base_, b, *none)), 1e-3);
}

TEST_P(FusedTest, EnvironmentTurnsFusingOff) {
  ASSERT_EQ(setenv("LORAHUB_NO_FUSED_GEMMS", "1", 1), 0);
  EXPECT_FALSE(FusedGemmsEnabled());
  auto plain = BuildT5Weights(config_, host_, Options());
  ASSERT_EQ(setenv("LORAHUB_NO_FUSED_GEMMS", "0", 1), 0);
  EXPECT_TRUE(FusedGemmsEnabled());
  ASSERT_EQ(unsetenv("LORAHUB_NO_FUSED_GEMMS"), 0);
  EXPECT_TRUE(FusedGemmsEnabled());
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->encoder[0].self_attn.qkv.defined());
  EXPECT_FALSE(plain->cross_kv.defined());
  EXPECT_FALSE(FusedQkv(plain->encoder[0].self_attn));
  // The same numbers through the separate GEMMs.
  LoraAdapter ad = Adapter(AllTargets(), 3, 6.0, 91);
  auto bank = MakeAdapterBank(base_, {&ad});
  ASSERT_TRUE(bank.ok());
  auto rows = MakeRowAdapters(base_, &*bank, {0, -1});
  ASSERT_TRUE(rows.ok());
  Batch b = MakeBatch(config_, 2, 92);
  at::Tensor fused = Logits(base_, b, *rows);
  at::Tensor sep = Logits(*plain, b, *rows);
  EXPECT_LT(MaxDiff(fused, sep), 1e-5 * sep.abs().max().item<double>());
}

TEST_P(FusedTest, AutogradCallersGetTheSeparateLeaves) {
  T5Weights w = base_;
  w.encoder[0].self_attn.k.weight.set_requires_grad(true);
  EXPECT_FALSE(FusedQkv(w.encoder[0].self_attn));
  EXPECT_TRUE(FusedQkv(w.encoder[1].self_attn));
  Batch b = MakeBatch(config_, 2, 81);
  auto rows = MakeRowAdapters(w, nullptr, {-1, -1});
  ASSERT_TRUE(rows.ok());
  Logits(w, b, *rows).sum().backward();
  const at::Tensor& grad = w.encoder[0].self_attn.k.weight.grad();
  ASSERT_TRUE(grad.defined());
  EXPECT_GT(grad.abs().max().item<double>(), 0.0);
}

// Counts, on this thread, the GEMM ops and the dtype conversions that the
// dispatcher runs while alive (RecordFunction, as the profiler sees them).
// On a GPU each is one or more kernels. A GEMM op inside a counted one is
// not counted again (on the CPU a batched GEMM with a strided output runs
// one addmm per batch; on CUDA it is one cuBLAS call).
class OpCounter {
 public:
  OpCounter() {
    gemms_ = casts_ = 0;
    depth_ = 0;
    handle_ = at::addThreadLocalCallback(
        at::RecordFunctionCallback(&OpCounter::OnStart, &OpCounter::OnEnd)
            .scopes({at::RecordScope::FUNCTION, at::RecordScope::USER_SCOPE}));
  }
  ~OpCounter() { at::removeCallback(handle_); }
  int64_t gemms() const { return gemms_; }
  int64_t casts() const { return casts_; }

 private:
  struct Mark : at::ObserverContext {};
  static std::unique_ptr<at::ObserverContext> OnStart(
      const at::RecordFunction& fn) {
    const char* name = fn.name();
    if (std::strcmp(name, "aten::_to_copy") == 0) ++casts_;
    // lorahub::narrow_gemm: the CUDA kernel that takes a bf16 model's LoRA
    // down-projections (fused_ops.h NarrowGemm), one GEMM as the cuBLAS
    // call it replaces.
    for (const char* g : {"aten::mm", "aten::bmm", "aten::addmm",
                          "aten::addmm_", "aten::baddbmm", "aten::baddbmm_",
                          "lorahub::narrow_gemm"}) {
      if (std::strcmp(name, g) == 0) {
        if (depth_++ == 0) ++gemms_;
        return std::make_unique<Mark>();
      }
    }
    return nullptr;
  }
  static void OnEnd(const at::RecordFunction&, at::ObserverContext* ctx) {
    if (ctx != nullptr) --depth_;
  }
  static thread_local int64_t gemms_, casts_;
  static thread_local int depth_;
  at::CallbackHandle handle_;
};
thread_local int64_t OpCounter::gemms_ = 0;
thread_local int64_t OpCounter::casts_ = 0;
thread_local int OpCounter::depth_ = 0;

// The GEMMs of one LoraHub objective evaluation on the flan-t5-large layout
// (24 + 24 gated-gelu blocks; tiny widths: the count does not depend on
// them) with adapters on q and v, one composed candidate for all 5 rows.
// The fused weights save, per encoder block, 2 (q|k|v) + 1 (wi_0|wi_1) and
// per decoder block 2 + 1 + 2 (cross k|v, computed by one GEMM for all
// blocks).
TEST(FusedCount, FewerGemmsPerObjectiveForward) {
  config::T5Config c = GatedConfig();
  c.num_layers = 24;
  c.num_decoder_layers = 24;
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    auto w = BuildT5Weights(c, RandomT5(c, 91), Options(dtype));
    ASSERT_TRUE(w.ok()) << w.status();
    auto cfg = MakeLoraConfig({"q", "v"}, 4, 8.0);
    auto ad = BuildLoraAdapter(*w, cfg, RandomAdapter(*w, cfg, 92), "qv");
    ASSERT_TRUE(ad.ok()) << ad.status();
    auto bank = MakeAdapterBank(*w, {&*ad});
    ASSERT_TRUE(bank.ok());
    auto rows = MakeRowAdapters(*w, &*bank, {0, 0, 0, 0, 0});
    ASSERT_TRUE(rows.ok());
    Batch b = MakeBatch(c, 5, 93);
    const T5Weights separate = Unfused(*w);
    int64_t gemms[2], casts[2];
    at::Tensor out[2];
    for (int fused = 0; fused < 2; ++fused) {
      OpCounter counter;
      out[fused] = Logits(fused ? *w : separate, b, *rows);
      gemms[fused] = counter.gemms();
      casts[fused] = counter.casts();
    }
    std::printf("%s objective forward, 24+24 blocks, q,v adapters: GEMMs %lld "
                "-> %lld, dtype conversions %lld -> %lld\n",
                dtype == at::kFloat ? "fp32" : "bf16",
                static_cast<long long>(gemms[0]),
                static_cast<long long>(gemms[1]),
                static_cast<long long>(casts[0]),
                static_cast<long long>(casts[1]));
    EXPECT_EQ(gemms[0] - gemms[1], 24 * 3 + 24 * 5 - 1);
    // No more conversions; in bf16 on the CPU fewer (a widening per GEMM
    // whose output attention reads in fp32), on CUDA as many (those GEMMs
    // write fp32 themselves: fused_ops.h MatmulFloat).
    EXPECT_LE(casts[1], casts[0]);
    if (dtype != at::kFloat && !w->device.is_cuda()) {
      EXPECT_LT(casts[1], casts[0]);
    }
    // A sanity bound (the fused path's exactness is checked on 2 blocks by
    // FusedEqualsSeparateForEveryAdapterLayout): 24 + 24 random blocks
    // amplify the summation-order differences of fused and separate GEMMs
    // chaotically (fp32 on an AVX-512 CPU with OpenBLAS 0.3.21: 1.5e-3 of
    // scale; 1e-5 on an AVX2 one).
    const double scale = out[0].abs().max().item<double>();
    EXPECT_LT(MaxDiff(out[0], out[1]),
              (dtype == at::kFloat ? 5e-3 : 2e-2) * scale);
  }
}

// GEMM calls of one ObjectiveRunner evaluation (one candidate, 5 examples,
// 20 modules with q and v adapters) on the flan-t5-large layout: the fused
// weights against the same runner over separate weights (the previous
// engine's GEMMs). Per encoder block 2 (q|k|v) + 1 (wi_0|wi_1) + 1 (the q,v
// LoRA down-projection), per decoder block 2 + 1 + 2 (cross k|v) + 1, less
// the one GEMM for all cross k|v; and the cross v LoRA down-projections of
// all 24 blocks are one GEMM (23 fewer). The up-projections of sites that
// share a down-projection are one batched GEMM (t5_forward.cc
// UpProjectBatched): 24 + 24 fewer for the q,v pairs, 23 for the cross v.
TEST(FusedCount, FewerGemmsPerRunnerEvaluation) {
  config::T5Config c = GatedConfig();
  c.num_layers = 24;
  c.num_decoder_layers = 24;
  auto w = BuildT5Weights(c, RandomT5(c, 101), Options(at::kBFloat16));
  ASSERT_TRUE(w.ok()) << w.status();
  auto cfg = MakeLoraConfig({"q", "v"}, 4, 8.0);
  std::vector<LoraAdapter> ads;
  for (int m = 0; m < 20; ++m) {
    auto ad = BuildLoraAdapter(*w, cfg, RandomAdapter(*w, cfg, 200 + m), "m");
    ASSERT_TRUE(ad.ok()) << ad.status();
    ads.push_back(*ad);
  }
  std::vector<const LoraAdapter*> ptrs;
  for (const LoraAdapter& a : ads) ptrs.push_back(&a);
  auto stack = StackModules(*w, ptrs);
  ASSERT_TRUE(stack.ok()) << stack.status();
  std::vector<Example> examples;
  for (int e = 0; e < 5; ++e) {
    Example ex;
    for (int t = 0; t < 6 + e; ++t) ex.input_ids.push_back(2 + (7 * t + e) % 60);
    ex.input_ids.push_back(1);
    ex.label_ids = {static_cast<int64_t>(3 + e), 5, 1};
    examples.push_back(ex);
  }
  const T5Weights separate = Unfused(*w);
  std::vector<double> weights(20);
  for (int m = 0; m < 20; ++m) weights[m] = 0.05 * (m % 7) - 0.1;
  int64_t gemms[2], casts[2];
  double loss[2];
  for (int fused = 0; fused < 2; ++fused) {
    ObjectiveRunnerOptions ro;
    ro.cuda_graph = false;
    ro.merge_single = false;  // the LoRA GEMMs are what this counts
    auto runner =
        ObjectiveRunner::Create(fused ? *w : separate, *stack, examples, 1, ro);
    ASSERT_TRUE(runner.ok()) << runner.status();
    ASSERT_TRUE((*runner)->Losses(weights, 1).ok());  // warm-up
    OpCounter counter;
    auto l = (*runner)->Losses(weights, 1);
    ASSERT_TRUE(l.ok()) << l.status();
    gemms[fused] = counter.gemms();
    casts[fused] = counter.casts();
    loss[fused] = (*l)[0];
  }
  std::printf("bf16 runner evaluation, 24+24 blocks, 20 q,v modules: GEMMs "
              "%lld -> %lld, dtype conversions %lld -> %lld\n",
              static_cast<long long>(gemms[0]),
              static_cast<long long>(gemms[1]),
              static_cast<long long>(casts[0]),
              static_cast<long long>(casts[1]));
  EXPECT_EQ(gemms[0] - gemms[1], 24 * 4 + 24 * 6 - 1 + 23 + 24 + 24 + 23);
  EXPECT_LE(casts[1], casts[0]);  // as above
  if (!w->device.is_cuda()) EXPECT_LT(casts[1], casts[0]);
  EXPECT_NEAR(loss[0], loss[1], 2e-2 * std::fabs(loss[0]));
}

// A bank whose q and v A factors lie side by side (as ObjectiveRunner
// composes them): one down-projection GEMM per self-attention instead of
// two, the same logits.
TEST(FusedCount, AdjacentLoraFactorsShareOneGemm) {
  config::T5Config c = GatedConfig();
  auto w = BuildT5Weights(c, RandomT5(c, 95), Options());
  ASSERT_TRUE(w.ok()) << w.status();
  const std::vector<LoraAdapter> ads = QvAdapters(*w, {96, 97});
  ASSERT_EQ(ads.size(), 2u);
  auto bank = MakeAdapterBank(*w, {&ads[0], &ads[1]});
  ASSERT_TRUE(bank.ok());
  AdapterBank adjacent = *bank;
  int pairs = 0;
  for (const auto* stack : {&w->encoder, &w->decoder}) {
    for (const BlockWeights& b : *stack) {
      SiteBank& q = adjacent.sites[b.self_attn.q.site];
      SiteBank& v = adjacent.sites[b.self_attn.v.site];
      const int64_t r = q.a.size(1);
      const at::Tensor both = at::cat({q.a, v.a}, 1);  // [S, 2r, in]
      q.a = both.narrow(1, 0, r);
      v.a = both.narrow(1, r, r);
      ++pairs;
    }
  }
  Batch b = MakeBatch(c, 4, 98);
  for (const std::vector<int64_t>& slots :
       {std::vector<int64_t>{1, 1, 1, 1}, std::vector<int64_t>{0, 0, 1, 1},
        std::vector<int64_t>{1, -1, 0, 1}}) {
    auto rows = MakeRowAdapters(*w, &*bank, slots);
    auto rows_adj = MakeRowAdapters(*w, &adjacent, slots);
    ASSERT_TRUE(rows.ok() && rows_adj.ok());
    int64_t gemms[2];
    at::Tensor out[2];
    for (int k = 0; k < 2; ++k) {
      OpCounter counter;
      out[k] = Logits(*w, b, k == 0 ? *rows : *rows_adj);
      gemms[k] = counter.gemms();
    }
    const bool gathered = slots[1] == -1;  // mixed rows: no shared GEMM
    EXPECT_EQ(gemms[0] - gemms[1], gathered ? 0 : pairs) << slots[1];
    const double scale = out[0].abs().max().item<double>();
    EXPECT_LT(MaxDiff(out[0], out[1]), 1e-5 * scale) << slots[1];
  }
}

// ComposeLoraHub lays the composed A factors out side by side: per-row
// candidates share the down-projection of q and v (each self-attention) and
// of the cross v of all decoder blocks; the logits are those of the same
// bank with every factor in its own tensor.
TEST(FusedCount, ComposedBankSharesDownProjections) {
  config::T5Config c = GatedConfig();
  auto w = BuildT5Weights(c, RandomT5(c, 111), Options());
  ASSERT_TRUE(w.ok()) << w.status();
  const std::vector<LoraAdapter> ads = QvAdapters(*w, {112, 113, 114});
  ASSERT_EQ(ads.size(), 3u);
  auto stack = StackModules(*w, {&ads[0], &ads[1], &ads[2]});
  ASSERT_TRUE(stack.ok()) << stack.status();
  at::Tensor weights =
      at::tensor({0.5f, -0.3f, 0.8f, 0.1f, 0.9f, -0.4f, 1.2f, 0.2f, 0.0f,
                  -0.6f, 0.7f, 0.3f},
                 at::kFloat)
          .view({4, 3});
  auto bank = ComposeLoraHub(*stack, weights);
  ASSERT_TRUE(bank.ok()) << bank.status();
  AdapterBank separate = *bank;
  for (SiteBank& sb : separate.sites) {
    if (sb.a.defined()) sb.a = sb.a.clone();
  }
  Batch b = MakeBatch(c, 4, 115);
  auto rows = MakeRowAdapters(*w, &*bank, {0, 1, 2, 3});
  auto rows_sep = MakeRowAdapters(*w, &separate, {0, 1, 2, 3});
  ASSERT_TRUE(rows.ok() && rows_sep.ok());
  ASSERT_EQ(rows->rows_per_slot, 1);
  int64_t gemms[2];
  at::Tensor out[2];
  for (int k = 0; k < 2; ++k) {
    OpCounter counter;
    out[k] = Logits(*w, b, k == 0 ? *rows_sep : *rows);
    gemms[k] = counter.gemms();
  }
  const int64_t self_attentions = c.num_layers + c.num_decoder_layers;
  EXPECT_EQ(gemms[0] - gemms[1], self_attentions + c.num_decoder_layers - 1);
  const double scale = out[0].abs().max().item<double>();
  EXPECT_LT(MaxDiff(out[0], out[1]), 1e-5 * scale);
  // The composed adapter of one candidate is unchanged by the layout.
  auto one = ComposeOne(*stack, {0.5, -0.3, 0.8});
  ASSERT_TRUE(one.ok());
  for (const LoraSite& site : one->sites) {
    EXPECT_LT(MaxDiff(site.a, bank->sites[site.site].a[0]), 1e-6);
    EXPECT_TRUE(site.a.is_contiguous());
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, FusedTest, ::testing::Values(0, 1),
                         [](const auto& info) {
                           return info.param == 0 ? std::string("Gated")
                                                  : std::string("ReluTied");
                         });

// MatmulFloat within a GemmRowsMultipleScope (the serving engine's
// admissions): x's rows padded with zeros up to the multiple, the product of the real rows the same as without the scope
// (within the GEMM's choice of kernel for the other shape), x's shape kept;
// scopes nest and restore.
TEST(GemmRowsMultiple, RoundedRowsGiveTheSameProduct) {
  auto device = testing::TestDevice();
  ASSERT_TRUE(device.ok()) << device.status();
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    const auto opts = at::TensorOptions().dtype(dtype).device(*device);
    at::manual_seed(5);
    const at::Tensor x = at::randn({3, 7, 64}, opts);  // 21 rows
    const at::Tensor w = at::randn({48, 64}, opts);
    const at::Tensor plain = MatmulFloat(x, w);
    at::Tensor rounded, nested, after;
    {
      const testing::OpNameCounter pads({"aten::constant_pad_nd"});
      const GemmRowsMultipleScope scope(16);  // 21 -> 32 rows
      rounded = MatmulFloat(x, w);
      {
        const GemmRowsMultipleScope inner(0);
        nested = MatmulFloat(x.narrow(1, 0, 5), w);  // 15 rows, not rounded
      }
      after = MatmulFloat(x.narrow(1, 0, 5), w);  // 15 -> 16 again
      EXPECT_EQ(pads.count(), 2);  // 21 -> 32 and 15 -> 16
    }
    {
      const testing::OpNameCounter pads({"aten::constant_pad_nd"});
      MatmulFloat(x, w);  // no scope left
      EXPECT_EQ(pads.count(), 0);
    }
    ASSERT_EQ(rounded.sizes(), plain.sizes());
    EXPECT_EQ(rounded.scalar_type(), at::kFloat);
    EXPECT_TRUE(rounded.is_contiguous());
    const double scale = plain.abs().max().item<double>();
    EXPECT_LE(MaxDiff(rounded, plain), 1e-5 * scale);
    const at::Tensor part = plain.narrow(1, 0, 5);
    EXPECT_LE(MaxDiff(nested, part), 1e-5 * scale);
    EXPECT_LE(MaxDiff(after, part), 1e-5 * scale);
    EXPECT_EQ(after.sizes(), part.sizes());
    // A multiple the rows already meet, and a 1-D input.
    const testing::OpNameCounter pads({"aten::constant_pad_nd"});
    const GemmRowsMultipleScope scope(7);
    EXPECT_LE(MaxDiff(MatmulFloat(x, w), plain), 1e-5 * scale);
    EXPECT_EQ(pads.count(), 0);
    EXPECT_LE(MaxDiff(MatmulFloat(x[0][0], w), plain[0][0]), 1e-5 * scale);
    EXPECT_EQ(pads.count(), 1);  // 1 -> 7 rows
  }
}

}  // namespace
}  // namespace lorahub::model
