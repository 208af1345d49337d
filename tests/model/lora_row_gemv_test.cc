// LoraRowDeltas (fused_ops.h: the per-row LoRA of single-token rows as a
// shrink kernel and one expand kernel per site, reading every row's factors
// from its slot of the bank) against the same deltas computed in double on
// the CPU. On CUDA ($LORAHUB_TEST_DEVICE=cuda, tiny_t5.h) the kernels must
// run and match; elsewhere (CPU, a build without them) LoraRowDeltas must
// decline and leave the output alone, so that the caller's GEMMs run.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

double RelDiff(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kCPU).to(at::kDouble);
  const at::Tensor w = want.to(at::kCPU).to(at::kDouble);
  EXPECT_EQ(g.sizes(), w.sizes());
  const double scale = std::max(1.0, w.abs().max().item<double>());
  return (g - w).abs().max().item<double>() / scale;
}

constexpr int64_t kSlots = 4, kRows = 7, kIn = 48, kRank = 8, kCols = 100;

// Two sites reading one input: their A factors side by side in one
// [S, 2r, in] tensor (as ObjectiveRunner and fused q|v banks lay them out),
// outputs at columns 10..49 and 60..83 of a fused output.
struct Case {
  at::Tensor x, a, y, slots, mask;
  std::vector<LoraRowSite> sites;
};

Case MakeCase(at::ScalarType factor_dtype, bool masked, int64_t in = kIn) {
  Case c;
  c.x = at::randn({kRows, in}, F32());
  c.a = (at::randn({kSlots, 2 * kRank, in}, F32()) * 0.3).to(factor_dtype);
  c.y = at::randn({kRows, kCols}, F32());
  c.slots = at::tensor(std::vector<int64_t>{2, 0, 3, 3, 1, 0, 2}, at::kLong)
                .to(Device());
  if (masked) {
    c.mask = at::tensor(std::vector<float>{1, 1, 0, 1, 1, 0, 1})
                 .view({kRows, 1, 1})
                 .to(Device());
  }
  LoraRowSite q;
  q.col = 10;
  q.rank_offset = 0;
  q.b = (at::randn({kSlots, 40, kRank}, F32()) * 0.3).to(factor_dtype);
  q.scale = at::tensor(std::vector<float>{0.5f, 2.0f, 1.0f, 0.25f})
                .view({kSlots, 1, 1})
                .to(Device());
  LoraRowSite v = q;
  v.col = 60;
  v.rank_offset = kRank;
  v.b = (at::randn({kSlots, 24, kRank}, F32()) * 0.3).to(factor_dtype);
  v.scale = at::full({kSlots, 1, 1}, 2.0, F32());
  c.sites = {q, v};
  return c;
}

// y + the deltas, in double on the CPU, row by row.
at::Tensor Want(const Case& c) {
  const auto cpu = [](const at::Tensor& t) {
    return t.to(at::kCPU).to(at::kDouble);
  };
  at::Tensor y = cpu(c.y);
  const at::Tensor x = cpu(c.x), a = cpu(c.a), slots = c.slots.to(at::kCPU);
  for (int64_t b = 0; b < kRows; ++b) {
    const int64_t s = slots[b].item<int64_t>();
    const double m = c.mask.defined() ? cpu(c.mask).view({-1})[b].item<double>()
                                      : 1.0;
    const at::Tensor xa = at::matmul(a[s], x[b]);  // [2r]
    for (const LoraRowSite& site : c.sites) {
      const int64_t r = site.b.size(2), out = site.b.size(1);
      const at::Tensor delta =
          at::matmul(cpu(site.b)[s], xa.narrow(0, site.rank_offset, r)) *
          (cpu(site.scale).view({-1})[s].item<double>() * m);
      y[b].narrow(0, site.col, out).add_(delta);
    }
  }
  return y;
}

TEST(LoraRowGemvTest, MatchesThePerRowDeltas) {
  at::manual_seed(21);
  const bool cuda = Device().is_cuda() && LoraRowGemvEnabled();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (bool masked : {false, true}) {
      const Case c = MakeCase(dtype, masked);
      const at::Tensor before = c.y.clone();
      const at::Tensor want = Want(c);
      const bool ran = LoraRowDeltas(c.y, c.x, c.a, c.sites, c.slots, c.mask);
      EXPECT_EQ(ran, cuda);
      if (!ran) {
        EXPECT_TRUE(at::equal(c.y, before)) << "declined but wrote y";
        continue;
      }
      // Products of bf16 factors are exact in fp32: only the summation
      // order differs from the double reference.
      const double diff = RelDiff(c.y, want);
      EXPECT_LE(diff, 2e-6) << "dtype " << dtype << " masked " << masked;
      // Columns outside the sites' slices are untouched.
      EXPECT_TRUE(at::equal(c.y.narrow(1, 0, 10), before.narrow(1, 0, 10)));
      EXPECT_TRUE(at::equal(c.y.narrow(1, 50, 10), before.narrow(1, 50, 10)));
      EXPECT_TRUE(at::equal(c.y.narrow(1, 84, 16), before.narrow(1, 84, 16)));
    }
  }
}

// Rows longer than the loads each lane issues before the staging barrier
// (8 16-byte words per lane: 1,024 fp32 or 2,048 bf16 factors), with the
// 16-byte words of fp32 and bf16 factors, and a length that leaves the
// bf16 factors to the scalar loop (not a whole number of words).
TEST(LoraRowGemvTest, LongRows) {
  at::manual_seed(24);
  const bool cuda = Device().is_cuda() && LoraRowGemvEnabled();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (int64_t in : {int64_t{4096}, int64_t{4100}}) {
      const Case c = MakeCase(dtype, /*masked=*/true, in);
      const at::Tensor want = Want(c);
      const bool ran = LoraRowDeltas(c.y, c.x, c.a, c.sites, c.slots, c.mask);
      EXPECT_EQ(ran, cuda);
      if (ran) {
        // fp32 sums of 4,096 products: their order only.
        EXPECT_LE(RelDiff(c.y, want), 1e-5) << dtype << " in " << in;
      }
    }
  }
}

// A strided output (a decode step's [B, 1, total] fused projection, one
// token per row, seen as [B, total]) and a single site.
TEST(LoraRowGemvTest, StridedOutputOneSite) {
  at::manual_seed(22);
  const bool cuda = Device().is_cuda() && LoraRowGemvEnabled();
  Case c = MakeCase(at::kFloat, false);
  c.sites.resize(1);
  c.a = c.a.narrow(1, 0, kRank);
  const at::Tensor wide = at::randn({kRows, 1, 2 * kCols}, F32());
  c.y = wide.select(1, 0).narrow(1, kCols, kCols);
  const at::Tensor want = Want(c);
  const at::Tensor before = wide.clone();
  ASSERT_EQ(LoraRowDeltas(c.y, c.x, c.a, c.sites, c.slots, c.mask), cuda);
  if (cuda) {
    EXPECT_LE(RelDiff(c.y, want), 2e-6);
    EXPECT_TRUE(at::equal(wide.narrow(2, 0, kCols), before.narrow(2, 0, kCols)));
  } else {
    EXPECT_TRUE(at::equal(wide, before));
  }
}

// More sites than one expand launch takes (four): five sites of rank 4 over
// one [S, 20, in] A, their outputs side by side in y.
TEST(LoraRowGemvTest, FiveSitesTwoExpandLaunches) {
  at::manual_seed(24);
  const bool cuda = Device().is_cuda() && LoraRowGemvEnabled();
  Case c = MakeCase(at::kFloat, true);
  constexpr int64_t kR = 4, kOut = 20;
  c.a = at::randn({kSlots, 5 * kR, kIn}, F32()) * 0.3;
  c.sites.clear();
  for (int64_t k = 0; k < 5; ++k) {
    LoraRowSite site;
    site.col = k * kOut;
    site.rank_offset = k * kR;
    site.b = at::randn({kSlots, kOut, kR}, F32()) * 0.3;
    site.scale = at::full({kSlots, 1, 1}, 0.5 + k, F32());
    c.sites.push_back(site);
  }
  const at::Tensor before = c.y.clone();
  const at::Tensor want = Want(c);
  ASSERT_EQ(LoraRowDeltas(c.y, c.x, c.a, c.sites, c.slots, c.mask), cuda);
  if (cuda) {
    EXPECT_LE(RelDiff(c.y, want), 2e-6);
  } else {
    EXPECT_TRUE(at::equal(c.y, before));
  }
}

// AddRmsNormShrink + LoraRowExpand (a decode step's norm with the shrink
// in the same kernel) against AddRmsNorm + LoraRowDeltas (and LoraRowShrink
// of the norm's output): every output bit
// for bit the same, for fp32 and bf16 models and factors, a width that
// fills the norm's registers (2048), one that leaves lanes idle (48) and
// flan-t5-large's 1024 (on CUDA the specialised kernels of both norms,
// also with a delta of 2 split-K partials), masked rows. On the CPU both
// decline and write nothing.
TEST(LoraRowGemvTest, NormWithShrinkEqualsNormThenShrink) {
  at::manual_seed(25);
  const bool cuda = Device().is_cuda() && LoraRowGemvEnabled();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    // Negative: flan-t5-large's width with the delta as split-K partials
    // (-2: 2 of them, -4: 4, the decode steps' output projections).
    for (int64_t in : {kIn, int64_t{2048}, int64_t{1024}, int64_t{-2},
                       int64_t{-4}}) {
      const int64_t parts = in < 0 ? -in : 1;
      in = in < 0 ? 1024 : in;
      if (parts > 1 && dtype == at::kFloat) continue;  // a bf16 model's
      SCOPED_TRACE(parts);
      Case c = MakeCase(dtype, /*masked=*/true, in);
      const at::Tensor x = c.x.view({kRows, 1, in});
      const at::Tensor delta =
          parts > 1 ? at::randn({parts, kRows, 1, in}, F32()) *
                          at::linspace(0.5, 3.0, parts, F32())
                              .view({parts, 1, 1, 1})
                    : at::randn({kRows, 1, in}, F32()).to(dtype);
      if (parts > 1) ASSERT_TRUE(IsSplitKOutput(delta, x));
      const at::Tensor weight = (at::rand({in}, F32()) + 0.5).to(dtype);
      const at::Tensor y0 = c.y.clone();
      const AddNormOutput want = AddRmsNorm(x, delta, weight, 1e-6, dtype);
      at::Tensor want_y = y0.clone();
      const bool ran_rows = LoraRowDeltas(want_y, want.norm.full.view({kRows, in}),
                                          c.a, c.sites, c.slots, c.mask);
      EXPECT_EQ(ran_rows, cuda);
      AddNormOutput got;
      at::Tensor xa;
      const bool ran = AddRmsNormShrink(x, delta, weight, 1e-6, dtype, c.a,
                                        c.slots, &got, &xa);
      EXPECT_EQ(ran, cuda) << dtype << " in " << in;
      if (!ran) {
        EXPECT_FALSE(got.sum.defined());
        EXPECT_FALSE(xa.defined());
        at::Tensor y = y0.clone();
        EXPECT_FALSE(LoraRowExpand(y, at::zeros({kRows, 2 * kRank}, F32()),
                                   c.sites, c.slots, c.mask));
        EXPECT_TRUE(at::equal(y, y0));
        continue;
      }
      EXPECT_TRUE(at::equal(got.sum, want.sum));
      EXPECT_TRUE(at::equal(got.norm.full, want.norm.full));
      EXPECT_TRUE(at::equal(got.norm.rounded, want.norm.rounded));
      EXPECT_EQ(got.norm.rounded.scalar_type(), dtype);
      ASSERT_EQ(xa.sizes(), (std::vector<int64_t>{kRows, 2 * kRank}));
      EXPECT_TRUE(at::equal(
          xa, LoraRowShrink(want.norm.full.view({kRows, in}), c.a, c.slots)));
      at::Tensor y = y0.clone();
      ASSERT_TRUE(LoraRowExpand(y, xa, c.sites, c.slots, c.mask));
      EXPECT_TRUE(at::equal(y, want_y)) << dtype << " in " << in;
    }
  }
}

// Without a delta (the first decoder block's norm): RmsNorm + LoraRowShrink
// of its output, bit for bit, and no sum; for fp32 and bf16 models and
// widths 48, 1024 and 2048. On the CPU it declines.
TEST(LoraRowGemvTest, NormWithShrinkWithoutDeltaEqualsRmsNormThenShrink) {
  at::manual_seed(27);
  const bool cuda = Device().is_cuda() && LoraRowGemvEnabled();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (int64_t in : {kIn, int64_t{1024}, int64_t{2048}}) {
      Case c = MakeCase(dtype, /*masked=*/true, in);
      const at::Tensor x = c.x.view({kRows, 1, in});
      const at::Tensor weight = (at::rand({in}, F32()) + 0.5).to(dtype);
      AddNormOutput got;
      at::Tensor xa;
      const bool ran = AddRmsNormShrink(x, at::Tensor(), weight, 1e-6, dtype,
                                        c.a, c.slots, &got, &xa);
      EXPECT_EQ(ran, cuda) << dtype << " in " << in;
      if (!ran) continue;
      const NormOutput want = RmsNorm(x, weight, 1e-6, dtype);
      EXPECT_FALSE(got.sum.defined());
      EXPECT_TRUE(at::equal(got.norm.full, want.full)) << dtype << " in " << in;
      EXPECT_TRUE(at::equal(got.norm.rounded, want.rounded));
      EXPECT_TRUE(at::equal(
          xa, LoraRowShrink(want.full.view({kRows, in}), c.a, c.slots)));
    }
  }
}

// The decode steps' shape (bf16, 1,024 wide, a delta of 4 split-K partials)
// with 8 to 64 ranks: the specialised kernel's ranks per warp
// (ShrinkRanksPerWarp: 2 where the ranks fill the warps, one block per row
// for 16, two for 32, ...; 1 for 8 and 24; LORAHUB_SHRINK_RPW=1|4 for the
// others) give xa bit for bit LoraRowShrink's of the norm. On the CPU it
// declines.
TEST(LoraRowGemvTest, NormWithShrinkOfManyRanksEqualsNormThenShrink) {
  at::manual_seed(28);
  const bool cuda = Device().is_cuda() && LoraRowGemvEnabled();
  constexpr int64_t in = 1024, parts = 4;
  const at::Tensor x = at::randn({kRows, 1, in}, F32());
  const at::Tensor delta = at::randn({parts, kRows, 1, in}, F32());
  const at::Tensor weight = (at::rand({in}, F32()) + 0.5).to(at::kBFloat16);
  const at::Tensor slots =
      at::tensor(std::vector<int64_t>{2, 0, 3, 3, 1, 0, 2}, at::kLong).to(Device());
  const AddNormOutput want = AddRmsNorm(x, delta, weight, 1e-6, at::kBFloat16);
  for (int64_t ranks : {8, 16, 24, 32, 64}) {
    const at::Tensor a =
        (at::randn({kSlots, ranks, in}, F32()) * 0.3).to(at::kBFloat16);
    AddNormOutput got;
    at::Tensor xa;
    const bool ran = AddRmsNormShrink(x, delta, weight, 1e-6, at::kBFloat16, a,
                                      slots, &got, &xa);
    EXPECT_EQ(ran, cuda) << ranks;
    if (!ran) continue;
    EXPECT_TRUE(at::equal(got.sum, want.sum)) << ranks;
    EXPECT_TRUE(at::equal(got.norm.full, want.norm.full)) << ranks;
    ASSERT_EQ(xa.sizes(), (std::vector<int64_t>{kRows, ranks}));
    EXPECT_TRUE(at::equal(
        xa, LoraRowShrink(want.norm.full.view({kRows, in}), a, slots)))
        << ranks;
  }
}

// The fused norm declines what its kernel does not take (rows wider than
// 2048, factors of another width, a row count the slots do not match).
TEST(LoraRowGemvTest, NormWithShrinkDeclinesBadShapes) {
  at::manual_seed(26);
  const auto f32 = F32();
  const at::Tensor slots = at::zeros({kRows}, at::kLong).to(Device());
  const auto run = [&](int64_t in, int64_t a_in, const at::Tensor& s) {
    const at::Tensor x = at::randn({kRows, 1, in}, f32);
    AddNormOutput out;
    at::Tensor xa;
    const bool ran = AddRmsNormShrink(
        x, at::randn({kRows, 1, in}, f32), at::ones({in}, f32), 1e-6,
        at::kFloat, at::randn({2, 8, a_in}, f32), s, &out, &xa);
    EXPECT_EQ(ran, out.sum.defined());
    return ran;
  };
  EXPECT_FALSE(run(4096, 4096, slots));
  EXPECT_FALSE(run(64, 32, slots));
  EXPECT_FALSE(run(64, 64, slots.narrow(0, 0, kRows - 1)));
  EXPECT_EQ(run(64, 64, slots), Device().is_cuda() && LoraRowGemvEnabled());
}

// What it does not take, it declines without writing anything.
// The decode steps' norm+shrink over int8 factors (lora.h SiteBank::a_int8):
// the sums of the same factors as fp32 (exact), to fp32 rounding (16 values
// a word against 4), and the norm's outputs bit for bit; for a delta of 2
// split-K partials (the decode steps') and a bf16 one, 32 and 16 ranks. On
// the CPU it declines.
TEST(LoraRowGemvTest, NormWithShrinkOfInt8FactorsEqualsTheirFloats) {
  at::manual_seed(41);
  const bool cuda = Device().is_cuda() && LoraRowGemvEnabled();
  constexpr int64_t in = 1024;
  const at::Tensor slots =
      at::tensor(std::vector<int64_t>{3, 0, 2, 1, 3, 0, 2}, at::kLong).to(Device());
  const at::Tensor x = at::randn({kRows, 1, in}, F32());
  const at::Tensor weight = (at::rand({in}, F32()) + 0.5).to(at::kBFloat16);
  for (const int64_t ranks : {int64_t{32}, int64_t{16}}) {
    for (const int64_t parts : {int64_t{2}, int64_t{1}}) {
      SCOPED_TRACE(parts);
      const at::Tensor delta = parts > 1 ? at::randn({parts, kRows, 1, in}, F32())
                                         : at::randn({kRows, 1, in}, F32()).to(at::kBFloat16);
      const at::Tensor a8 =
          at::randint(-127, 128, {kSlots, ranks, in}, F32()).to(at::kChar);
      AddNormOutput got, want;
      at::Tensor xa, want_xa;
      const bool ran = AddRmsNormShrink(x, delta, weight, 1e-6, at::kBFloat16, a8, slots,
                                        &got, &xa);
      EXPECT_EQ(ran, cuda) << ranks;
      if (!ran) continue;
      ASSERT_TRUE(AddRmsNormShrink(x, delta, weight, 1e-6, at::kBFloat16,
                                   a8.to(at::kFloat), slots, &want, &want_xa));
      EXPECT_TRUE(at::equal(got.sum, want.sum));
      EXPECT_TRUE(at::equal(got.norm.full, want.norm.full));
      EXPECT_TRUE(at::equal(got.norm.rounded, want.norm.rounded));
      ASSERT_EQ(xa.sizes(), (std::vector<int64_t>{kRows, ranks}));
      const double scale = want_xa.abs().max().item<double>();
      EXPECT_LE((xa - want_xa).abs().max().item<double>(), 1e-6 * scale) << ranks;
      EXPECT_TRUE(at::equal(xa, LoraRowShrink(want.norm.full.view({kRows, in}), a8, slots)))
          << ranks;
    }
  }
}

// QuantizeFactorsInt8 (fused_ops.h) against its definition in double on the
// CPU: each block scaled by its largest |v| / 127, rounded half to even,
// the scale out lora_scale * s_a * s_b; a block of zeros stays zeros with
// scale 0. On CUDA the kernel (its 16-byte loads; the fourth job's factors
// and outputs start off that alignment and are no multiple of 4 long: its
// scalar loads), else the ATen ops.
TEST(QuantizeFactorsInt8Test, MatchesItsDefinition) {
  at::manual_seed(43);
  const at::Tensor a_all = at::randn({3, 16, 1024}, F32()) * 0.02;
  at::Tensor b_all = at::randn({3, 1024, 16}, F32()) * 0.005;
  b_all[2].zero_();  // slot 2: no adapter at this site
  const at::Tensor odd = at::randn({2, 1031}, F32()) * 0.01;
  const at::Tensor lora_scale = at::tensor(std::vector<float>{2.f, 0.5f, 1.f, 3.f}).to(Device());
  const at::Tensor q_all = at::full({2, 3 * 16 * 1024 + 1031}, 99, F32()).to(at::kChar);
  std::vector<at::Tensor> a, b, a_q, b_q;
  for (int64_t s = 0; s < 3; ++s) {
    a.push_back(a_all[s]);
    b.push_back(b_all[s]);
    a_q.push_back(q_all[0].narrow(0, s * 16 * 1024, 16 * 1024).view({16, 1024}));
    b_q.push_back(q_all[1].narrow(0, s * 16 * 1024, 16 * 1024).view({1024, 16}));
  }
  a.push_back(odd[0].narrow(0, 1, 1027));  // 4 bytes past 16-byte alignment
  b.push_back(odd[1].narrow(0, 3, 1025));
  a_q.push_back(q_all[0].narrow(0, 3 * 16 * 1024 + 1, 1027));
  b_q.push_back(q_all[1].narrow(0, 3 * 16 * 1024 + 3, 1025));
  const at::Tensor scale_out = at::full({4}, -1.f, F32());
  std::vector<Int8Quantization> jobs;
  for (int64_t s = 0; s < 4; ++s) {
    jobs.push_back({a[s], b[s], a_q[s], b_q[s], lora_scale.narrow(0, s, 1),
                    scale_out.narrow(0, s, 1)});
  }
  QuantizeFactorsInt8(jobs);
  const auto cpu = [](const at::Tensor& t) { return t.to(at::kCPU).to(at::kDouble); };
  for (int64_t s = 0; s < 4; ++s) {
    SCOPED_TRACE(s);
    double block_scale = lora_scale[s].item<double>();
    for (const auto& [v, q] : {std::pair{cpu(a[s]), cpu(a_q[s])}, std::pair{cpu(b[s]), cpu(b_q[s])}}) {
      const double absmax = v.abs().max().item<double>();
      const double step = static_cast<float>(absmax) / 127.f;
      block_scale *= step;
      const at::Tensor want = step > 0 ? (v / step).round() : at::zeros_like(v);
      // fp32 division against double: a value within 2^-20 of a half step
      // may round the other way.
      EXPECT_LE((q - want).abs().max().item<double>(), 1.0);
      EXPECT_LE((q - want).abs().sum().item<double>(), 4.0);
      EXPECT_LE(q.abs().max().item<double>(), 127.0);
      if (step > 0) EXPECT_EQ(q.abs().max().item<double>(), 127.0);
    }
    EXPECT_NEAR(scale_out[s].item<double>(), block_scale, 1e-6 * std::abs(block_scale) + 1e-30);
  }
  EXPECT_EQ(cpu(b_q[2]).abs().max().item<double>(), 0.0);
  EXPECT_EQ(scale_out[2].item<double>(), 0.0);
  // Nothing written outside the outputs: the bytes between the jobs' and
  // past the last.
  const at::Tensor rest = q_all.to(at::kCPU);
  EXPECT_EQ(rest[0][3 * 16 * 1024].item<int>(), 99);
  EXPECT_EQ(rest[1][3 * 16 * 1024 + 2].item<int>(), 99);
  EXPECT_EQ(rest[0][3 * 16 * 1024 + 1028].item<int>(), 99);
  EXPECT_EQ(rest[1][3 * 16 * 1024 + 1028].item<int>(), 99);
}

TEST(LoraRowGemvTest, DeclinesBadShapes) {
  at::manual_seed(23);
  Case c = MakeCase(at::kFloat, true);
  const at::Tensor before = c.y.clone();
  std::vector<LoraRowSite> past_end = c.sites;
  past_end[1].col = kCols - 10;  // 24 columns do not fit
  EXPECT_FALSE(LoraRowDeltas(c.y, c.x, c.a, past_end, c.slots, c.mask));
  std::vector<LoraRowSite> past_ranks = c.sites;
  past_ranks[1].rank_offset = kRank + 1;
  EXPECT_FALSE(LoraRowDeltas(c.y, c.x, c.a, past_ranks, c.slots, c.mask));
  EXPECT_FALSE(LoraRowDeltas(c.y.to(at::kBFloat16), c.x, c.a, c.sites,
                             c.slots, c.mask));
  EXPECT_FALSE(LoraRowDeltas(c.y, c.x.narrow(1, 0, kIn - 1), c.a, c.sites,
                             c.slots, c.mask));
  EXPECT_FALSE(LoraRowDeltas(c.y, c.x, c.a, c.sites, c.slots.narrow(0, 0, 3),
                             c.mask));
  EXPECT_FALSE(LoraRowDeltas(c.y, c.x, c.a, {}, c.slots, c.mask));
  EXPECT_TRUE(at::equal(c.y, before));
}

// NarrowGemm (the LoRA down-projections of a bf16 model: x A^T with few
// columns) against the product in double: batches, rows and columns that
// are not multiples of the kernel's tiles, strided views (a slot of a bank,
// every other row of x), K not a multiple of the warps' slices. On CUDA it
// must run; elsewhere decline and leave *out alone.
TEST(NarrowGemmTest, MatchesDoubleProduct) {
  at::manual_seed(29);
  const bool cuda = Device().is_cuda() && NarrowGemmEnabled();
  struct Shape {
    int64_t g, m, n, k;
  };
  for (const Shape& s : {Shape{1, 15, 32, 1024}, Shape{1, 361, 16, 512},
                         Shape{3, 7, 70, 36}, Shape{2, 1, 384, 4},
                         Shape{1, 5, 33, 2816}}) {
    SCOPED_TRACE(::testing::Message() << s.g << "x" << s.m << "x" << s.n
                                      << "x" << s.k);
    const at::Tensor x_wide = at::randn({s.g, 2 * s.m, s.k}, F32());
    const at::Tensor x = x_wide.slice(1, 0, 2 * s.m, 2);  // row stride 2k
    const at::Tensor bank = at::randn({s.g + 1, s.n, s.k}, F32());
    const at::Tensor w = bank.narrow(0, 1, s.g);
    at::Tensor out;
    ASSERT_EQ(NarrowGemm(x, w, &out), cuda);
    if (!cuda) {
      EXPECT_FALSE(out.defined());
      continue;
    }
    const at::Tensor want = at::bmm(x.to(at::kCPU).to(at::kDouble),
                                    w.to(at::kCPU).to(at::kDouble).transpose(1, 2));
    EXPECT_TRUE(out.is_contiguous());
    EXPECT_LE(RelDiff(out, want), 2e-6 * std::sqrt(static_cast<double>(s.k)));
    // Deterministic: the same bits again.
    at::Tensor again;
    ASSERT_TRUE(NarrowGemm(x, w, &again));
    EXPECT_TRUE(at::equal(out, again));
  }
}

TEST(NarrowGemmTest, DeclinesWhatItDoesNotTake) {
  at::manual_seed(31);
  const at::Tensor x = at::randn({1, 8, 64}, F32());
  const at::Tensor w = at::randn({1, 16, 64}, F32());
  at::Tensor out;
  EXPECT_FALSE(NarrowGemm(x.narrow(2, 0, 62), w.narrow(2, 0, 62), &out));  // K % 4
  EXPECT_FALSE(NarrowGemm(x.narrow(2, 1, 60), w.narrow(2, 0, 60), &out));  // alignment
  EXPECT_FALSE(NarrowGemm(x.to(at::kBFloat16), w.to(at::kBFloat16), &out));
  EXPECT_FALSE(NarrowGemm(x, w.narrow(2, 0, 60), &out));  // K differs
  EXPECT_FALSE(NarrowGemm(x[0], w[0], &out));             // not batched
  EXPECT_FALSE(out.defined());
}

// LoraRunDeltas (runs of rows per adapter slot: a CMA-ES population, a
// per-row prefill) against the same deltas in double on the CPU:
// y[s, :, col_k + o] += scale * (x[s] a[s]^T)[:, k r + c] b_k[s, o, c].
struct RunCase {
  at::Tensor wide, y, x, a, xa;  // y: a column slice of `wide`
  std::vector<LoraRunSite> sites;
  double scale = 0.75;
};

// `sites` sites of rank r reading one input of width `in` (A side by side
// in one [S, sites * r, in]), outputs of 40 columns at 10 + 50 k of y.
RunCase MakeRunCase(int64_t slots, int64_t tokens, int64_t in, int sites,
                    int64_t r) {
  RunCase c;
  c.wide = at::randn({slots, tokens, 8 + 50 * sites}, F32());
  c.y = c.wide.narrow(2, 8, 50 * sites);
  c.x = at::randn({slots, tokens, in}, F32());
  c.a = at::randn({slots, sites * r, in}, F32()) * 0.1;
  for (int k = 0; k < sites; ++k) {
    c.sites.push_back({at::randn({slots, 40, r}, F32()) * 0.3, 10 + 50 * k});
  }
  return c;
}

at::Tensor RunWant(const RunCase& c, const at::Tensor& xa_in) {
  const auto cpu = [](const at::Tensor& t) {
    return t.to(at::kCPU).to(at::kDouble);
  };
  at::Tensor y = cpu(c.y);
  const at::Tensor xa =
      xa_in.defined() ? cpu(xa_in) : at::matmul(cpu(c.x), cpu(c.a).transpose(1, 2));
  const int64_t r = c.sites[0].b.size(2);
  for (size_t k = 0; k < c.sites.size(); ++k) {
    const at::Tensor& b = c.sites[k].b;
    y.narrow(2, c.sites[k].col, b.size(1))
        .add_(at::matmul(xa.narrow(2, static_cast<int64_t>(k) * r, r),
                         cpu(b).transpose(1, 2)) *
              c.scale);
  }
  return y;
}

// Shrink and expands: two sites of rank 16 (R = 32, a warp's 4 ranks), one
// of 16 and one of 8 (2 and 1 ranks per warp), four of 8, one of 32 (the
// expand's wider variant); flan-t5's width (8 rounds of K per lane) and
// narrow ones (lanes idle); token counts with and without partial tiles
// (the expand's 32-token tiles: 75 is two whole ones and 11 tokens).
// On CUDA, runs of 32 tokens or more with K a multiple of 32, 16 or 32
// ranks and at least two 64-token tiles per SM take the tensor-core
// shrink (3xTF32): the 270-slot shapes on an H200 (33 and 40 tokens: a
// partial tile, its last warps idle; K = 64 in 64-wide chunks, K = 96 in
// 32-wide ones); the others the FMA one.
TEST(LoraRunDeltasTest, ShrinkAndExpandsMatch) {
  at::manual_seed(31);
  const bool cuda = Device().is_cuda() && FusedKernelsEnabled();
  struct Shape {
    int64_t slots, tokens, in;
    int sites;
    int64_t r;
  };
  for (const Shape& sh : {Shape{3, 37, 1024, 2, 16}, Shape{2, 32, 36, 1, 16},
                          Shape{4, 5, 1024, 1, 8}, Shape{2, 17, 128, 4, 8},
                          Shape{2, 9, 64, 1, 32}, Shape{2, 75, 64, 2, 16},
                          Shape{270, 40, 64, 2, 16},
                          Shape{270, 33, 96, 1, 16}}) {
    RunCase c = MakeRunCase(sh.slots, sh.tokens, sh.in, sh.sites, sh.r);
    const at::Tensor before = c.wide.clone();
    const at::Tensor want = RunWant(c, at::Tensor());
    const bool ran = LoraRunDeltas(c.y, c.x, c.a, at::Tensor(), c.sites, c.scale);
    EXPECT_EQ(ran, cuda) << sh.tokens << " tokens, in " << sh.in;
    if (!ran) {
      EXPECT_TRUE(at::equal(c.wide, before)) << "declined but wrote y";
      continue;
    }
    // fp32 sums of up to 1,024 products against double: their order only.
    EXPECT_LE(RelDiff(c.y, want), 1e-5) << sh.tokens << " tokens, in " << sh.in;
    // Columns outside the sites' outputs are untouched: each site's 10
    // before it (the first 8 of `wide` are outside y).
    for (int k = 0; k < sh.sites; ++k) {
      EXPECT_TRUE(at::equal(c.wide.narrow(2, 8 + 50 * k, 10),
                            before.narrow(2, 8 + 50 * k, 10)))
          << "site " << k;
    }
  }
}

// The expand alone from a given xa: one site's column slice of a wider
// [slots, M, 48] down-projection (the cross-attention values of every
// decoder block share one).
TEST(LoraRunDeltasTest, ExpandFromSlicedXa) {
  at::manual_seed(32);
  const bool cuda = Device().is_cuda() && FusedKernelsEnabled();
  RunCase c = MakeRunCase(3, 21, 64, 1, 16);
  const at::Tensor xa_all = at::randn({3, 21, 48}, F32());
  const at::Tensor xa = xa_all.narrow(2, 16, 16);
  const at::Tensor before = c.wide.clone();
  const at::Tensor want = RunWant(c, xa);
  ASSERT_EQ(LoraRunDeltas(c.y, at::Tensor(), at::Tensor(), xa, c.sites, c.scale),
            cuda);
  if (cuda) {
    EXPECT_LE(RelDiff(c.y, want), 2e-6);
  } else {
    EXPECT_TRUE(at::equal(c.wide, before));
  }
}

// LoraPackedRunDeltas: runs of different lengths laid end to end (a packed
// prefill's prompts, one slot each), y a column slice of a wider [1, N,
// columns] output; each run's tokens get their slot's deltas, as
// RunWant computes them for that run alone. Runs of 1 to 75 tokens (partial
// and whole tiles of the shrink's 8 and the expand's 32 tokens), two sites
// of rank 16 at flan-t5's width, one of rank 32. On CUDA the kernels run;
// elsewhere the call declines and writes nothing. Bad starts decline.
TEST(LoraRunDeltasTest, PackedRunsMatch) {
  at::manual_seed(34);
  const bool cuda = Device().is_cuda() && FusedKernelsEnabled();
  struct Shape {
    std::vector<int64_t> lengths;
    int64_t in;
    int sites;
    int64_t r;
  };
  // 270 runs of 1 to 80 tokens: the tensor-core shrink on an H200.
  std::vector<int64_t> many;
  for (int64_t i = 0; i < 270; ++i) many.push_back(i * 37 % 80 + 1);
  for (const Shape& sh : {Shape{{37, 5, 75, 1, 32}, 1024, 2, 16},
                          Shape{{9, 40}, 64, 1, 32}, Shape{many, 64, 2, 16}}) {
    const int64_t slots = static_cast<int64_t>(sh.lengths.size());
    std::vector<int32_t> starts = {0};
    int64_t longest = 0;
    for (int64_t len : sh.lengths) {
      starts.push_back(starts.back() + static_cast<int32_t>(len));
      longest = std::max(longest, len);
    }
    const int64_t N = starts.back();
    // One slot's case per run, then the runs laid end to end.
    RunCase c = MakeRunCase(slots, 1, sh.in, sh.sites, sh.r);
    const at::Tensor wide = at::randn({1, N, 8 + 50 * sh.sites}, F32());
    const at::Tensor y = wide.narrow(2, 8, 50 * sh.sites);
    const at::Tensor x = at::randn({1, N, sh.in}, F32());
    const at::Tensor dev_starts = at::tensor(starts, at::kInt).to(Device());
    const at::Tensor before = wide.clone();
    std::vector<at::Tensor> want;
    for (int64_t s = 0; s < slots; ++s) {
      RunCase one;
      one.y = y.narrow(1, starts[s], sh.lengths[s]);
      one.x = x.narrow(1, starts[s], sh.lengths[s]);
      one.a = c.a.narrow(0, s, 1);
      for (const LoraRunSite& site : c.sites) {
        one.sites.push_back({site.b.narrow(0, s, 1), site.col});
      }
      one.scale = c.scale;
      want.push_back(RunWant(one, at::Tensor()));
    }
    const bool ran = LoraPackedRunDeltas(y, x, c.a, c.sites, c.scale,
                                         dev_starts, longest);
    EXPECT_EQ(ran, cuda) << "in " << sh.in;
    if (!ran) {
      EXPECT_TRUE(at::equal(wide, before)) << "declined but wrote y";
      continue;
    }
    for (int64_t s = 0; s < slots; ++s) {
      EXPECT_LE(RelDiff(y.narrow(1, starts[s], sh.lengths[s]), want[s]), 1e-5)
          << "run " << s << " of in " << sh.in;
    }
    for (int k = 0; k < sh.sites; ++k) {  // outside the sites' columns
      EXPECT_TRUE(at::equal(wide.narrow(2, 8 + 50 * k, 10),
                            before.narrow(2, 8 + 50 * k, 10)))
          << "site " << k;
    }
    // Starts that are not int32 [slots + 1], or a longest run of 0.
    const at::Tensor kept = wide.clone();
    EXPECT_FALSE(LoraPackedRunDeltas(y, x, c.a, c.sites, c.scale,
                                     dev_starts.to(at::kLong), longest));
    EXPECT_FALSE(LoraPackedRunDeltas(y, x, c.a, c.sites, c.scale,
                                     dev_starts.narrow(0, 0, slots), longest));
    EXPECT_FALSE(
        LoraPackedRunDeltas(y, x, c.a, c.sites, c.scale, dev_starts, 0));
    EXPECT_TRUE(at::equal(wide, kept));
  }
}

// LoraPackedRunShrink + LoraPackedRunExpand (a per-row prefill's cross
// values: one shrink for every decoder block, then the expands 4 blocks at
// a time) give bit for bit what LoraPackedRunDeltas gives 2 blocks at a
// time: 6 sites of rank 16 (96 ranks, 3 groups of 32) at flan-t5's width,
// runs of 1 to 75 tokens; the same with the sums rounded into a bf16 copy.
// Elsewhere both decline and write nothing; so do ranks that are not a
// multiple of 32, bad starts and an expand of more than 4 sites.
TEST(LoraRunDeltasTest, PackedShrinkOnceEqualsShrinkPerGroup) {
  at::manual_seed(35);
  const bool cuda = Device().is_cuda() && FusedKernelsEnabled();
  const std::vector<int64_t> lengths = {37, 5, 75, 1, 32};
  constexpr int kSites = 6;
  constexpr int64_t kRank = 16;
  std::vector<int32_t> starts = {0};
  for (int64_t len : lengths) {
    starts.push_back(starts.back() + static_cast<int32_t>(len));
  }
  const int64_t slots = static_cast<int64_t>(lengths.size()), N = starts.back();
  const at::Tensor dev_starts = at::tensor(starts, at::kInt).to(Device());
  RunCase c = MakeRunCase(slots, 1, 1024, kSites, kRank);
  const at::Tensor x = at::randn({1, N, 1024}, F32());
  const at::Tensor wide = at::randn({1, N, 8 + 50 * kSites}, F32());
  const at::Tensor y_per_group = wide.narrow(2, 8, 50 * kSites).clone();
  const at::Tensor y_once = wide.narrow(2, 8, 50 * kSites).clone();
  const auto sites_of = [&](int first, int count) {
    return std::vector<LoraRunSite>(c.sites.begin() + first,
                                    c.sites.begin() + first + count);
  };
  const at::Tensor xa = LoraPackedRunShrink(x, c.a, dev_starts, 75);
  ASSERT_EQ(xa.defined(), cuda);
  if (!cuda) {
    EXPECT_FALSE(LoraPackedRunExpand(y_once, at::zeros({1, N, 64}, F32()),
                                     sites_of(0, 4), c.scale, dev_starts, 75));
    EXPECT_TRUE(at::equal(y_once, y_per_group));
    return;
  }
  ASSERT_EQ(xa.sizes(), (std::vector<int64_t>{1, N, kSites * kRank}));
  for (int first = 0; first < kSites; first += 2) {
    ASSERT_TRUE(LoraPackedRunDeltas(y_per_group, x,
                                    c.a.narrow(1, first * kRank, 2 * kRank),
                                    sites_of(first, 2), c.scale, dev_starts,
                                    75));
  }
  for (int first = 0; first < kSites; first += 4) {
    const int count = std::min(4, kSites - first);
    ASSERT_TRUE(LoraPackedRunExpand(y_once,
                                    xa.narrow(2, first * kRank, count * kRank),
                                    sites_of(first, count), c.scale,
                                    dev_starts, 75));
  }
  EXPECT_TRUE(at::equal(y_once, y_per_group));
  // The sums rounded into bf16 (y then only read), as the cross cache takes
  // them.
  const at::Tensor y_before = y_once.clone();
  const at::Tensor rounded = at::zeros_like(y_once, at::kBFloat16);
  ASSERT_TRUE(LoraPackedRunExpand(y_once, xa.narrow(2, 0, 2 * kRank),
                                  sites_of(0, 2), c.scale, dev_starts, 75,
                                  rounded));
  EXPECT_TRUE(at::equal(y_once, y_before)) << "y written beside y_round";
  const at::Tensor y_again = y_before.clone();
  ASSERT_TRUE(LoraPackedRunExpand(y_again, xa.narrow(2, 0, 2 * kRank),
                                  sites_of(0, 2), c.scale, dev_starts, 75));
  for (int k = 0; k < 2; ++k) {
    const at::Tensor cols = y_again.narrow(2, 10 + 50 * k, 40);
    EXPECT_TRUE(at::equal(rounded.narrow(2, 10 + 50 * k, 40),
                          cols.to(at::kBFloat16)))
        << "site " << k;
  }
  // Declined, nothing written: 16 ranks (not a multiple of 32), bad starts,
  // 5 sites.
  EXPECT_FALSE(LoraPackedRunShrink(x, c.a.narrow(1, 0, 16), dev_starts, 75)
                   .defined());
  EXPECT_FALSE(LoraPackedRunShrink(x, c.a, dev_starts.to(at::kLong), 75)
                   .defined());
  EXPECT_FALSE(LoraPackedRunShrink(x, c.a, dev_starts, 0).defined());
  const at::Tensor kept = y_once.clone();
  EXPECT_FALSE(LoraPackedRunExpand(y_once, xa.narrow(2, 0, 5 * kRank),
                                   sites_of(0, 5), c.scale, dev_starts, 75));
  EXPECT_TRUE(at::equal(y_once, kept));
}

// The FMA shrink takes 16-token tiles for several rank groups where they
// still number two blocks per SM (a per-row prefill's cross values),
// 8-token tiles where not: the same sums either way. 64 runs of 1 to 75
// tokens and 64 ranks (2 groups) at flan-t5's width (640 blocks of 16
// tokens: the wide tiles on an H200) against their first 3 runs alone
// (8-token tiles): those runs' xa bit for bit equal, and both near double.
// Elsewhere the shrink declines.
TEST(LoraRunDeltasTest, PackedShrinkWideTilesEqualNarrow) {
  at::manual_seed(36);
  const bool cuda = Device().is_cuda() && FusedKernelsEnabled();
  constexpr int64_t kRuns = 64, kFew = 3, kLongest = 75, kR = 64;
  std::vector<int32_t> starts = {0};
  for (int64_t i = 0; i < kRuns; ++i) {
    starts.push_back(starts.back() +
                     static_cast<int32_t>(i == 2 ? kLongest : i * 29 % 70 + 1));
  }
  const int64_t N = starts.back(), few_n = starts[kFew];
  const at::Tensor x = at::randn({1, N, 1024}, F32());
  const at::Tensor a = at::randn({kRuns, kR, 1024}, F32()) * 0.1;
  const at::Tensor all_starts = at::tensor(starts, at::kInt).to(Device());
  const std::vector<int32_t> first(starts.begin(), starts.begin() + kFew + 1);
  const at::Tensor few_starts = at::tensor(first, at::kInt).to(Device());
  const at::Tensor xa_all = LoraPackedRunShrink(x, a, all_starts, kLongest);
  const at::Tensor xa_few = LoraPackedRunShrink(
      x.narrow(1, 0, few_n), a.narrow(0, 0, kFew), few_starts, kLongest);
  ASSERT_EQ(xa_all.defined(), cuda);
  ASSERT_EQ(xa_few.defined(), cuda);
  if (!cuda) return;
  EXPECT_TRUE(at::equal(xa_all.narrow(1, 0, few_n), xa_few));
  const at::Tensor x_cpu = x.to(at::kCPU).to(at::kDouble);
  const at::Tensor a_cpu = a.to(at::kCPU).to(at::kDouble);
  for (int64_t s = 0; s < kRuns; s += 9) {
    const int64_t len = starts[s + 1] - starts[s];
    const at::Tensor want =
        at::matmul(x_cpu.narrow(1, starts[s], len), a_cpu[s].transpose(0, 1));
    EXPECT_LE(RelDiff(xa_all.narrow(1, starts[s], len), want), 1e-5)
        << "run " << s;
  }
}

// RunShrink (the tensor-core shrink alone) against double on the CPU: 384
// ranks in 6 groups of 64 (the query side's cross v down-projection; 70
// tokens: a partial 64-token tile), 16 and 32 ranks, a strided x (a column
// slice), each with at least two tiles per SM of an H200. Off CUDA, and
// for shapes it does not take, it declines and leaves *out alone.
TEST(RunShrinkTest, MatchesDoubleAndDeclines) {
  at::manual_seed(35);
  const bool cuda = Device().is_cuda() && FusedKernelsEnabled();
  struct Shape {
    int64_t slots, tokens, in, R;
  };
  for (const Shape& sh : {Shape{48, 70, 1024, 384}, Shape{270, 33, 64, 16},
                          Shape{280, 64, 96, 32}}) {
    const at::Tensor wide = at::randn({sh.slots, sh.tokens, sh.in + 8}, F32());
    const at::Tensor x = wide.narrow(2, 4, sh.in);
    const at::Tensor a = at::randn({sh.slots, sh.R, sh.in}, F32()) * 0.1;
    at::Tensor out;
    ASSERT_EQ(RunShrink(x, a, &out), cuda) << sh.R << " ranks";
    if (!cuda) {
      EXPECT_FALSE(out.defined());
      continue;
    }
    const at::Tensor want = at::matmul(x.to(at::kCPU).to(at::kDouble),
                                       a.to(at::kCPU).to(at::kDouble).transpose(1, 2));
    EXPECT_EQ(out.sizes(), want.sizes());
    EXPECT_LE(RelDiff(out, want), 1e-5) << sh.R << " ranks, in " << sh.in;
  }
  // 31 tokens, K not a multiple of 32, 24 ranks, too few tiles: declined.
  for (const Shape& sh : {Shape{300, 31, 64, 32}, Shape{300, 40, 48, 32},
                          Shape{300, 40, 64, 24}, Shape{2, 40, 64, 32}}) {
    const at::Tensor x = at::randn({sh.slots, sh.tokens, sh.in}, F32());
    const at::Tensor a = at::randn({sh.slots, sh.R, sh.in}, F32());
    at::Tensor out;
    EXPECT_FALSE(RunShrink(x, a, &out)) << sh.tokens << " " << sh.in << " " << sh.R;
    EXPECT_FALSE(out.defined());
  }
}

// A slot table (LoraRunSlots: the serving engine's admissions, a run per
// row at any bank slot, each site's scaling per slot, rows without an
// adapter masked): run s's deltas are its bank slot's factors, scaled by
// that slot's scaling of each site times mask[s], padded (LoraRunDeltas,
// runs of 37 tokens: the tensor-core shrink where it runs) and packed
// (LoraPackedRunDeltas, runs of 1 to 75 tokens), against double on the
// CPU. Tables that do not fit decline and write nothing; elsewhere than
// CUDA every call declines.
// y plus a slot table's deltas, in double on the CPU: for each run s, its
// rows rows_of(., s) of y and x (both [rows, columns]) get
// sum_k mask[s] scales_k[slot] (x a[slot]_k^T) b_k[slot]^T over the sites k
// of `bank` (rank r each, A side by side), slot = slot_of[s].
template <typename RowsOf>
at::Tensor SlotTableWant(const at::Tensor& y, const at::Tensor& x,
                         const RunCase& bank, int64_t r,
                         const std::vector<int64_t>& slot_of,
                         const std::vector<float>& mask_of,
                         const RowsOf& rows_of) {
  const auto cpu = [](const at::Tensor& t) {
    return t.to(at::kCPU).to(at::kDouble);
  };
  at::Tensor want = cpu(y);
  const at::Tensor x64 = cpu(x);
  for (size_t s = 0; s < slot_of.size(); ++s) {
    const int64_t run = static_cast<int64_t>(s);
    const int64_t slot = slot_of[s];
    const at::Tensor xs = rows_of(x64, run);
    for (size_t k = 0; k < bank.sites.size(); ++k) {
      const LoraRunSite& site = bank.sites[k];
      const double scale = mask_of[s] * site.scales[slot].item<double>();
      const at::Tensor xa = at::matmul(
          xs, cpu(bank.a[slot].narrow(0, static_cast<int64_t>(k) * r, r)).t());
      rows_of(want, run)
          .narrow(-1, site.col, site.b.size(1))
          .add_(at::matmul(xa, cpu(site.b[slot]).t()) * scale);
    }
  }
  return want;
}

TEST(LoraRunDeltasTest, SlotTableRunsTakeTheirBankSlots) {
  at::manual_seed(35);
  const bool cuda = Device().is_cuda() && FusedKernelsEnabled();
  constexpr int64_t kBank = 6, kRank = 16, kIn = 1024, kSites = 2;
  const std::vector<int64_t> slot_of = {4, 0, 4, 2, 5};
  const std::vector<float> mask_of = {1.f, 1.f, 0.f, 1.f, 1.f};
  const auto runs = static_cast<int64_t>(slot_of.size());
  RunCase bank = MakeRunCase(kBank, 1, kIn, kSites, kRank);
  for (LoraRunSite& site : bank.sites) {
    site.scales = at::rand({kBank}, F32()) + 0.5;
  }
  LoraRunSlots table{at::tensor(slot_of, at::kLong).to(Device()),
                     at::tensor(mask_of, at::kFloat).to(Device())};
  const auto want_of = [&](const at::Tensor& y, const at::Tensor& x,
                           const auto& rows_of) {
    return SlotTableWant(y, x, bank, kRank, slot_of, mask_of, rows_of);
  };
  {  // padded: [runs, 37, ...]
    RunCase c = MakeRunCase(runs, 37, kIn, kSites, kRank);
    const at::Tensor before = c.wide.clone();
    const at::Tensor want = want_of(
        c.y, c.x, [](const at::Tensor& t, int64_t s) { return t[s]; });
    const bool ran = LoraRunDeltas(c.y, c.x, bank.a, at::Tensor(), bank.sites,
                                   /*scale=*/9.0, at::Tensor(), &table);
    EXPECT_EQ(ran, cuda);
    if (ran) {
      EXPECT_LE(RelDiff(c.y, want), 1e-5);
    } else {
      EXPECT_TRUE(at::equal(c.wide, before)) << "declined but wrote y";
    }
  }
  const std::vector<int64_t> lengths = {37, 5, 75, 1, 33};
  std::vector<int32_t> starts = {0};
  for (int64_t len : lengths) {
    starts.push_back(starts.back() + static_cast<int32_t>(len));
  }
  const int64_t N = starts.back();
  const at::Tensor wide = at::randn({1, N, 8 + 50 * kSites}, F32());
  const at::Tensor y = wide.narrow(2, 8, 50 * kSites);
  const at::Tensor x = at::randn({1, N, kIn}, F32());
  const at::Tensor dev_starts = at::tensor(starts, at::kInt).to(Device());
  const at::Tensor before = wide.clone();
  const at::Tensor want =
      want_of(y[0], x[0], [&](const at::Tensor& t, int64_t s) {
        return t.narrow(0, starts[s], lengths[s]);
      });
  // Tables that do not fit: int32 slots, a slot too few, a site without
  // its scalings, starts for a run more.
  LoraRunSlots narrow_ids{table.slots.to(at::kInt), table.mask};
  LoraRunSlots too_few{table.slots.narrow(0, 0, runs - 1),
                       table.mask.narrow(0, 0, runs - 1)};
  std::vector<LoraRunSite> unscaled = bank.sites;
  unscaled[1].scales = at::Tensor();
  EXPECT_FALSE(LoraPackedRunDeltas(y, x, bank.a, bank.sites, 1.0, dev_starts,
                                   75, at::Tensor(), &narrow_ids));
  EXPECT_FALSE(LoraPackedRunDeltas(y, x, bank.a, bank.sites, 1.0, dev_starts,
                                   75, at::Tensor(), &too_few));
  EXPECT_FALSE(LoraPackedRunDeltas(y, x, bank.a, unscaled, 1.0, dev_starts,
                                   75, at::Tensor(), &table));
  EXPECT_FALSE(LoraPackedRunDeltas(
      y, x, bank.a, bank.sites, 1.0,
      at::cat({dev_starts, dev_starts.narrow(0, runs, 1)}), 75, at::Tensor(),
      &table));
  EXPECT_TRUE(at::equal(wide, before)) << "declined but wrote y";
  const bool ran = LoraPackedRunDeltas(y, x, bank.a, bank.sites, 1.0,
                                       dev_starts, 75, at::Tensor(), &table);
  EXPECT_EQ(ran, cuda);
  if (!ran) {
    EXPECT_TRUE(at::equal(wide, before)) << "declined but wrote y";
    return;
  }
  for (int64_t s = 0; s < runs; ++s) {
    EXPECT_LE(RelDiff(y[0].narrow(0, starts[s], lengths[s]),
                      want.narrow(0, starts[s], lengths[s])),
              1e-5)
        << "run " << s;
  }
  // The masked run (slot 4, as run 0) is left as it was.
  EXPECT_TRUE(at::equal(y[0].narrow(0, starts[2], lengths[2]),
                        before.narrow(2, 8, 50 * kSites)[0].narrow(
                            0, starts[2], lengths[2])));
}

// A slot table over packed runs as a static packed encoder of the serving
// engine's admissions passes them: 300 runs (rows up to --max-batch-rows,
// some empty, some masked) at any bank slot, the longest bound 128 (the
// bucket's, past every run's), flan-t5's width, R = 16 and 32: on CUDA the
// tensor-core shrink (300 runs of two 64-token tiles; RunShrink of that
// shape must take it), against double on the CPU to 2e-5: its 3xTF32
// products over K = 1,024 at slot scalings up to 1.5 reached 1.09e-5
// (H100, seventy-third session), where the FMA kernel's stay within 1e-5.
TEST(LoraRunDeltasTest, SlotTablePackedRunsOnTheTensorCores) {
  at::manual_seed(36);
  const bool cuda = Device().is_cuda() && FusedKernelsEnabled();
  constexpr int64_t kBank = 6, kRank = 16, kIn = 1024, kRuns = 300;
  constexpr int64_t kLongest = 128;
  std::vector<int64_t> slot_of, lengths;
  std::vector<float> mask_of;
  std::vector<int32_t> starts = {0};
  for (int64_t i = 0; i < kRuns; ++i) {
    slot_of.push_back(i * 5 % kBank);
    mask_of.push_back(i % 9 == 4 ? 0.f : 1.f);
    lengths.push_back(i % 7 == 3 ? 0 : i % 11 == 5 ? kLongest : i * 37 % 90 + 1);
    starts.push_back(starts.back() + static_cast<int32_t>(lengths.back()));
  }
  const int64_t N = starts.back();
  const at::Tensor dev_starts = at::tensor(starts, at::kInt).to(Device());
  LoraRunSlots table{at::tensor(slot_of, at::kLong).to(Device()),
                     at::tensor(mask_of, at::kFloat).to(Device())};
  for (int sites : {1, 2}) {
    const std::string where = std::to_string(sites) + " sites";
    RunCase bank = MakeRunCase(kBank, 1, kIn, sites, kRank);
    for (LoraRunSite& site : bank.sites) {
      site.scales = at::rand({kBank}, F32()) + 0.5;
    }
    if (cuda) {
      at::Tensor xa;
      EXPECT_TRUE(RunShrink(at::zeros({kRuns, kLongest, kIn}, F32()),
                            at::zeros({kRuns, sites * kRank, kIn}, F32()), &xa))
          << where << ": not the tensor-core shrink's shape";
    }
    const at::Tensor wide = at::randn({1, N, 8 + 50 * sites}, F32());
    const at::Tensor y = wide.narrow(2, 8, 50 * sites);
    const at::Tensor x = at::randn({1, N, kIn}, F32());
    const at::Tensor before = wide.clone();
    const at::Tensor want = SlotTableWant(
        y[0], x[0], bank, kRank, slot_of, mask_of,
        [&](const at::Tensor& t, int64_t s) {
          return t.narrow(0, starts[s], lengths[s]);
        });
    const bool ran = LoraPackedRunDeltas(y, x, bank.a, bank.sites, 1.0,
                                         dev_starts, kLongest, at::Tensor(),
                                         &table);
    EXPECT_EQ(ran, cuda) << where;
    if (!ran) {
      EXPECT_TRUE(at::equal(wide, before)) << where << ": declined but wrote y";
      continue;
    }
    for (int64_t s = 0; s < kRuns; ++s) {
      if (lengths[s] == 0) continue;
      EXPECT_LE(RelDiff(y[0].narrow(0, starts[s], lengths[s]),
                        want.narrow(0, starts[s], lengths[s])),
                2e-5)
          << where << ", run " << s << " (slot " << slot_of[s] << ", "
          << lengths[s] << " tokens)";
    }
  }
}

// Shapes the kernel does not take decline and write nothing: a shrink of
// 24 ranks (not 8, 16 or 32), ranks above 32 per site, five sites.
TEST(LoraRunDeltasTest, DeclinesOtherShapes) {
  at::manual_seed(33);
  for (const auto& [sites, r] : {std::pair<int, int64_t>{3, 8},
                                 std::pair<int, int64_t>{1, 64},
                                 std::pair<int, int64_t>{5, 4}}) {
    RunCase c = MakeRunCase(2, 16, 64, sites, r);
    const at::Tensor before = c.wide.clone();
    EXPECT_FALSE(LoraRunDeltas(c.y, c.x, c.a, at::Tensor(), c.sites, c.scale))
        << sites << " sites of rank " << r;
    EXPECT_TRUE(at::equal(c.wide, before));
  }
}

}  // namespace
}  // namespace lorahub::model
