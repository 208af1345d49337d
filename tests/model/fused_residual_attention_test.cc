// The fused residual + RMS norm (fused_ops.h AddRmsNorm) against its
// definition RmsNorm(x + delta), the fused gated GELU against
// gelu(gate) * up, and short-query attention (GeneralAttention
// with at most kSmallQueryMax queries: the hand-written kernel on CUDA, the
// matmul fallback on CPU; encoder-length queries: the tiled kernels, or
// with LORAHUB_MMA_ATTENTION=2 (fused_residual_attention_mma_test) the
// tensor-core one; fused_residual_attention_test sets 0) against a double-precision reference, on the strided
// q/k/v views and broadcast biases the objective's encoder and decoder
// passes.
// Runs on $LORAHUB_TEST_DEVICE (tiny_t5.h; default cpu): on CUDA it checks
// the kernels of fused_kernels.h, on the CPU the fallbacks.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/model/fused_ops.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

c10::Device Device() {
  auto d = testing::TestDevice();
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *d : c10::Device(c10::kCPU);
}

at::TensorOptions F32() {
  return at::TensorOptions().dtype(at::kFloat).device(Device());
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

TEST(AddRmsNormTest, IsTheNormOfTheSum) {
  at::manual_seed(5);
  const bool cpu = Device().is_cpu();
  // Widths of up to 2048 values (on CUDA held in registers), 1024 (there
  // the kernel specialised for rows of exactly 4 values per thread), 1100
  // (not a multiple of the block), 3000 (the kernel's loop over the row).
  for (int64_t dim : {int64_t{40}, int64_t{1024}, int64_t{1100}, int64_t{3000}}) {
    for (at::ScalarType delta_dtype : {at::kFloat, at::kBFloat16}) {
      for (at::ScalarType compute : {at::kFloat, at::kBFloat16}) {
        SCOPED_TRACE(dim);
        const at::Tensor x = at::randn({3, 5, dim}, F32()) * 3.0;
        const at::Tensor delta =
            (at::randn({3, 5, dim}, F32()) * 2.0).to(delta_dtype);
        const at::Tensor weight = (at::rand({dim}, F32()) + 0.5).to(compute);
        const AddNormOutput got = AddRmsNorm(x, delta, weight, 1e-6, compute);
        const at::Tensor sum = x + delta;  // fp32 add of the widened delta
        const NormOutput want = RmsNorm(sum, weight, 1e-6, compute);
        ASSERT_EQ(got.sum.scalar_type(), at::kFloat);
        ASSERT_EQ(got.norm.full.scalar_type(), at::kFloat);
        ASSERT_EQ(got.norm.rounded.scalar_type(), compute);
        // The sum is one fp32 add either way: exact.
        EXPECT_TRUE(at::equal(got.sum, sum));
        // CPU: the same ATen ops; CUDA: the kernel's reduction order.
        const double tol = cpu ? 0.0 : 1e-6;
        EXPECT_LE(RelDiff(got.norm.full, want.full), tol);
        // One rounding of (nearly) the same fp32 value: at most one bf16 ulp.
        EXPECT_LE(RelDiff(got.norm.rounded.to(at::kFloat),
                          want.rounded.to(at::kFloat)),
                  cpu ? 0.0 : 1.0 / 128);
        // x and delta are left alone.
        EXPECT_FALSE(got.sum.is_same(x));
        // Without `full` (keep_full false): the same sum and rounded output;
        // `full` only where it is the rounded output (fp32 compute).
        const AddNormOutput rounded_only = AddRmsNorm(
            x, delta, weight, 1e-6, compute, /*keep_full=*/false);
        EXPECT_TRUE(at::equal(rounded_only.sum, got.sum));
        EXPECT_TRUE(at::equal(rounded_only.norm.rounded, got.norm.rounded));
        EXPECT_EQ(rounded_only.norm.full.defined(), compute == at::kFloat);
      }
    }
  }
}

// SplitKProject's partials as a delta: the norm adds their fp32 sum (in
// order) rounded to the compute dtype, exactly what AddRmsNorm of that
// rounded output gives (the CUDA kernel, or the fallback's SplitKSum).
TEST(AddRmsNormTest, AddsSplitKPartialsSummedThenRounded) {
  at::manual_seed(6);
  for (int64_t dim : {int64_t{40}, int64_t{1024}, int64_t{3000}}) {
    for (int64_t parts : {int64_t{2}, int64_t{4}}) {
      SCOPED_TRACE(dim * 10 + parts);
      const at::Tensor x = at::randn({3, 5, dim}, F32()) * 3.0;
      // Partials of mixed scales: their fp32 sum is not a bf16 value.
      const at::Tensor delta =
          at::randn({parts, 3, 5, dim}, F32()) *
          at::linspace(0.01, 4.0, parts, F32()).view({parts, 1, 1, 1});
      ASSERT_TRUE(IsSplitKOutput(delta, x));
      ASSERT_FALSE(IsSplitKOutput(delta[0], x));
      at::Tensor sum = delta[0].clone();
      for (int64_t p = 1; p < parts; ++p) sum = sum + delta[p];
      const at::Tensor rounded = sum.to(at::kBFloat16);
      EXPECT_TRUE(at::equal(SplitKSum(delta, at::kBFloat16), rounded));
      const at::Tensor weight = (at::rand({dim}, F32()) + 0.5).to(at::kBFloat16);
      const AddNormOutput got = AddRmsNorm(x, delta, weight, 1e-6, at::kBFloat16);
      const AddNormOutput want = AddRmsNorm(x, rounded, weight, 1e-6, at::kBFloat16);
      EXPECT_TRUE(at::equal(got.sum, x + rounded));
      EXPECT_TRUE(at::equal(got.sum, want.sum));
      EXPECT_TRUE(at::equal(got.norm.full, want.norm.full));
      EXPECT_TRUE(at::equal(got.norm.rounded, want.norm.rounded));
    }
  }
}

// SplitKProject on CUDA: four fp32 partial products whose rounded sum is
// x W^T within the GEMM's own rounding; elsewhere (CPU, more than 64 rows,
// K not a multiple of 32, fp32) it runs nothing.
TEST(SplitKProjectTest, PartialsSumToTheProduct) {
  at::manual_seed(8);
  const at::TensorOptions bf16 = F32().dtype(at::kBFloat16);
  const at::Tensor w = (at::randn({96, 2816}, F32()) * 0.05).to(at::kBFloat16);
  for (int64_t rows : {int64_t{1}, int64_t{15}, int64_t{64}}) {
    SCOPED_TRACE(rows);
    const at::Tensor x = at::randn({rows, 1, 2816}, bf16);
    const at::Tensor parts = SplitKProject(x, w);
    if (Device().is_cpu()) {
      EXPECT_FALSE(parts.defined());
      continue;
    }
    ASSERT_TRUE(parts.defined());
    ASSERT_EQ(parts.sizes(), (std::vector<int64_t>{4, rows, 1, 96}));
    ASSERT_TRUE(IsSplitKOutput(parts, x.narrow(-1, 0, 96)));
    const at::Tensor want = at::matmul(x.to(at::kDouble), w.to(at::kDouble).t());
    EXPECT_LE(RelDiff(parts.sum(0), want), 1e-5);
    EXPECT_LE(RelDiff(SplitKSum(parts, at::kBFloat16).to(at::kFloat), want),
              1.0 / 128);
  }
  EXPECT_FALSE(SplitKProject(at::randn({65, 2816}, bf16), w).defined());
  EXPECT_FALSE(SplitKProject(at::randn({8, 1000}, bf16),
                             w.narrow(1, 0, 1000).contiguous())
                   .defined());
  EXPECT_FALSE(SplitKProject(at::randn({8, 2816}, F32()), w.to(at::kFloat))
                   .defined());
}

// Each partial of SplitKProject is the product of its own K slice, for 1
// to 64 rows, 2 or 4 parts, strided rows and column counts that are not
// multiples of a GEMM tile: the parts are K's slices in order, and every
// row and column of every part is written. On the CPU nothing runs.
TEST(SplitKProjectTest, EachPartIsItsSlicesProduct) {
  at::manual_seed(11);
  const at::TensorOptions bf16 = F32().dtype(at::kBFloat16);
  constexpr int64_t kK = 1024;
  for (int64_t n : {int64_t{16}, int64_t{40}, int64_t{96}, int64_t{1024},
                    int64_t{3072}}) {
    const at::Tensor w = (at::randn({n, kK}, F32()) * 0.05).to(at::kBFloat16);
    for (int64_t rows : {int64_t{1}, int64_t{15}, int64_t{17}, int64_t{33},
                         int64_t{64}}) {
      for (int64_t parts : {int64_t{2}, int64_t{4}}) {
        SCOPED_TRACE(n * 1000 + rows * 10 + parts);
        // Rows 1088 elements apart: a view of a wider tensor.
        const at::Tensor x =
            at::randn({rows, kK + 64}, bf16).narrow(1, 32, kK);
        const at::Tensor got = SplitKProject(x, w, parts);
        if (Device().is_cpu()) {
          EXPECT_FALSE(got.defined());
          continue;
        }
        ASSERT_TRUE(got.defined());
        ASSERT_EQ(got.sizes(), (std::vector<int64_t>{parts, rows, n}));
        const int64_t span = kK / parts;
        for (int64_t p = 0; p < parts; ++p) {
          const at::Tensor want =
              at::matmul(x.narrow(1, p * span, span).to(at::kDouble),
                         w.narrow(1, p * span, span).to(at::kDouble).t());
          EXPECT_LE(RelDiff(got[p], want), 1e-5) << "part " << p;
        }
      }
    }
  }
}

// The gated FFN's gelu_tanh(wi_0 x) * (wi_1 x) on the two column halves of
// one fused output, fp32 and bf16: the definition's arithmetic (CPU: the
// same ops; CUDA: the kernel, within one rounding of the dtype).
TEST(GatedGeluTest, IsGeluTimesUp) {
  at::manual_seed(9);
  const bool cpu = Device().is_cpu();
  // 37: one element per thread; 48 and 2816 (flan-t5-large): 16-byte
  // vectors of the same arithmetic.
  for (int64_t d_ff : {int64_t{37}, int64_t{48}, int64_t{2816}}) {
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
      SCOPED_TRACE(d_ff);
      const at::Tensor y = (at::randn({3, 5, 2 * d_ff}, F32()) * 2.5).to(dtype);
      const at::Tensor gate = y.narrow(-1, 0, d_ff);
      const at::Tensor up = y.narrow(-1, d_ff, d_ff);
      const at::Tensor got = GatedGeluTanh(gate, up);
      const at::Tensor want = at::gelu(gate, "tanh") * up;
      ASSERT_EQ(got.scalar_type(), dtype);
      ASSERT_EQ(got.sizes(), want.sizes());
      const double tol = cpu ? 0.0 : (dtype == at::kFloat ? 1e-6 : 1.0 / 64);
      EXPECT_LE(RelDiff(got.to(at::kFloat), want.to(at::kFloat)), tol);
    }
  }
}

// TokenNll on CUDA: -log_softmax(float(logits))[label] in double, 0 at
// label -100, class 0 for other negative labels, NaN for a label past the
// vocabulary; vocabularies that take 16-byte loads (32,128: flan-t5's;
// 64) and one that does not (37). Not bf16, not 3-d, labels of another
// shape: declined. Elsewhere it declines (the callers' ATen ops run).
TEST(TokenNllTest, IsLogSoftmaxAtTheLabel) {
  at::manual_seed(12);
  const bool cuda = Device().is_cuda() && FusedKernelsEnabled();
  for (int64_t V : {int64_t{32128}, int64_t{64}, int64_t{37}}) {
    SCOPED_TRACE(V);
    const at::Tensor logits =
        (at::randn({3, 4, V}, F32()) * 4.0).to(at::kBFloat16);
    at::Tensor labels = at::randint(0, V, {3, 4}, at::kLong);
    labels[0][3] = -100;
    labels[1][0] = -7;
    labels[2][2] = V;
    labels = labels.to(Device());
    at::Tensor nll;
    ASSERT_EQ(TokenNll(logits, labels, &nll), cuda);
    if (!cuda) {
      EXPECT_FALSE(nll.defined());
      continue;
    }
    ASSERT_EQ(nll.scalar_type(), at::kFloat);
    ASSERT_EQ(nll.sizes(), labels.sizes());
    const at::Tensor logp =
        at::log_softmax(logits.to(at::kCPU).to(at::kDouble), -1);
    const at::Tensor lab = labels.to(at::kCPU);
    const at::Tensor got = nll.to(at::kCPU).to(at::kDouble);
    for (int64_t b = 0; b < 3; ++b) {
      for (int64_t t = 0; t < 4; ++t) {
        const int64_t l = lab[b][t].item<int64_t>();
        const double g = got[b][t].item<double>();
        if (l == -100) {
          EXPECT_EQ(g, 0.0);
        } else if (l >= V) {
          EXPECT_TRUE(std::isnan(g));
        } else {
          const double want = -logp[b][t][std::max<int64_t>(l, 0)].item<double>();
          EXPECT_NEAR(g, want, 1e-5 * std::max(1.0, std::fabs(want)))
              << b << ", " << t;
        }
      }
    }
    at::Tensor untouched;
    EXPECT_FALSE(TokenNll(logits.to(at::kFloat), labels, &untouched));
    EXPECT_FALSE(TokenNll(logits.view({12, V}), labels, &untouched));
    EXPECT_FALSE(TokenNll(logits, labels.narrow(1, 0, 3), &untouched));
    EXPECT_FALSE(untouched.defined());
  }
}

TEST(GreedyTokensTest, IsArgmaxWithTheFinishedRows) {
  at::manual_seed(13);
  const bool cuda = Device().is_cuda() && FusedKernelsEnabled();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  constexpr int64_t kPad = 0, kEos = 1;
  for (int64_t V : {int64_t{32128}, int64_t{64}, int64_t{37}}) {
    SCOPED_TRACE(V);
    const int64_t B = 9;
    at::Tensor logits = at::randn({B, V}, at::kFloat) * 4.0;
    // Ties: the first index wins. Rows 2 and 3: NaN above every number,
    // the first NaN. Row 4: every logit -inf (index 0). Row 5: a tie in
    // another thread's part of the row. Row 6: eos is the pick.
    logits[0][V - 1] = 100.f;
    logits[0][V / 2] = 100.f;
    logits[1][3] = 50.f;
    logits[1][V - 2] = 50.f;
    logits[2][V - 5] = nan;
    logits[2][V - 3] = 1000.f;
    logits[3][V - 1] = nan;
    logits[3][4] = nan;
    logits[4].fill_(-std::numeric_limits<float>::infinity());
    logits[5][7] = 70.f;
    logits[5][(7 + 4 * 513) % V] = 70.f;
    logits[6][kEos] = 90.f;
    // bf16 as the decode step's logits buffer holds them (the LM head's
    // dtype); its ties and NaNs are the fp32 ones (the values above are
    // exact in bf16).
    for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
      SCOPED_TRACE(dtype);
      const at::Tensor x = logits.to(Device()).to(dtype);
      const std::vector<bool> unfinished_rows = {true, false, true, true, true,
                                                 true, true, false, true};
      at::Tensor unfinished = at::empty({B}, at::kBool);
      for (int64_t r = 0; r < B; ++r) unfinished[r] = unfinished_rows[r];
      unfinished = unfinished.to(Device());
      const at::Tensor want_argmax = x.to(at::kFloat).argmax(-1).to(at::kCPU);
      const at::Tensor want_next =
          at::where(unfinished, want_argmax.to(Device()),
                    at::full({B}, kPad, x.options().dtype(at::kLong)))
              .to(at::kCPU);
      const at::Tensor want_unfinished =
          (unfinished & (want_next.to(Device()) != kEos)).to(at::kCPU);
      at::Tensor argmax;
      ASSERT_EQ(GreedyTokens(x, nullptr, kPad, kEos, &argmax), cuda);
      at::Tensor next;
      ASSERT_EQ(GreedyTokens(x, &unfinished, kPad, kEos, &next), cuda);
      if (!cuda) {
        EXPECT_FALSE(argmax.defined());
        EXPECT_FALSE(next.defined());
        continue;
      }
      EXPECT_TRUE(at::equal(argmax.to(at::kCPU), want_argmax))
          << argmax << want_argmax;
      EXPECT_TRUE(at::equal(next.to(at::kCPU), want_next)) << next << want_next;
      EXPECT_TRUE(at::equal(unfinished.to(at::kCPU), want_unfinished))
          << unfinished << want_unfinished;
      EXPECT_EQ(want_argmax[0].item<int64_t>(), V / 2);
      EXPECT_EQ(want_argmax[2].item<int64_t>(), V - 5);
      EXPECT_EQ(want_argmax[3].item<int64_t>(), 4);
      EXPECT_EQ(want_argmax[4].item<int64_t>(), 0);
      EXPECT_EQ(want_argmax[5].item<int64_t>(), 7);
      EXPECT_FALSE(want_unfinished[6].item<bool>());
      at::Tensor untouched;
      EXPECT_FALSE(GreedyTokens(x.to(at::kHalf), nullptr, 0, 0, &untouched));
      EXPECT_FALSE(GreedyTokens(x.t(), nullptr, 0, 0, &untouched));
      at::Tensor wrong_rows = unfinished.narrow(0, 0, B - 1);
      EXPECT_FALSE(GreedyTokens(x, &wrong_rows, 0, 0, &untouched));
      // A device buffer of the wrong shape: refused, nothing written.
      const GreedyInto short_into{
          at::zeros({B - 1}, x.options().dtype(at::kLong)), at::Tensor()};
      EXPECT_FALSE(
          GreedyTokens(x, nullptr, 0, 0, &untouched, short_into, nullptr));
      EXPECT_FALSE(untouched.defined());
      // Into a device buffer (returned as the tokens) and pinned host
      // memory the kernel writes itself: the same tokens in both.
      const GreedyInto into{
          at::full({B}, -1, x.options().dtype(at::kLong)),
          at::full({B}, -1, at::TensorOptions().dtype(at::kLong))
              .pin_memory()};
      bool host_written = false;
      at::Tensor direct;
      ASSERT_TRUE(
          GreedyTokens(x, nullptr, kPad, kEos, &direct, into, &host_written));
      EXPECT_TRUE(direct.is_same(into.device));
      // A blocking copy: the stream has passed the kernel afterwards.
      EXPECT_TRUE(at::equal(direct.to(at::kCPU), want_argmax));
      EXPECT_TRUE(host_written);  // pinned memory is mapped on CUDA hosts
      if (host_written) {
        EXPECT_TRUE(at::equal(into.host, want_argmax)) << into.host;
      }
    }
  }
}

// softmax(q k^T + bias) v in double, per (row, head, query), over all keys.
at::Tensor Reference(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& bias) {
  const at::Tensor qd = q.to(at::kCPU).to(at::kDouble);
  const at::Tensor kd = k.to(at::kCPU).to(at::kDouble);
  const at::Tensor vd = v.to(at::kCPU).to(at::kDouble);
  const at::Tensor bd = bias.to(at::kCPU).to(at::kDouble);
  const at::Tensor s = at::matmul(qd, kd.transpose(-1, -2)) + bd;
  return at::matmul(at::softmax(s, -1), vd);
}

// The teacher-forced decoder's self-attention: q, k, v strided views of one
// fused [B, T, 3 * H * d] projection, relative bias + causal mask [1, H, T, T].
TEST(ShortQueryAttentionTest, StridedSelfAttention) {
  at::manual_seed(7);
  const int64_t B = 5, T = 4, H = 3, d = 8, inner = H * d;
  const double min_value =
      static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
  const at::Tensor y = at::randn({B, T, 3 * inner}, F32()) * 1.5;
  auto heads = [&](int64_t part) {
    return y.narrow(-1, part * inner, inner)
        .view({B, T, H, d})
        .transpose(1, 2);
  };
  const at::Tensor q = heads(0), k = heads(1), v = heads(2);
  ASSERT_FALSE(q.is_contiguous());
  const at::Tensor pos = at::arange(T, at::TensorOptions().device(Device()));
  const at::Tensor causal =
      at::where(pos.unsqueeze(0) > pos.unsqueeze(1),
                at::scalar_tensor(min_value, F32()),
                at::scalar_tensor(0.0, F32()))
          .view({1, 1, T, T});
  const at::Tensor bias = at::randn({1, H, T, T}, F32()) * 2.0 + causal;
  const at::Tensor got = GeneralAttention(q, k, v, bias);
  EXPECT_LT(RelDiff(got, Reference(q, k, v, bias)), 1e-5);
  // The context rounded by the attention itself (what the output
  // projection reads): the same values as a conversion afterwards, laid out
  // heads last (the head merge is a view).
  const at::Tensor rounded = Attention(q, k, v, bias, at::kBFloat16);
  ASSERT_EQ(rounded.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(rounded, got.to(at::kBFloat16)));
  EXPECT_TRUE(rounded.transpose(1, 2).is_contiguous());
}

// Cross-attention: keys and values from a wide fused k|v output of several
// blocks, padded encoder rows masked by a [B, 1, 1, S] bias.
TEST(ShortQueryAttentionTest, StridedCrossAttentionWithPadding) {
  at::manual_seed(8);
  const int64_t B = 4, T = 3, S = 37, H = 2, d = 16, inner = H * d;
  const double min_value =
      static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
  const at::Tensor q =
      (at::randn({B, T, inner}, F32()) * 2.0).view({B, T, H, d}).transpose(1, 2);
  const at::Tensor kv = at::randn({B, S, 6 * inner}, F32()) * 1.5;
  const at::Tensor k =
      kv.narrow(-1, 2 * inner, inner).view({B, S, H, d}).transpose(1, 2);
  const at::Tensor v =
      kv.narrow(-1, 3 * inner, inner).view({B, S, H, d}).transpose(1, 2);
  at::Tensor mask = at::zeros({B, 1, 1, S}, F32());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = S - 5 * b;
    mask[b].narrow(-1, len, S - len).fill_(min_value);
  }
  const at::Tensor got = GeneralAttention(q, k, v, mask);
  EXPECT_LT(RelDiff(got, Reference(q, k, v, mask)), 1e-5);
  // The padded keys get no weight: changing their values changes nothing.
  const at::Tensor kv2 = kv.clone();
  kv2.narrow(1, S - 5, 5).fill_(100.0);
  const at::Tensor v2 =
      kv2.narrow(-1, 3 * inner, inner).view({B, S, H, d}).transpose(1, 2);
  const at::Tensor k2 =
      kv2.narrow(-1, 2 * inner, inner).view({B, S, H, d}).transpose(1, 2);
  const at::Tensor got2 = GeneralAttention(q, k2, v2, mask);
  EXPECT_LT(RelDiff(got2.narrow(0, 2, 2), got.narrow(0, 2, 2)), 1e-6);
}

// bf16 q, k, v (AttentionBf16) with an fp32 bias: fp32 scores and softmax
// on the widened operands, the context rounded once to bf16.
TEST(ShortQueryAttentionTest, Bf16QueriesKeysValues) {
  at::manual_seed(10);
  const int64_t B = 2, T = 3, S = 11, H = 2, d = 8;
  const at::Tensor q = (at::randn({B, H, T, d}, F32()) * 1.5).to(at::kBFloat16);
  const at::Tensor k = (at::randn({B, H, S, d}, F32()) * 1.5).to(at::kBFloat16);
  const at::Tensor v = at::randn({B, H, S, d}, F32()).to(at::kBFloat16);
  const at::Tensor bias = at::randn({1, H, T, S}, F32());
  const at::Tensor got = GeneralAttention(q, k, v, bias);
  ASSERT_EQ(got.scalar_type(), at::kBFloat16);
  // The reference on the same bf16 values: only the output's rounding.
  EXPECT_LT(RelDiff(got.to(at::kFloat), Reference(q, k, v, bias)), 1.0 / 128);
}

// The encoder's shape: as many queries as keys (T = S = 37, 60, 96, 128,
// 200: more than a short query, each a different number of keys per lane;
// an odd count leaves a warp half a query pair), q, k, v
// strided views of one fused projection, relative bias plus padding mask
// [B, H, T, S]: on CUDA the tiled kernel (keys and values in shared memory;
// LORAHUB_NO_TILED_ATTN=1: PyTorch's attention), also with keys and values
// of a non-unit element stride (its scalar staging). More keys than it takes
// (S = 300 > kTiledMaxKeys) stay on PyTorch's.
TEST(ShortQueryAttentionTest, EncoderLengthQueries) {
  at::manual_seed(9);
  const double min_value =
      static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
  for (int64_t S : {int64_t{37}, int64_t{60}, int64_t{96}, int64_t{128},
                    int64_t{200}, int64_t{300}}) {
    const int64_t B = 3, H = 2, d = 64, inner = H * d;
    const at::Tensor y = at::randn({B, S, 3 * inner}, F32()) * 0.5;
    auto heads = [&](int64_t part) {
      return y.narrow(-1, part * inner, inner)
          .view({B, S, H, d})
          .transpose(1, 2);
    };
    const at::Tensor q = heads(0), k = heads(1), v = heads(2);
    at::Tensor mask = at::zeros({B, 1, 1, S}, F32());
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = S - 17 * b;
      mask[b].narrow(-1, len, S - len).fill_(min_value);
    }
    const at::Tensor bias = at::randn({1, H, S, S}, F32()) * 2.0 + mask;
    const at::Tensor got = GeneralAttention(q, k, v, bias);
    EXPECT_LT(RelDiff(got, Reference(q, k, v, bias)), 1e-5) << "S " << S;
    // Rounded by the attention itself: the fp32 result rounded once.
    const at::Tensor rounded = Attention(q, k, v, bias, at::kBFloat16);
    ASSERT_EQ(rounded.scalar_type(), at::kBFloat16);
    EXPECT_TRUE(at::equal(rounded, got.to(at::kBFloat16))) << "S " << S;
    // Keys and values every other element of a wider tensor.
    const at::Tensor wide = at::randn({B, H, S, 2 * d}, F32());
    const at::Tensor ks = wide.slice(-1, 0, 2 * d, 2);
    const at::Tensor vs = wide.slice(-1, 1, 2 * d, 2) * 0.7;
    ASSERT_EQ(ks.stride(3), 2);
    EXPECT_LT(RelDiff(GeneralAttention(q, ks, vs, bias), Reference(q, ks, vs, bias)),
              1e-5)
        << "S " << S;
    // bf16 keys and values (the bf16 attention opt-in), fp32 bias.
    const at::Tensor qb = q.to(at::kBFloat16), kb = k.to(at::kBFloat16),
                     vb = v.to(at::kBFloat16);
    EXPECT_LT(RelDiff(GeneralAttention(qb, kb, vb, bias).to(at::kFloat),
                      Reference(qb, kb, vb, bias)),
              1.0 / 128)
        << "S " << S;
  }
}

// Many heads of the encoder's lengths, as an objective's population pass
// and a batch of prompts run them: on CUDA (LORAHUB_MMA_ATTENTION=0) the
// register-tiled kernel in blocks of 16 x 16 threads with 5 queries
// per thread (16 x 16 and 60 x 16
// heads of 72, the latter a population pass; 160 heads of 100 keys, 144 of
// 45, 136 of 128 and of 33) and of 8 x 16 threads with 3 (4 x 8 heads of
// 100 and 45: fewer heads than SMs), keys of 3 to 8 tiles of 16, bias per
// row [B, H, S, S] and shared [1, H, S, S], fp32 and bf16; bf16 keys and
// values. The bf16-output launch rounds the same fp32 context once.
TEST(ShortQueryAttentionTest, ManyHeadsOfEncoderLengths) {
  at::manual_seed(11);
  const double min_value =
      static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
  struct Shape {
    int64_t B, H, S;
    bool bias_per_row;
  };
  for (const Shape& s : {Shape{16, 16, 72, true}, Shape{60, 16, 72, false},
                         Shape{4, 8, 100, false}, Shape{4, 8, 45, true},
                         Shape{40, 4, 100, true}, Shape{36, 4, 45, false},
                         Shape{17, 8, 128, true}, Shape{34, 4, 33, false}}) {
    SCOPED_TRACE(::testing::Message() << s.B << " x " << s.H << " heads, S " << s.S);
    const int64_t d = 64, inner = s.H * d;
    const at::Tensor y = at::randn({s.B, s.S, 3 * inner}, F32()) * 0.5;
    auto heads = [&](int64_t part) {
      return y.narrow(-1, part * inner, inner).view({s.B, s.S, s.H, d}).transpose(1, 2);
    };
    const at::Tensor q = heads(0), k = heads(1), v = heads(2);
    at::Tensor mask = at::zeros({s.B, 1, 1, s.S}, F32());
    for (int64_t b = 0; b < s.B; ++b) {
      const int64_t len = s.S - (b * 7) % (s.S / 2);
      mask[b].narrow(-1, len, s.S - len).fill_(min_value);
    }
    const at::Tensor bias =
        at::randn({s.bias_per_row ? s.B : 1, s.H, s.S, s.S}, F32()) * 2.0 + mask;
    const at::Tensor got = GeneralAttention(q, k, v, bias);
    EXPECT_LT(RelDiff(got, Reference(q, k, v, bias)), 1e-5);
    EXPECT_TRUE(at::equal(Attention(q, k, v, bias, at::kBFloat16), got.to(at::kBFloat16)));
    // A bf16 bias over fp32 q, k, v, as a bf16 model's population pass has
    // it (read in pairs by the tensor-core kernel).
    const at::Tensor bias_b = bias.to(at::kBFloat16);
    EXPECT_LT(RelDiff(GeneralAttention(q, k, v, bias_b), Reference(q, k, v, bias_b)), 1e-5);
    const at::Tensor qb = q.to(at::kBFloat16), kb = k.to(at::kBFloat16),
                     vb = v.to(at::kBFloat16);
    EXPECT_LT(RelDiff(GeneralAttention(qb, kb, vb, bias).to(at::kFloat),
                      Reference(qb, kb, vb, bias)),
              1.0 / 128);
  }
}

// PackedAttention (rows laid end to end, no padding: EncodePacked) against
// each row alone in double: q, k, v strided views of one fused [1, N, 3 *
// H * d] projection, one position bias [1, H, L, L] for every row. On CUDA
// with 64-wide heads and a longest row of 33 to 128 tokens the
// register-tiled kernel (LORAHUB_MMA_ATTENTION=2: the tensor-core one)
// takes the packed rows in one launch (rows of 1 to 128 tokens, a row
// shorter than a query tile, 16 heads as flan-t5's); the
// other shapes (8-wide heads, a longest row of 20 or 200) and the CPU go
// row by row. Also with bf16 q, k, v and a bf16 output.
TEST(PackedAttentionTest, EachRowAttendsToItself) {
  at::manual_seed(12);
  struct Shape {
    int64_t H, d;
    std::vector<int64_t> lengths;
  };
  for (const Shape& sh :
       {Shape{16, 64, {40, 7, 72, 33, 1, 64}}, Shape{2, 64, {128, 3, 90}},
        Shape{4, 64, {33}}, Shape{2, 8, {40, 9}}, Shape{2, 64, {20, 5}},
        Shape{2, 64, {200, 11}}}) {
    const int64_t H = sh.H, d = sh.d, inner = H * d;
    const int64_t B = static_cast<int64_t>(sh.lengths.size());
    std::vector<int64_t> starts = {0};
    int64_t L = 0;
    for (int64_t len : sh.lengths) {
      starts.push_back(starts.back() + len);
      L = std::max(L, len);
    }
    const int64_t N = starts.back();
    const at::Tensor y = at::randn({1, N, 3 * inner}, F32()) * 0.5;
    const auto heads = [&](int64_t part) {
      return y.narrow(-1, part * inner, inner).view({1, N, H, d}).transpose(1, 2);
    };
    const at::Tensor q = heads(0), k = heads(1), v = heads(2);
    const at::Tensor bias = at::randn({1, H, L, L}, F32()) * 2.0;
    const at::Tensor dev_starts =
        at::tensor(std::vector<int32_t>(starts.begin(), starts.end()), at::kInt)
            .to(Device());
    const std::string where = "H " + std::to_string(H) + ", d " +
                              std::to_string(d) + ", longest " +
                              std::to_string(L);
    const at::Tensor got =
        PackedAttention(q, k, v, bias, dev_starts, starts, at::kFloat);
    ASSERT_EQ(got.sizes(), q.sizes()) << where;
    EXPECT_EQ(got.transpose(1, 2).is_contiguous(), true) << where;  // heads last
    const at::Tensor got_bf16 = PackedAttention(
        q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16), bias,
        dev_starts, starts, at::kBFloat16);
    ASSERT_EQ(got_bf16.scalar_type(), at::kBFloat16) << where;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t first = starts[b], len = starts[b + 1] - first;
      const auto row = [&](const at::Tensor& t) { return t.narrow(2, first, len); };
      const at::Tensor row_bias = bias.narrow(2, 0, len).narrow(3, 0, len);
      EXPECT_LT(RelDiff(row(got), Reference(row(q), row(k), row(v), row_bias)),
                1e-5)
          << where << ", row " << b;
      const at::Tensor qb = row(q).to(at::kBFloat16), kb = row(k).to(at::kBFloat16),
                       vb = row(v).to(at::kBFloat16);
      EXPECT_LT(RelDiff(row(got_bf16).to(at::kFloat),
                        Reference(qb, kb, vb, row_bias)),
                1.0 / 128)
          << where << ", bf16 row " << b;
    }
  }
}

// The cross-attention of a population pass's teacher-forced decoder: a few
// queries of many rows and heads (1,024 and more) over the encoder's keys,
// with padding.
TEST(ShortQueryAttentionTest, ManyHeadsOfShortQueries) {
  at::manual_seed(12);
  const double min_value =
      static_cast<double>(std::numeric_limits<c10::BFloat16>::lowest());
  struct Shape {
    int64_t B, H, T, S;
  };
  for (const Shape& s : {Shape{64, 16, 3, 72}, Shape{128, 8, 1, 45},
                         Shape{70, 16, 5, 128}}) {
    SCOPED_TRACE(::testing::Message() << s.B << " x " << s.H << " heads, T "
                                      << s.T << ", S " << s.S);
    const int64_t d = 64, inner = s.H * d;
    const at::Tensor q = at::randn({s.B, s.T, inner}, F32())
                             .view({s.B, s.T, s.H, d})
                             .transpose(1, 2);
    const at::Tensor kv = at::randn({s.B, s.S, 2 * inner}, F32()) * 0.5;
    const auto heads = [&](const at::Tensor& t, int64_t part) {
      return t.narrow(-1, part * inner, inner)
          .view({s.B, s.S, s.H, d})
          .transpose(1, 2);
    };
    at::Tensor mask = at::zeros({s.B, 1, 1, s.S}, F32());
    for (int64_t b = 0; b < s.B; ++b) {
      const int64_t len = s.S - (b * 5) % (s.S / 2);
      mask[b].narrow(-1, len, s.S - len).fill_(min_value);
    }
    const at::Tensor got = GeneralAttention(q, heads(kv, 0), heads(kv, 1), mask);
    EXPECT_LT(RelDiff(got, Reference(q, heads(kv, 0), heads(kv, 1), mask)),
              1e-5);
    // Padded keys get no weight: row 1 has its last 5 keys padded.
    const at::Tensor kv2 = kv.clone();
    kv2.narrow(1, s.S - 5, 5).fill_(100.0);
    const at::Tensor got2 =
        GeneralAttention(q, heads(kv2, 0), heads(kv2, 1), mask);
    EXPECT_LT(RelDiff(got2.narrow(0, 1, 1), got.narrow(0, 1, 1)), 1e-6);
  }
}

}  // namespace
}  // namespace lorahub::model
