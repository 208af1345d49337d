// SingleQueryAttention (fused_ops.h: one query per row and head as two
// batched matmuls) and Attention() of one query (on CUDA the short-query
// kernel, vectorized where the head qualifies) against GeneralAttention
// (PyTorch's scaled-dot-product attention on CUDA, matmul / softmax /
// matmul on CPU) and against a double-precision reference that reads only
// the keys the masks leave visible: decoder self-attention over a KV cache
// (the static decoder's full-capacity cache with the causal bias row, and
// the eager cache's narrowed prefix), cross-attention with padded encoder
// rows, T5-sized heads (64) in fp32 and bf16. Runs on $LORAHUB_TEST_DEVICE
// (tiny_t5.h; default cpu).
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/model/fused_ops.h"
#include "gtest/gtest.h"
#include "tests/model/op_name_counter.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

constexpr int64_t kB = 3, kH = 4, kD = 8;

c10::Device Device() {
  auto d = testing::TestDevice();
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *d : c10::Device(c10::kCPU);
}

at::TensorOptions F32() {
  return at::TensorOptions().dtype(at::kFloat).device(Device());
}

// Keys and queries of T5-like size: no 1/sqrt(d) scaling, so the scores
// reach tens and the softmax is far from uniform.
at::Tensor Random(at::IntArrayRef sizes, double scale) {
  return at::randn(sizes, F32()) * scale;
}

// max |got - want| / max(1, max |want|), in double on the CPU.
double RelDiff(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kCPU).to(at::kDouble);
  const at::Tensor w = want.to(at::kCPU).to(at::kDouble);
  EXPECT_EQ(g.sizes(), w.sizes());
  EXPECT_TRUE(at::isfinite(g).all().item<bool>());
  const double scale = std::max(1.0, w.abs().max().item<double>());
  return (g - w).abs().max().item<double>() / scale;
}

// softmax(q k^T + bias) v in double for one (row, head) over the keys
// `first`..`first + count - 1` only: the masked keys are left out, not
// biased away. q: [d]; k, v: [S, d]; bias: [S].
at::Tensor Reference(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& bias,
                     int64_t count) {
  const at::Tensor qd = q.to(at::kCPU).to(at::kDouble);
  const at::Tensor kd = k.to(at::kCPU).to(at::kDouble).narrow(0, 0, count);
  const at::Tensor vd = v.to(at::kCPU).to(at::kDouble).narrow(0, 0, count);
  const at::Tensor bd = bias.to(at::kCPU).to(at::kDouble).narrow(0, 0, count);
  const at::Tensor p = at::softmax(at::mv(kd, qd) + bd, 0);
  return at::mv(vd.t(), p);
}

// The encoder's mask bias [B, 1, 1, S] for rows of lengths[b] tokens
// padded to S: 0 on their tokens, the mask value after them.
at::Tensor PaddedRowsBias(const std::vector<int64_t>& lengths, int64_t S) {
  const int64_t B = static_cast<int64_t>(lengths.size());
  at::Tensor bias = at::zeros({B, 1, 1, S}, F32());
  for (int64_t b = 0; b < B; ++b) {
    bias[b].narrow(-1, lengths[b], S - lengths[b])
        .fill_(std::numeric_limits<float>::lowest());
  }
  return bias;
}

// True when Attention() of one query runs the short-query kernel here.
bool ShortQueryKernelRuns(const at::Tensor& q) {
  return q.is_cuda() && FusedKernelsEnabled() && !DecodeAttentionGeneric() &&
         !DecodeAttentionBmm() && !SmallAttentionGeneric();
}

// Decoder self-attention at step t as the static decoder runs it: the whole
// capacity-C cache (later positions zero), row t of relative bias + causal
// mask. Also the eager KV cache: the first t + 1 positions, no mask.
TEST(DecodeAttentionTest, SelfAttentionWithCache) {
  at::manual_seed(11);
  const int64_t C = 9, L = 2;
  // The engine's mask value in bf16 mode (finfo(bfloat16).min).
  const double min_value =
      static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
  const at::Tensor position = Random({1, kH, C, C}, 2.0);
  const at::Tensor pos = at::arange(C, at::TensorOptions().device(Device()));
  const at::Tensor causal = at::where(pos.unsqueeze(0) > pos.unsqueeze(1),
                                      at::scalar_tensor(min_value, F32()),
                                      at::scalar_tensor(0.0, F32()))
                                .view({1, 1, C, C});
  const at::Tensor self_bias = (position + causal).contiguous();
  // As StaticDecoder::self_kv_: [2, L, B, H, C, d], one block's slice.
  const at::Tensor kv = at::zeros({2, L, kB, kH, C, kD}, F32());
  for (int64_t t : {int64_t{0}, int64_t{4}, C - 1}) {
    kv.narrow(4, 0, t + 1).copy_(Random({2, L, kB, kH, t + 1, kD}, 1.5));
    const at::Tensor k = kv[0][1], v = kv[1][1];
    const at::Tensor q = Random({kB, kH, 1, kD}, 1.5);
    const at::Tensor t_index =
        at::full({1}, t, at::TensorOptions().dtype(at::kLong).device(Device()));
    const at::Tensor bias = self_bias.index_select(2, t_index);

    const at::Tensor single = SingleQueryAttention(q, k, v, bias);
    const at::Tensor general = GeneralAttention(q, k, v, bias);
    ASSERT_EQ(single.sizes(), (std::vector<int64_t>{kB, kH, 1, kD}));
    const double vs_general = RelDiff(single, general);
    EXPECT_LE(vs_general, 2e-6) << "t " << t;

    // The eager cache: a narrowed (non-contiguous) prefix, bias unmasked.
    const at::Tensor prefix_bias =
        self_bias.narrow(2, t, 1).narrow(3, 0, t + 1);
    const at::Tensor eager = SingleQueryAttention(
        q, k.narrow(2, 0, t + 1), v.narrow(2, 0, t + 1), prefix_bias);
    const double vs_eager = RelDiff(eager, single);
    EXPECT_LE(vs_eager, 2e-6) << "t " << t;

    at::Tensor want = at::empty({kB, kH, 1, kD}, at::kDouble);
    for (int64_t b = 0; b < kB; ++b) {
      for (int64_t h = 0; h < kH; ++h) {
        want[b][h][0].copy_(
            Reference(q[b][h][0], k[b][h], v[b][h], bias[0][h][0], t + 1));
      }
    }
    const double vs_ref = RelDiff(single, want);
    const double general_vs_ref = RelDiff(general, want);
    EXPECT_LE(vs_ref, 1e-5) << "t " << t;
    EXPECT_LE(general_vs_ref, 1e-5) << "t " << t;
    // The dispatch of a decode step (the short-query kernel on CUDA).
    const at::Tensor dispatched = Attention(q, k, v, bias);
    EXPECT_LE(RelDiff(dispatched, want), 1e-5) << "t " << t;
    if (ShortQueryKernelRuns(q)) {
      // The kernel stops at the last key the bias leaves visible: the
      // whole-capacity cache gives the prefix's result bit for bit, and
      // what lies past position t is never read (NaN there changes nothing).
      EXPECT_TRUE(at::equal(
          dispatched, Attention(q, k.narrow(2, 0, t + 1),
                                v.narrow(2, 0, t + 1), prefix_bias)))
          << "t " << t;
      if (t + 1 < C) {
        const at::Tensor poisoned = kv.clone();
        poisoned.narrow(4, t + 1, C - t - 1).fill_(NAN);
        EXPECT_TRUE(at::equal(
            dispatched, Attention(q, poisoned[0][1], poisoned[1][1], bias)))
            << "t " << t;
      }
    }
    std::printf(
        "self t=%lld: single vs general %.3g, vs eager prefix %.3g, vs "
        "double %.3g (general vs double %.3g)\n",
        static_cast<long long>(t), vs_general, vs_eager, vs_ref,
        general_vs_ref);
  }
}

// Cross-attention: encoder keys and values as the fused cross k|v GEMM
// leaves them (strided views that need a copy to fold B and H), rows padded
// to S with the encoder's mask bias [B, 1, 1, S].
TEST(DecodeAttentionTest, CrossAttentionWithPaddedRows) {
  at::manual_seed(12);
  const int64_t S = 7;
  const std::vector<int64_t> lengths = {7, 4, 1};
  const double min_value = std::numeric_limits<float>::lowest();
  at::Tensor mask = at::zeros({kB, S}, F32());
  for (int64_t b = 0; b < kB; ++b) mask[b].narrow(0, 0, lengths[b]).fill_(1);
  const at::Tensor mask_bias = ((1.0 - mask) * min_value).view({kB, 1, 1, S});
  // [B, S, 2 * H * d]: k and v of one block side by side, then split into
  // heads ([B, H, S, d] views).
  const at::Tensor chunk = Random({kB, S, 2 * kH * kD}, 1.5);
  auto heads = [&](int64_t j) {
    return chunk.narrow(-1, j * kH * kD, kH * kD)
        .view({kB, S, kH, kD})
        .transpose(1, 2);
  };
  const at::Tensor k = heads(0), v = heads(1);
  const at::Tensor q = Random({kB, kH, 1, kD}, 1.5);

  const at::Tensor single = SingleQueryAttention(q, k, v, mask_bias);
  const at::Tensor general = GeneralAttention(q, k, v, mask_bias);
  const double vs_general = RelDiff(single, general);
  EXPECT_LE(vs_general, 2e-6);
  // Contiguous keys and values (the static decoder's buffers) give the same.
  const double vs_contiguous = RelDiff(
      SingleQueryAttention(q, k.contiguous(), v.contiguous(), mask_bias),
      single);
  EXPECT_LE(vs_contiguous, 2e-6);

  at::Tensor want = at::empty({kB, kH, 1, kD}, at::kDouble);
  const at::Tensor zero_bias = at::zeros({S}, F32());
  for (int64_t b = 0; b < kB; ++b) {
    for (int64_t h = 0; h < kH; ++h) {
      want[b][h][0].copy_(
          Reference(q[b][h][0], k[b][h], v[b][h], zero_bias, lengths[b]));
    }
  }
  const double vs_ref = RelDiff(single, want);
  EXPECT_LE(vs_ref, 1e-5);
  EXPECT_LE(RelDiff(general, want), 1e-5);
  EXPECT_LE(RelDiff(Attention(q, k, v, mask_bias), want), 1e-5);
  EXPECT_LE(RelDiff(Attention(q, k.contiguous(), v.contiguous(), mask_bias),
                    want),
            1e-5);
  std::printf(
      "cross: single vs general %.3g, vs contiguous %.3g, vs double %.3g\n",
      vs_general, vs_contiguous, vs_ref);
}

// bf16 keys and values (LORAHUB_DECODE_ATTN_BF16=1, fused_ops.h): fp32
// accumulation and fp32 scores, so where q, k and v are bf16 values already
// (the engine's projections without a LoRA delta) the only new rounding is
// the probabilities' (2^-9 relative); q carrying fp32 bits (a LoRA delta on
// q) is rounded too, which large T5 scores amplify: printed for the record.
TEST(DecodeAttentionTest, Bf16KeysAndValues) {
  at::manual_seed(14);
  const int64_t S = 11;
  auto bf16_values = [](const at::Tensor& t) {
    return t.to(at::kBFloat16).to(at::kFloat);
  };
  const at::Tensor k = bf16_values(Random({kB, kH, S, kD}, 1.5));
  const at::Tensor v = bf16_values(Random({kB, kH, S, kD}, 1.5));
  const at::Tensor q_full = Random({kB, kH, 1, kD}, 1.5);
  const at::Tensor q = bf16_values(q_full);
  at::Tensor bias = Random({1, kH, 1, S}, 2.0).expand({kB, kH, 1, S}).clone();
  bias[1].narrow(-1, 6, S - 6).fill_(std::numeric_limits<float>::lowest());
  const at::Tensor kb = k.to(at::kBFloat16), vb = v.to(at::kBFloat16);

  const at::Tensor want = SingleQueryAttention(q, k, v, bias);
  const at::Tensor got = SingleQueryAttention(q, kb, vb, bias);
  EXPECT_EQ(got.scalar_type(), at::kFloat);
  const double diff = RelDiff(got, want);
  EXPECT_LE(diff, 4e-3);  // 2^-8: the probabilities' rounding, summed
  // The general path widens bf16 keys and values to q's dtype.
  EXPECT_LE(RelDiff(GeneralAttention(q, kb, vb, bias),
                    GeneralAttention(q, k, v, bias)),
            2e-6);
  const double diff_full = RelDiff(SingleQueryAttention(q_full, kb, vb, bias),
                                   SingleQueryAttention(q_full, k, v, bias));
  EXPECT_LE(diff_full, 1e-2);
  // The dispatch (on CUDA the kernel: fp32 q and probabilities over the
  // widened bf16 keys and values, so no rounding beyond theirs).
  const at::Tensor dispatched = Attention(q_full, kb, vb, bias);
  EXPECT_EQ(dispatched.scalar_type(), at::kFloat);
  EXPECT_LE(RelDiff(dispatched, SingleQueryAttention(q_full, k, v, bias)),
            1e-2);
  std::printf("bf16 k/v: vs fp32 path %.3g (bf16-valued q), %.3g (fp32 q)\n",
              diff, diff_full);
}

// Attention() sends one query to SingleQueryAttention (or, with
// LORAHUB_DECODE_ATTN_GENERIC=1, to GeneralAttention) and longer queries to
// GeneralAttention; shapes it does not fold fall back to the general path.
TEST(DecodeAttentionTest, Dispatch) {
  at::manual_seed(13);
  const int64_t S = 5;
  const at::Tensor k = Random({kB, kH, S, kD}, 1.0);
  const at::Tensor v = Random({kB, kH, S, kD}, 1.0);
  const at::Tensor bias = Random({1, kH, 1, S}, 1.0);
  const at::Tensor q1 = Random({kB, kH, 1, kD}, 1.0);
  const char* env = std::getenv("LORAHUB_DECODE_ATTN_GENERIC");
  const bool generic =
      env != nullptr && *env != '\0' && std::string(env) != "0";
  EXPECT_EQ(DecodeAttentionGeneric(), generic);
  const at::Tensor want1 = generic ? GeneralAttention(q1, k, v, bias)
                                   : SingleQueryAttention(q1, k, v, bias);
  const bool kernel = ShortQueryKernelRuns(q1);
  const at::Tensor got1 = Attention(q1, k, v, bias);
  if (kernel) {  // another summation order
    EXPECT_LE(RelDiff(got1, want1), 1e-5);
  } else {
    EXPECT_TRUE(at::equal(got1, want1));
  }
  // A rounded context is the fp32 one rounded once, whichever path ran.
  const at::Tensor rounded1 = Attention(q1, k, v, bias, at::kBFloat16);
  ASSERT_EQ(rounded1.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(rounded1, got1.to(at::kBFloat16)));

  const at::Tensor q3 = Random({kB, kH, 3, kD}, 1.0);
  const at::Tensor bias3 = Random({1, kH, 3, S}, 1.0);
  EXPECT_TRUE(
      at::equal(Attention(q3, k, v, bias3), GeneralAttention(q3, k, v, bias3)));
  // Not a single query: SingleQueryAttention hands it on unchanged.
  EXPECT_TRUE(at::equal(SingleQueryAttention(q3, k, v, bias3),
                        GeneralAttention(q3, k, v, bias3)));
  // Keys broadcast over rows (B = 1): general path, same result as
  // expanding them.
  const at::Tensor k1 = k.narrow(0, 0, 1), v1 = v.narrow(0, 0, 1);
  EXPECT_LE(RelDiff(SingleQueryAttention(q1, k1, v1, bias),
                    SingleQueryAttention(q1, k1.expand_as(k).contiguous(),
                                         v1.expand_as(v).contiguous(), bias)),
            2e-6);
}

// T5's head size (64): on CUDA the kernel's vectorized variant (16 fp32 or
// 8 bf16 lanes per key), with more keys than one round of the block takes
// (300 > 256 / 16) and padded rows; fp32 queries over fp32 and over bf16
// keys and values, against the double reference on the same values.
TEST(DecodeAttentionTest, T5HeadsAgainstDouble) {
  at::manual_seed(15);
  const int64_t B = 3, H = 2, d = 64;
  for (int64_t S : {int64_t{5}, int64_t{300}}) {
    const std::vector<int64_t> lengths = {S, S / 2 + 1, 1};
    const at::Tensor mask_bias = PaddedRowsBias(lengths, S);
    const at::Tensor q = Random({B, H, 1, d}, 0.5);
    for (at::ScalarType kv_dtype : {at::kFloat, at::kBFloat16}) {
      const at::Tensor k = Random({B, H, S, d}, 0.5).to(kv_dtype);
      const at::Tensor v = Random({B, H, S, d}, 1.0).to(kv_dtype);
      const at::Tensor got = Attention(q, k, v, mask_bias);
      ASSERT_EQ(got.sizes(), (std::vector<int64_t>{B, H, 1, d}));
      at::Tensor want = at::empty({B, H, 1, d}, at::kDouble);
      const at::Tensor zero_bias = at::zeros({S}, F32());
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t h = 0; h < H; ++h) {
          want[b][h][0].copy_(Reference(q[b][h][0], k[b][h], v[b][h],
                                        zero_bias, lengths[b]));
        }
      }
      // fp32 k/v: summation order only; bf16 k/v: the CPU and bmm paths
      // round the probabilities to bf16 (2^-9), the kernel does not.
      const double bound = kv_dtype == at::kFloat ? 1e-5 : 4e-3;
      const double diff = RelDiff(got, want);
      EXPECT_LE(diff, bound) << "S " << S << " " << kv_dtype;
      std::printf("d=64 S=%lld %s k/v: vs double %.3g\n",
                  static_cast<long long>(S),
                  kv_dtype == at::kFloat ? "fp32" : "bf16", diff);
    }
  }
}

// A head whose every key is masked (a batch row without a prompt, padded
// throughout): every kernel variant and path weighs its keys alike (the
// scores all round to the mask value), so the context is the values' mean,
// not a division by zero. T5-sized heads and more keys than one round of
// the split-key kernel (4 warps x 2 or 4 keys), fp32 and bf16 keys/values.
TEST(DecodeAttentionTest, FullyMaskedHeadIsTheMeanOfItsValues) {
  at::manual_seed(16);
  const int64_t B = 2, H = 2, S = 37, d = 64;
  at::Tensor mask_bias = at::zeros({B, 1, 1, S}, F32());
  mask_bias[1].fill_(std::numeric_limits<float>::lowest());
  const at::Tensor q = Random({B, H, 1, d}, 0.5);
  for (at::ScalarType kv_dtype : {at::kFloat, at::kBFloat16}) {
    const at::Tensor k = Random({B, H, S, d}, 0.5).to(kv_dtype);
    const at::Tensor v = Random({B, H, S, d}, 1.0).to(kv_dtype);
    const at::Tensor got = Attention(q, k, v, mask_bias);
    const at::Tensor mean = v[1].to(at::kFloat).mean(1, /*keepdim=*/true);
    // bf16 on the CPU path: the probabilities rounded (2^-9).
    const double bound = kv_dtype == at::kFloat ? 1e-5 : 4e-3;
    EXPECT_LE(RelDiff(got[1], mean), bound) << kv_dtype;
    // The visible row still attends (not the mean).
    EXPECT_GT(RelDiff(got[0], v[0].to(at::kFloat).mean(1, true)), 1e-2);
  }
}

// Cross-attention keys and values of decode steps: bf16 only for a bf16
// model whose single queries take the kernel (fp32 q and probabilities),
// fp32 otherwise and for fp32 models. The self-attention cache: bf16 only
// for a bf16 model on CUDA whose steps take the step kernel.
TEST(DecodeAttentionTest, CrossKeyValueDtype) {
  const c10::Device device = Device();
  const char* env = std::getenv("LORAHUB_DECODE_CROSS_FP32");
  const bool fp32 = env != nullptr && *env != '\0' && std::string(env) != "0";
  const at::Tensor probe = at::zeros({1, 1, 1, 1}, F32());
  const bool bf16 = ShortQueryKernelRuns(probe) && !fp32;
  EXPECT_EQ(DecodeCrossKvDtype(at::kBFloat16, device),
            bf16 ? at::kBFloat16 : DecodeKvDtype(at::kBFloat16));
  EXPECT_EQ(DecodeCrossKvDtype(at::kFloat, device), at::kFloat);
  EXPECT_EQ(DecodeCrossKvDtype(at::kBFloat16, c10::Device(c10::kCPU)),
            DecodeKvDtype(at::kBFloat16));
  const char* self_env = std::getenv("LORAHUB_DECODE_SELF_FP32");
  const bool self_fp32 = self_env != nullptr && *self_env != '\0' &&
                         std::string(self_env) != "0";
  const bool self_bf16 = device.is_cuda() && DecodeStepAttentionEnabled() &&
                         !StagedSelfStepOff() && !self_fp32;
  EXPECT_EQ(DecodeSelfKvDtype(at::kBFloat16, device),
            self_bf16 ? at::kBFloat16 : DecodeKvDtype(at::kBFloat16));
  EXPECT_EQ(DecodeSelfKvDtype(at::kFloat, device), at::kFloat);
  EXPECT_EQ(DecodeSelfKvDtype(at::kBFloat16, c10::Device(c10::kCPU)),
            DecodeKvDtype(at::kBFloat16));
}

// The ATen ops of DecodeStepAttention's fallback (the expands' bmm, the
// store's index_copy_), counted on this thread: none when the step kernel ran.
const std::vector<std::string> kFallbackOps = {"aten::bmm", "aten::index_copy_"};

// The per-row LoRA delta of `e` for row b, in double: scale[slot] * mask[b]
// * b[slot] xa[b, ranks]^T, [H * D].
at::Tensor RowDelta(const RowLoraExpand& e, const at::Tensor& slots,
                    const at::Tensor& mask, int64_t b) {
  const auto cpu = [](const at::Tensor& t) {
    return t.to(at::kCPU).to(at::kDouble);
  };
  const int64_t slot = slots[b].item<int64_t>();
  const int64_t r = e.b.size(2);
  const double s = cpu(e.scale).reshape({-1})[slot].item<double>() *
                   cpu(mask).reshape({-1})[b].item<double>();
  return at::mv(cpu(e.b[slot]), cpu(e.xa[b].narrow(0, e.rank_offset, r))) * s;
}

// DecodeStepAttention (fused_ops.h): a self-attention step with per-row
// LoRA deltas on q and on the new value, which it stores with the new key
// at position t of the cache, against the same steps in double (the keys
// 0..t of the updated cache, the causal bias row t); the cache afterwards
// holds the new key and value at t and nothing else changed. T5-sized heads
// over a static decoder's capacity; q, k, v strided views of one fused
// projection output, whole or as 2 split-K partials; one row masked
// (no adapter); three adapter slots; an fp32 cache, and a bf16 one (the
// default of a bf16 model on CUDA, DecodeSelfKvDtype: the new key and value
// stored rounded, and attended as stored); the factors in bf16 and (CUDA
// only: the step kernel alone takes them) in int8 with their scale (lora.h
// SiteBank::b_int8). On CUDA the step kernel must take it (none of the
// fallback's ops run).
TEST(DecodeAttentionTest, StepAttentionStoresAndExpands) {
  at::manual_seed(18);
  const int64_t B = 5, H = 3, d = 64, C = 40, S = 3, r = 16, HD = H * d;
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(Device());
  const at::Tensor slots =
      at::tensor(std::vector<int64_t>{2, 0, 1, 2, 0}, at::kLong).to(Device());
  const at::Tensor mask =
      at::tensor(std::vector<float>{1, 0, 1, 1, 1}).view({B, 1, 1}).to(Device());
  const at::Tensor xa = Random({B, 2 * r}, 1.0);
  const RowLoraExpand q_lora{
      xa, 0, Random({S, HD, r}, 0.3).to(at::kBFloat16),
      at::tensor(std::vector<float>{0.5f, 2.0f, 1.0f}).view({S, 1, 1}).to(
          Device())};
  const RowLoraExpand v_lora{xa, r, Random({S, HD, r}, 0.3).to(at::kBFloat16),
                             at::full({S, 1, 1}, 1.5, F32())};
  // The same with int8 factors (lora.h SiteBank::b_int8; CUDA only).
  const auto int8_factors = [&] {
    return Random({S, HD, r}, 60.0).round().clamp(-127, 127).to(at::kChar);
  };
  const RowLoraExpand q_lora8{xa, 0, int8_factors(), q_lora.scale * 0.005};
  const RowLoraExpand v_lora8{xa, r, int8_factors(), v_lora.scale * 0.005};
  const bool kernel = Device().is_cuda() && DecodeStepAttentionEnabled();
  const at::Tensor pos = at::arange(C, i64);
  const at::Tensor bias_all =
      (Random({1, H, C, C}, 2.0) +
       at::where(pos.unsqueeze(0) > pos.unsqueeze(1),
                 at::scalar_tensor(std::numeric_limits<float>::lowest(), F32()),
                 at::scalar_tensor(0.0, F32()))
           .view({1, 1, C, C}))
          .contiguous();
  // q|k|v whole (1 part) and as split-K partials (SplitKProject: 2 parts,
  // the step kernel sums them in order).
  for (const bool int8 : {false, true}) {
  if (int8 && !kernel) continue;
  const RowLoraExpand& q_row = int8 ? q_lora8 : q_lora;
  const RowLoraExpand& v_row = int8 ? v_lora8 : v_lora;
  for (at::ScalarType cache_dtype : {at::kFloat, at::kBFloat16}) {
  for (int64_t parts : {1, 2}) {
  for (int64_t t : {int64_t{0}, int64_t{17}, C - 1}) {
    const at::Tensor partials = Random({parts, B, 1, 3 * HD}, 1.0);
    at::Tensor y = partials[0].clone();  // fused q|k|v: the sum in order
    for (int64_t p = 1; p < parts; ++p) y.add_(partials[p]);
    const auto heads_of = [&](const at::Tensor& x, int64_t i) {
      return x.narrow(-1, i * HD, HD).view({B, 1, H, d}).transpose(1, 2);
    };
    const auto heads = [&](int64_t i) { return heads_of(y, i); };
    const at::Tensor t_index = at::full({1}, t, i64);
    const at::Tensor bias = bias_all.index_select(2, t_index);
    const at::Tensor cache = Random({2, B, H, C, d}, 1.0).to(cache_dtype);
    const at::Tensor before = cache.clone();
    const bool bf16 = cache_dtype == at::kBFloat16;
    DecodeStepInputs step;
    step.q = heads_of(partials[0], 0);
    step.k = cache[0];
    step.v = cache[1];
    step.bias = bias;
    step.q_lora = &q_row;
    step.k_new = heads_of(partials[0], 1);
    step.v_new = heads_of(partials[0], 2);
    step.parts = parts;
    step.part_stride = partials.stride(0);
    step.v_lora = &v_row;
    step.t = t_index;
    step.slots = slots;
    step.mask = mask;
    at::Tensor got;
    int64_t fallback_ops = 0;
    {
      const testing::OpNameCounter counter(kFallbackOps);
      got = DecodeStepAttention(step, at::kFloat);
      fallback_ops = counter.count();
    }
    ASSERT_EQ(got.sizes(), (std::vector<int64_t>{B, H, 1, d}));
    const std::string where = std::string(int8 ? "int8 factors, " : "") +
                              std::string(bf16 ? "bf16" : "fp32") +
                              " cache, parts " + std::to_string(parts) +
                              ", t " + std::to_string(t);
    if (Device().is_cuda() && DecodeStepAttentionEnabled()) {
      EXPECT_EQ(fallback_ops, 0) << where;
    }
    // The new value as stored: with a bf16 cache within its rounding of
    // the double sum below (checked), and what the reference attends to.
    const at::Tensor stored_v =
        cache[1].select(2, t).to(at::kCPU).to(at::kDouble);
    at::Tensor want = at::empty({B, H, 1, d}, at::kDouble);
    at::Tensor want_v = at::empty({B, H, d}, at::kDouble);
    for (int64_t b = 0; b < B; ++b) {
      const at::Tensor dq = RowDelta(q_row, slots, mask, b).view({H, d});
      const at::Tensor dv = RowDelta(v_row, slots, mask, b).view({H, d});
      for (int64_t h = 0; h < H; ++h) {
        const auto cpu = [](const at::Tensor& x) {
          return x.to(at::kCPU).to(at::kDouble);
        };
        at::Tensor keys = cpu(before[0][b][h]);
        at::Tensor values = cpu(before[1][b][h]);
        keys[t].copy_(cpu(heads(1)[b][h][0].to(cache_dtype)));
        want_v[b][h].copy_(cpu(heads(2)[b][h][0]) + dv[h]);
        values[t].copy_(bf16 ? stored_v[b][h] : want_v[b][h]);
        want[b][h][0].copy_(Reference(cpu(heads(0)[b][h][0]) + dq[h], keys,
                                      values, bias[0][h][0], t + 1));
      }
    }
    // The kernel: summation order only. The fallback over a bf16 cache
    // (bmm, SingleQueryAttention) rounds q and the probabilities to bf16
    // (measured on the CPU: up to 0.015).
    const double diff = RelDiff(got, want);
    EXPECT_LE(diff, kernel || !bf16 ? 1e-5 : 3e-2) << where;
    EXPECT_TRUE(at::equal(cache[0].select(2, t).to(at::kCPU),
                          heads(1).squeeze(2).to(cache_dtype).to(at::kCPU)))
        << where;
    // bf16: one rounding of the fp32 sum (2^-9 relative, each element).
    EXPECT_LE(RelDiff(stored_v, want_v), bf16 ? 4e-3 : 1e-6) << where;
    for (int64_t kv = 0; kv < 2; ++kv) {  // the other positions untouched
      EXPECT_TRUE(at::equal(cache[kv].narrow(2, 0, t).to(at::kCPU),
                            before[kv].narrow(2, 0, t).to(at::kCPU)));
      EXPECT_TRUE(at::equal(cache[kv].narrow(2, t + 1, C - t - 1).to(at::kCPU),
                            before[kv].narrow(2, t + 1, C - t - 1)
                                .to(at::kCPU)));
    }
    std::printf("step %s: vs double %.3g (fallback ops %lld)\n",
                where.c_str(), diff, static_cast<long long>(fallback_ops));
  }
  }
  }
  }
}

// DecodeStepAttention for a cross-attention step: q's per-row delta only,
// bf16 keys and values of padded encoder rows (what the static decoder
// holds), no store; against double. The delta's factors in bf16 and (CUDA
// only: the step kernel alone takes them) in int8 with their scale (lora.h
// SiteBank::b_int8).
TEST(DecodeAttentionTest, StepAttentionCrossWithRowLora) {
  at::manual_seed(19);
  const int64_t B = 3, H = 2, d = 64, S = 3, r = 16, keys = 37;
  const bool kernel = Device().is_cuda() && DecodeStepAttentionEnabled();
  for (const bool int8 : {false, true}) {
    if (int8 && !kernel) continue;
    SCOPED_TRACE(int8 ? "int8 factors" : "bf16 factors");
    const at::Tensor slots =
        at::tensor(std::vector<int64_t>{1, 2, 0}, at::kLong).to(Device());
    const at::Tensor ones = at::ones({B, 1, 1}, F32());
    const at::Tensor factors =
        int8 ? Random({S, H * d, r}, 60.0).round().clamp(-127, 127).to(at::kChar)
             : Random({S, H * d, r}, 0.3).to(at::kBFloat16);
    const RowLoraExpand q_lora{Random({B, r}, 1.0), 0, factors,
                               at::full({S, 1, 1}, int8 ? 0.01 : 2.0, F32())};
    const std::vector<int64_t> lengths = {keys, 20, 1};
    const at::Tensor mask_bias = PaddedRowsBias(lengths, keys);
    const at::Tensor q = Random({B, H, 1, d}, 0.5);
    const at::Tensor k = Random({B, H, keys, d}, 0.5).to(at::kBFloat16);
    const at::Tensor v = Random({B, H, keys, d}, 1.0).to(at::kBFloat16);
    DecodeStepInputs step;
    step.q = q;
    step.k = k;
    step.v = v;
    step.bias = mask_bias;
    step.q_lora = &q_lora;
    step.slots = slots;
    const at::Tensor got = DecodeStepAttention(step, at::kFloat);
    at::Tensor want = at::empty({B, H, 1, d}, at::kDouble);
    const at::Tensor zero_bias = at::zeros({keys}, F32());
    for (int64_t b = 0; b < B; ++b) {
      const at::Tensor dq = RowDelta(q_lora, slots, ones, b).view({H, d});
      for (int64_t h = 0; h < H; ++h) {
        want[b][h][0].copy_(Reference(
            q[b][h][0].to(at::kCPU).to(at::kDouble) + dq[h], k[b][h], v[b][h],
            zero_bias, lengths[b]));
      }
    }
    // The kernel: summation order only; the CPU fallback (bmm) rounds the
    // probabilities to bf16 (2^-9 each; the q delta makes the scores large).
    const double diff = RelDiff(got, want);
    EXPECT_LE(diff, kernel ? 1e-5 : 1e-2);
    std::printf("cross step (%s factors): vs double %.3g\n", int8 ? "int8" : "bf16", diff);
  }
}

// CrossKeyLengths: each row's visible keys where they are a prefix with a
// bias of exactly zero (-0 included), else -1.
TEST(DecodeAttentionTest, CrossKeyLengthsOfBiases) {
  const float low = std::numeric_limits<float>::lowest();
  const at::Tensor bias =
      at::tensor(std::vector<float>{
                     0, 0, 0, low, low,     // 3
                     -0.f, 0, 0, 0, 0,      // 5 (-0 is zero)
                     0, low, 0, low, low,   // a masked key among them
                     0, 0.5f, 0, low, low,  // a biased key among them
                     low, low, low, low, low,  // none visible
                     0, low, low, low, low})  // 1
          .view({6, 1, 1, 5})
          .to(Device());
  const at::Tensor got = CrossKeyLengths(bias).to(at::kCPU);
  ASSERT_EQ(got.scalar_type(), at::kInt);
  const std::vector<int32_t> want = {3, 5, -1, -1, -1, 1};
  ASSERT_EQ(got.numel(), 6);
  for (int64_t b = 0; b < 6; ++b) {
    EXPECT_EQ(got[b].item<int32_t>(), want[static_cast<size_t>(b)])
        << "row " << b;
  }
}

// DecodeStepAttention for a cross-attention step over rows packed end to
// end (key_starts) whose visible keys are given (key_lens, from
// CrossKeyLengths): on CUDA the kernel that stages the keys and values in
// shared memory, bit for bit the kernel that scans the bias (key_lens
// undefined). Rows within one staged chunk (64 bf16 keys of 64 values) and
// over it (65, 70, 130 keys), a row of one key, a row with a biased visible
// key (length -1: it reads the bias); q's per-row delta with one row
// masked; q as 2 split-K partials; against double.
TEST(DecodeAttentionTest, StepAttentionCrossThroughKeyLengths) {
  at::manual_seed(23);
  const int64_t B = 5, H = 3, d = 64, slots_n = 3, r = 16, S = 136;
  const std::vector<int64_t> lengths = {70, 1, 64, 65, 130};
  std::vector<int32_t> first(B);
  int32_t next = 0;
  for (int64_t b = 0; b < B; ++b) {
    first[static_cast<size_t>(b)] = next;
    next += static_cast<int32_t>(lengths[static_cast<size_t>(b)]);
  }
  const at::Tensor starts = at::tensor(first, at::kInt).to(Device());
  // As CrossKvBuffer lays a block out: [H, B * S tokens, d] viewed as
  // [B, H, S, d]; row b's keys from token first[b] on.
  const auto rows_of = [&](const at::Tensor& tokens) {
    return tokens.view({H, B, S, d}).permute({1, 0, 2, 3});
  };
  const at::Tensor k = rows_of(Random({H, B * S, d}, 0.5).to(at::kBFloat16));
  const at::Tensor v = rows_of(Random({H, B * S, d}, 1.0).to(at::kBFloat16));
  at::Tensor bias = PaddedRowsBias(lengths, S);
  bias[3][0][0][10].fill_(0.75);
  const at::Tensor lens = CrossKeyLengths(bias);
  const std::vector<int32_t> want_lens = {70, 1, 64, -1, 130};
  for (int64_t b = 0; b < B; ++b) {
    EXPECT_EQ(lens[b].item<int32_t>(), want_lens[static_cast<size_t>(b)]);
  }
  const at::Tensor slots =
      at::tensor(std::vector<int64_t>{2, 0, 1, 2, 1}, at::kLong).to(Device());
  const at::Tensor mask =
      at::tensor(std::vector<float>{1, 0, 1, 1, 1}).view({B, 1, 1}).to(Device());
  const RowLoraExpand q_lora{
      Random({B, r}, 1.0), 0,
      Random({slots_n, H * d, r}, 0.3).to(at::kBFloat16),
      at::tensor(std::vector<float>{0.5f, 2.0f, 1.0f})
          .view({slots_n, 1, 1})
          .to(Device())};
  const at::Tensor partials = Random({2, B, H, 1, d}, 0.4);
  DecodeStepInputs step;
  step.q = partials[0];
  step.parts = 2;
  step.part_stride = partials.stride(0);
  step.k = k;
  step.v = v;
  step.bias = bias;
  step.key_starts = starts;
  step.q_lora = &q_lora;
  step.slots = slots;
  step.mask = mask;
  const at::Tensor scanned = DecodeStepAttention(step, at::kFloat);
  step.key_lens = lens;
  at::Tensor got;
  int64_t fallback_ops = 0;
  {
    const testing::OpNameCounter counter(kFallbackOps);
    got = DecodeStepAttention(step, at::kFloat);
    fallback_ops = counter.count();
  }
  const bool kernel = Device().is_cuda() && DecodeStepAttentionEnabled();
  if (kernel) {
    EXPECT_EQ(fallback_ops, 0);
    EXPECT_TRUE(at::equal(got, scanned))
        << "max diff " << (got - scanned).abs().max().item<double>();
  }
  const at::Tensor keys = GatherKeyRows(k, starts);
  const at::Tensor values = GatherKeyRows(v, starts);
  const at::Tensor q = partials[0] + partials[1];
  at::Tensor want = at::empty({B, H, 1, d}, at::kDouble);
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor dq = RowDelta(q_lora, slots, mask, b).view({H, d});
    for (int64_t h = 0; h < H; ++h) {
      want[b][h][0].copy_(Reference(
          q[b][h][0].to(at::kCPU).to(at::kDouble) + dq[h], keys[b][h],
          values[b][h], bias[b][0][0], lengths[static_cast<size_t>(b)]));
    }
  }
  const double diff = RelDiff(got, want);
  EXPECT_LE(diff, kernel ? 1e-5 : 1e-2);
  std::printf("cross step through key lengths: vs double %.3g\n", diff);
}

// StartDecoderStep (fused_ops.h): the embeddings, the bias rows and this
// step's positions equal the ATen ops' bit for bit, and t advances, clamped
// at t_max: one position for every row (a static decoder), and a position
// per row (row slots, two of them at the last position). On CUDA the step
// start kernel runs.
TEST(DecodeAttentionTest, StartDecoderStepEqualsItsOps) {
  at::manual_seed(21);
  const int64_t V = 50, d = 64, B = 5, H = 3, C = 9;
  const auto i64 = at::TensorOptions().dtype(at::kLong).device(Device());
  const at::Tensor tokens =
      at::tensor(std::vector<int64_t>{3, 0, V - 1, 7, 3}, at::kLong)
          .to(Device());
  const at::Tensor self_bias = Random({1, H, C, C}, 2.0);
  const auto cpu = [](const at::Tensor& x) { return x.to(at::kCPU); };
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    const at::Tensor table = Random({V, d}, 1.0).to(dtype);
    for (int64_t rows : {int64_t{1}, B}) {
      at::Tensor t =
          rows == 1 ? at::full({1}, 4, i64)
                    : at::tensor(std::vector<int64_t>{0, C - 1, 3, C - 1, 5},
                                 at::kLong)
                          .to(Device());
      const int64_t t_max =
          rows == 1 ? std::numeric_limits<int64_t>::max() : C - 1;
      const at::Tensor before = t.clone();
      const DecoderStepStart got =
          StartDecoderStep(table, tokens, self_bias, t, t_max);
      const std::string where = std::string(at::toString(dtype)) + ", " +
                                std::to_string(rows) + " position rows";
      EXPECT_TRUE(at::equal(
          cpu(got.hidden),
          cpu(at::embedding(table, tokens.view({-1, 1})).to(at::kFloat))))
          << where;
      ASSERT_EQ(got.bias.sizes(), (std::vector<int64_t>{rows, H, 1, C}));
      EXPECT_TRUE(at::equal(
          cpu(got.bias),
          cpu(self_bias.index_select(2, before).permute({2, 1, 0, 3}))))
          << where;
      EXPECT_TRUE(at::equal(cpu(got.t), cpu(before))) << where;
      EXPECT_TRUE(at::equal(cpu(t), cpu((before + 1).clamp_max(t_max))))
          << where;
    }
  }
}

}  // namespace
}  // namespace lorahub::model
