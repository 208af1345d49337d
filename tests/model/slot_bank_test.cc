// SlotBank (core/model/slot_bank.h): slots keep their adapters across
// Acquire/Release, copy an adapter in only when it is not resident, and give
// the forward pass exactly what MakeAdapterBank gives for the same rows
// (also after a larger rank widened a site and with stale slots reused).
// The decode kernels' low-precision copies of the factors follow them.
// Runs on $LORAHUB_TEST_DEVICE (tiny_t5.h; default cpu).
#include "core/model/slot_bank.h"

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "core/model/fused_ops.h"
#include "core/model/lora.h"
#include "core/model/projection.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

using testing::GatedConfig;
using testing::MakeLoraConfig;
using testing::RandomAdapter;
using testing::RandomT5;

// `m` with its factors copied into one buffer of `dtype`, back to back
// (FlatFactors; as the module cache keeps a module).
LoraAdapter Flattened(const LoraAdapter& m, at::ScalarType dtype) {
  int64_t total = 0;
  for (const LoraSite& s : m.sites) total += s.a.numel() + s.b.numel();
  const at::Tensor buffer = at::empty({total}, m.sites[0].a.options().dtype(dtype));
  LoraAdapter out = m;
  int64_t offset = 0;
  for (LoraSite& s : out.sites) {
    for (at::Tensor* f : {&s.a, &s.b}) {
      at::Tensor view = buffer.narrow(0, offset, f->numel()).view(f->sizes());
      view.copy_(*f);
      offset += f->numel();
      *f = view;
    }
  }
  return out;
}

class SlotBankTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = GatedConfig();
    WeightOptions o;
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << device.status();
    o.device = *device;
    auto w = BuildT5Weights(config_, RandomT5(config_, 21), o);
    ASSERT_TRUE(w.ok()) << w.status();
    base_ = std::make_unique<T5Weights>(*std::move(w));
  }

  std::shared_ptr<const LoraAdapter> Adapter(std::vector<std::string> targets,
                                             int r, uint64_t seed) {
    auto cfg = MakeLoraConfig(std::move(targets), r, 2.0 * r);
    auto ad = BuildLoraAdapter(*base_, cfg, RandomAdapter(*base_, cfg, seed),
                               "m" + std::to_string(seed));
    EXPECT_TRUE(ad.ok()) << ad.status();
    return std::make_shared<const LoraAdapter>(*std::move(ad));
  }

  // Logits of a fixed batch of `slots.size()` rows through `bank`.
  at::Tensor Logits(const AdapterBank* bank,
                    const std::vector<int64_t>& slots) {
    const int64_t B = static_cast<int64_t>(slots.size());
    auto opts = at::TensorOptions().dtype(at::kLong).device(base_->device);
    const at::Tensor ids =
        (at::arange(B * 6, opts).view({B, 6}) * 7 + 3) % config_.vocab_size;
    const at::Tensor mask = at::ones({B, 6}, opts);
    const at::Tensor dec =
        (at::arange(B * 3, opts).view({B, 3}) * 5 + 1) % config_.vocab_size;
    const T5Weights& w = Model();
    auto rows = MakeRowAdapters(w, bank, slots);
    EXPECT_TRUE(rows.ok()) << rows.status();
    auto enc = Encode(w, ids, mask, *rows);
    EXPECT_TRUE(enc.ok()) << enc.status();
    auto logits = DecodeFull(w, dec, *enc, *rows);
    EXPECT_TRUE(logits.ok()) << logits.status();
    return logits->to(at::kCPU).to(at::kFloat);
  }

  // The same rows through a bank built by MakeAdapterBank.
  at::Tensor Reference(const std::vector<const LoraAdapter*>& per_row) {
    std::vector<const LoraAdapter*> distinct;
    std::vector<int64_t> slots;
    for (const LoraAdapter* a : per_row) {
      if (a == nullptr) {
        slots.push_back(-1);
        continue;
      }
      auto it = std::find(distinct.begin(), distinct.end(), a);
      slots.push_back(it - distinct.begin());
      if (it == distinct.end()) distinct.push_back(a);
    }
    auto bank = MakeAdapterBank(Model(), distinct);
    EXPECT_TRUE(bank.ok()) << bank.status();
    return Logits(&*bank, slots);
  }

  // base_'s random weights in bf16 (the run kernels' precision).
  absl::StatusOr<T5Weights> Bf16Weights() const {
    WeightOptions o;
    o.device = base_->device;
    o.dtype = at::kBFloat16;
    return BuildT5Weights(config_, RandomT5(config_, 21), o);
  }

  // What Logits and Reference run: base_, or model_ where set.
  const T5Weights& Model() const { return model_ ? *model_ : *base_; }

  config::T5Config config_;
  std::unique_ptr<T5Weights> base_;
  const T5Weights* model_ = nullptr;
};

TEST_F(SlotBankTest, ResidentAdaptersAreNotCopiedAgain) {
  SlotBank bank(*base_, 2);
  auto a = Adapter({"q", "v"}, 4, 1), b = Adapter({"q", "v"}, 4, 2),
       c = Adapter({"q", "v"}, 4, 3);
  auto sa = bank.Acquire(a);
  ASSERT_TRUE(sa.ok()) << sa.status();
  auto sa2 = bank.Acquire(a);
  ASSERT_TRUE(sa2.ok());
  EXPECT_EQ(*sa2, *sa);
  EXPECT_EQ(bank.users(*sa), 2);
  auto sb = bank.Acquire(b);
  ASSERT_TRUE(sb.ok());
  EXPECT_NE(*sb, *sa);
  EXPECT_EQ(bank.copies(), 2);
  // Full: every slot has users.
  EXPECT_EQ(bank.Acquire(c).status().code(),
            absl::StatusCode::kResourceExhausted);
  // b leaves and comes back: still resident, no copy.
  bank.Release(*sb);
  EXPECT_EQ(bank.users(*sb), 0);
  auto sb2 = bank.Acquire(b);
  ASSERT_TRUE(sb2.ok());
  EXPECT_EQ(*sb2, *sb);
  EXPECT_EQ(bank.copies(), 2);
  // b leaves again; c takes its slot (a still has users).
  bank.Release(*sb2);
  auto sc = bank.Acquire(c);
  ASSERT_TRUE(sc.ok()) << sc.status();
  EXPECT_EQ(*sc, *sb);
  EXPECT_EQ(bank.copies(), 3);
  bank.Release(-1);  // ignored
  bank.Release(*sa);
  bank.Release(*sa);
  bank.Release(*sa);  // no users left: ignored
  EXPECT_EQ(bank.users(*sa), 0);
  EXPECT_EQ(bank.Acquire(nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// bank() holds exactly the sites some slot with users adapts, each the
// resident bank's tensors (also after a site is widened while in use),
// through acquires and releases of adapters and mixes.
TEST_F(SlotBankTest, TheActiveBankHoldsTheSitesOfSlotsWithUsers) {
  SlotBank bank(*base_, 3);
  auto expect_active = [&](const std::vector<std::shared_ptr<const LoraAdapter>>& in_use) {
    std::vector<bool> want(bank.resident().sites.size(), false);
    for (const auto& a : in_use) {
      for (const LoraSite& s : a->sites) want[s.site] = true;
    }
    for (size_t i = 0; i < want.size(); ++i) {
      const SiteBank& active = bank.bank().sites[i];
      ASSERT_EQ(active.a.defined(), want[i]) << "site " << i;
      if (!want[i]) continue;
      const SiteBank& resident = bank.resident().sites[i];
      EXPECT_TRUE(active.a.is_same(resident.a) && active.b.is_same(resident.b) &&
                  active.scale.is_same(resident.scale))
          << "site " << i;
    }
  };
  auto qv = Adapter({"q", "v"}, 4, 61), vo = Adapter({"v", "o"}, 4, 62),
       wide = Adapter({"q"}, 8, 63);
  const auto flat_qv = std::make_shared<const LoraAdapter>(Flattened(*qv, at::kFloat));
  ModuleMix mix{"qv", {flat_qv}, {FlatFactors(*flat_qv)}, {1.0}};
  const int64_t s_qv = *bank.Acquire(qv);
  const int64_t s_vo = *bank.Acquire(vo);
  ASSERT_NO_FATAL_FAILURE(expect_active({qv, vo}));
  bank.Release(s_qv);
  ASSERT_NO_FATAL_FAILURE(expect_active({vo}));
  ASSERT_EQ(*bank.Acquire(qv), s_qv);  // resident: its sites again
  ASSERT_NO_FATAL_FAILURE(expect_active({qv, vo}));
  const int64_t s_wide = *bank.Acquire(wide);  // widens q while qv uses it
  ASSERT_NO_FATAL_FAILURE(expect_active({qv, vo, wide}));
  bank.Release(s_qv);
  bank.Release(s_vo);
  ASSERT_NO_FATAL_FAILURE(expect_active({wide}));
  const int64_t s_mix = *bank.AcquireMix(mix);  // qv's slot, the least recently released
  EXPECT_EQ(s_mix, s_qv);
  ASSERT_NO_FATAL_FAILURE(expect_active({wide, qv}));
  bank.Release(s_wide);
  bank.Release(s_mix);
  ASSERT_NO_FATAL_FAILURE(expect_active({}));
}

// Rows through the slot bank give MakeAdapterBank's logits, with slots in
// any order, unadapted rows, a stale slot overwritten by an adapter of
// other sites, and a site widened by a larger rank.
TEST_F(SlotBankTest, ForwardPassMatchesMakeAdapterBank) {
  SlotBank bank(*base_, 3);
  auto qv = Adapter({"q", "v"}, 4, 11);
  auto all = Adapter({"q", "k", "v", "o", "wi_0", "wi_1", "wo"}, 2, 12);
  auto wide = Adapter({"q", "v"}, 8, 13);
  auto s_qv = bank.Acquire(qv);
  auto s_all = bank.Acquire(all);
  ASSERT_TRUE(s_qv.ok() && s_all.ok());
  const double scale = [&] {
    at::Tensor r = Reference({qv.get(), nullptr, all.get(), qv.get()});
    at::Tensor got =
        Logits(&bank.bank(), {*s_qv, -1, *s_all, *s_qv});
    EXPECT_LT((got - r).abs().max().item<double>(),
              1e-5 * r.abs().max().item<double>());
    return r.abs().max().item<double>();
  }();
  // `all` leaves: its extra sites are no longer part of the bank.
  bank.Release(*s_all);
  int defined = 0;
  for (const SiteBank& sb : bank.bank().sites) defined += sb.a.defined();
  EXPECT_EQ(defined, 2 * (config_.num_layers + 2 * config_.num_decoder_layers));
  // `wide` (rank 8) takes a never-used slot; then a slot reuse: `all`'s
  // slot goes to a fresh q,v adapter whose other sites must read zeros.
  auto s_wide = bank.Acquire(wide);
  ASSERT_TRUE(s_wide.ok());
  auto fresh = Adapter({"q", "v"}, 4, 14);
  auto s_fresh = bank.Acquire(fresh);
  ASSERT_TRUE(s_fresh.ok());
  EXPECT_EQ(*s_fresh, *s_all);
  at::Tensor r = Reference({wide.get(), fresh.get(), qv.get()});
  at::Tensor got = Logits(&bank.bank(), {*s_wide, *s_fresh, *s_qv});
  EXPECT_LT((got - r).abs().max().item<double>(), 1e-5 * scale);
  // The adapters matter (the comparison can fail).
  EXPECT_GT((got - Reference({nullptr, nullptr, nullptr}))
                .abs()
                .max()
                .item<double>(),
            1e-3);
  EXPECT_EQ(bank.copies(), 4);
}

// A bf16 model's rows through the slot bank (slots in any order with an
// unadapted row; consecutive slots, runs of one row) give MakeAdapterBank's
// logits, its sites with a common scaling. On CUDA the slot bank's rows
// take the run kernels through a slot table (projection.h SlotRunsEnabled),
// the reference's runs the same kernels in slot order (the first case:
// the table too); elsewhere both gather or run batched GEMMs. bf16
// roundings differ between the paths, so each is held to a twentieth of
// what rows with their adapters swapped give.
TEST_F(SlotBankTest, BfloatRowsOfAnySlotsMatchMakeAdapterBank) {
  auto bf16 = Bf16Weights();
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  model_ = &*bf16;
  auto a = Adapter({"q", "v"}, 8, 21), b = Adapter({"q", "v"}, 8, 22),
       c = Adapter({"q", "v"}, 16, 23);
  SlotBank bank(*bf16, 4);
  ASSERT_EQ(*bank.Acquire(a), 0);
  ASSERT_EQ(*bank.Acquire(b), 1);
  ASSERT_EQ(*bank.Acquire(c), 2);
  const auto max_abs = [](const at::Tensor& t) {
    return t.abs().max().item<double>();
  };
  {
    const at::Tensor got = Logits(&bank.resident(), {2, 0, -1, 1, 0});
    const at::Tensor want = Reference({c.get(), a.get(), nullptr, b.get(), a.get()});
    const at::Tensor swapped =
        Reference({a.get(), c.get(), nullptr, a.get(), b.get()});
    EXPECT_LT(max_abs(got - want), 0.05 * max_abs(swapped - want));
    // The unadapted row is the base model's.
    const at::Tensor base = Reference({nullptr, nullptr, nullptr, nullptr, nullptr});
    EXPECT_LT(max_abs(got[2] - base[2]), 0.05 * max_abs(swapped - want));
  }
  const at::Tensor got = Logits(&bank.resident(), {0, 1, 2});
  const at::Tensor want = Reference({a.get(), b.get(), c.get()});
  const at::Tensor swapped = Reference({b.get(), c.get(), a.get()});
  EXPECT_LT(max_abs(got - want), 0.05 * max_abs(swapped - want));
}

// A slot's next adapter of the same sites and ranks reuses the last load's
// plan (only its sources and scales change); another layout (other sites, a
// widened rank) makes a new one. The rows read the new adapter either way.
TEST_F(SlotBankTest, ALoadOfTheSameSitesReusesThePlan) {
  SlotBank bank(*base_, 1);
  const std::vector<std::shared_ptr<const LoraAdapter>> adapters = {
      Adapter({"q", "v"}, 4, 41),  // plan made
      Adapter({"q", "v"}, 4, 42),  // reused
      Adapter({"v", "o"}, 4, 43),  // other sites: a new plan
      Adapter({"v", "o"}, 4, 44),  // reused
      Adapter({"q", "v"}, 8, 45),  // widens q and v: a new plan
      Adapter({"q", "v"}, 8, 46)};  // reused
  const std::vector<int64_t> planned = {0, 1, 1, 2, 2, 3};
  for (size_t i = 0; i < adapters.size(); ++i) {
    SCOPED_TRACE(i);
    auto slot = bank.Acquire(adapters[i]);
    ASSERT_TRUE(slot.ok()) << slot.status();
    EXPECT_EQ(bank.planned_copies(), planned[i]);
    const at::Tensor r = Reference({adapters[i].get(), nullptr});
    const at::Tensor got = Logits(&bank.resident(), {*slot, -1});
    EXPECT_LT((got - r).abs().max().item<double>(), 1e-5 * r.abs().max().item<double>());
    if (i > 0) {  // not the previous adapter's logits (the check can fail)
      EXPECT_GT((got - Reference({adapters[i - 1].get(), nullptr})).abs().max().item<double>(),
                1e-4);
    }
    bank.Release(*slot);
  }
  EXPECT_EQ(bank.copies(), 6);
}

// Every defined site of `bank` has a_low / b_low equal to its factors in
// `dtype` with the same layout (none at all for kFloat).
void ExpectLowCopies(const AdapterBank& bank, at::ScalarType dtype) {
  int checked = 0;
  for (const SiteBank& sb : bank.sites) {
    if (!sb.a.defined()) continue;
    if (dtype == at::kFloat) {
      EXPECT_FALSE(sb.a_low.defined() || sb.b_low.defined());
      continue;
    }
    ASSERT_TRUE(sb.a_low.defined() && sb.b_low.defined());
    EXPECT_EQ(sb.a_low.scalar_type(), dtype);
    EXPECT_EQ(sb.a_low.strides(), sb.a.strides());
    EXPECT_EQ(sb.b_low.strides(), sb.b.strides());
    EXPECT_TRUE(at::equal(sb.a_low, sb.a.to(dtype)));
    EXPECT_TRUE(at::equal(sb.b_low, sb.b.to(dtype)));
    ++checked;
  }
  if (dtype != at::kFloat) EXPECT_GT(checked, 0);
}

// On a bf16 model on CUDA (RowKernelFactorDtype) the slot bank keeps bf16
// copies in step with the factors through loads, a stale slot taken by an
// adapter of other sites, and a site widened by a larger rank; elsewhere
// it keeps none.
TEST_F(SlotBankTest, LowPrecisionCopiesFollowTheFactors) {
  auto w = Bf16Weights();
  ASSERT_TRUE(w.ok()) << w.status();
  base_ = std::make_unique<T5Weights>(*std::move(w));
  const at::ScalarType low = RowKernelFactorDtype(at::kBFloat16, base_->device);
  SlotBank bank(*base_, 2);
  auto a = Adapter({"q", "v"}, 4, 31), b = Adapter({"q"}, 4, 32),
       c = Adapter({"v", "o"}, 8, 33);
  auto sa = bank.Acquire(a);
  auto sb = bank.Acquire(b);
  ASSERT_TRUE(sa.ok() && sb.ok());
  ExpectLowCopies(bank.bank(), low);
  bank.Release(*sb);
  auto sc = bank.Acquire(c);  // b's slot, other sites, rank 8
  ASSERT_TRUE(sc.ok()) << sc.status();
  EXPECT_EQ(*sc, *sb);
  ExpectLowCopies(bank.bank(), low);
}

// AttachRowKernelCopies on a composed bank: values rounded once, every
// layout kept (composed A factors of neighbouring sites stay side by side,
// which the decode step's shared down-projection needs), kFloat drops them.
TEST_F(SlotBankTest, AttachRowKernelCopiesKeepsTheLayout) {
  auto m1 = Adapter({"q", "v"}, 4, 41), m2 = Adapter({"q", "v"}, 4, 42);
  auto stack = StackModules(*base_, {m1.get(), m2.get()});
  ASSERT_TRUE(stack.ok()) << stack.status();
  const at::Tensor weights =
      at::tensor(std::vector<float>{0.5f, -1.f, 1.5f, 0.25f, 0.f, 2.f})
          .view({3, 2});
  auto bank = ComposeLoraHub(*stack, weights);
  ASSERT_TRUE(bank.ok()) << bank.status();
  ASSERT_TRUE(AttachRowKernelCopies(&*bank, at::kBFloat16).ok());
  ExpectLowCopies(*bank, at::kBFloat16);
  int adjacent = 0;
  const SiteBank* prev = nullptr;
  for (const SiteBank& sb : bank->sites) {
    if (!sb.a.defined()) continue;
    if (prev != nullptr && sb.a.is_alias_of(prev->a) &&
        sb.a.storage_offset() == prev->a.storage_offset() + prev->a[0].numel()) {
      EXPECT_EQ(sb.a_low.storage_offset(),
                prev->a_low.storage_offset() + prev->a_low[0].numel());
      EXPECT_TRUE(sb.a_low.is_alias_of(prev->a_low));
      ++adjacent;
    }
    prev = &sb;
  }
  EXPECT_GT(adjacent, 0);
  ASSERT_TRUE(AttachRowKernelCopies(&*bank, at::kFloat).ok());
  ExpectLowCopies(*bank, at::kFloat);
}

// The sites allocated together, their A factors side by side in every slot
// (what the run kernels' one shrink for both needs: a decode step's fused
// into the norm, t5_forward.cc ShrinkRun; an admission's encoder and cross
// values, projection.cc AdjacentA), their copies too: every block's
// self-attention q and v, and the cross-attention v of decoder blocks 2k and
// 2k + 1. Widening one widens both and keeps what the slots hold.
TEST_F(SlotBankTest, SitesAllocatedTogetherLieSideBySide) {
  ASSERT_GE(config_.num_decoder_layers, 2);
  SlotBank bank(*base_, 3);
  auto qv = Adapter({"q", "v"}, 4, 51), q_only = Adapter({"q"}, 4, 52),
       v_wide = Adapter({"v"}, 8, 53);
  auto s0 = bank.Acquire(qv);
  auto s1 = bank.Acquire(q_only);
  ASSERT_TRUE(s0.ok() && s1.ok());
  const int first_decoder_site = config_.num_layers * kSitesPerBlock;
  const int64_t before = bank.resident().sites[first_decoder_site].a.size(1);
  const at::Tensor q_before = bank.resident().sites[first_decoder_site].a.to(at::kCPU);
  auto s2 = bank.Acquire(v_wide);
  ASSERT_TRUE(s2.ok()) << s2.status();
  const AdapterBank& resident = bank.resident();
  const auto expect_side_by_side = [&](int first, int second) {
    SCOPED_TRACE(::testing::Message() << "sites " << first << ", " << second);
    const SiteBank& p = resident.sites[first];
    const SiteBank& n = resident.sites[second];
    ASSERT_TRUE(p.a.defined() && n.a.defined());
    EXPECT_EQ(p.a.size(1), 8);
    EXPECT_TRUE(internal::AdjacentFactors(p.a, n.a));
    if (p.a_low.defined()) {
      EXPECT_TRUE(internal::AdjacentFactors(p.a_low, n.a_low));
    }
    if (p.a_int8.defined()) {
      EXPECT_TRUE(internal::AdjacentFactors(p.a_int8, n.a_int8));
    }
  };
  const int blocks = config_.num_layers + config_.num_decoder_layers;
  for (int block = 0; block < blocks; ++block) {
    expect_side_by_side(block * kSitesPerBlock, block * kSitesPerBlock + 2);
  }
  for (int block = config_.num_layers; block + 1 < blocks; block += 2) {
    expect_side_by_side(block * kSitesPerBlock + 6, (block + 1) * kSitesPerBlock + 6);
  }
  // Nothing else: the cross v of decoder blocks 1 and 2 lie apart.
  if (config_.num_decoder_layers >= 3) {
    EXPECT_FALSE(internal::AdjacentFactors(
        resident.sites[(config_.num_layers + 1) * kSitesPerBlock + 6].a,
        resident.sites[(config_.num_layers + 2) * kSitesPerBlock + 6].a));
  }
  // Widened from 4 to 8 ranks: the slots' factors kept, zero-padded.
  EXPECT_EQ(before, 4);
  const at::Tensor q_after = resident.sites[first_decoder_site].a.to(at::kCPU);
  EXPECT_TRUE(at::equal(q_after.narrow(1, 0, 4), q_before));
  EXPECT_EQ(q_after.narrow(1, 4, 4).abs().max().item<float>(), 0.f);
  // The slots' logits are still MakeAdapterBank's.
  const at::Tensor want = Reference({qv.get(), q_only.get(), v_wide.get(), qv.get()});
  const at::Tensor got = Logits(&bank.bank(), {*s0, *s1, *s2, *s0});
  EXPECT_LT((got - want).abs().max().item<double>(), 1e-5 * want.abs().max().item<double>());
}

// With an odd number of decoder blocks the last block's cross-attention v
// is allocated alone, its neighbours' in pairs; the slots' logits are still
// MakeAdapterBank's.
TEST_F(SlotBankTest, AnOddDecoderBlocksCrossValuesLieAlone) {
  config_.num_decoder_layers = 3;
  WeightOptions o;
  o.device = base_->device;
  auto w = BuildT5Weights(config_, RandomT5(config_, 22), o);
  ASSERT_TRUE(w.ok()) << w.status();
  base_ = std::make_unique<T5Weights>(*std::move(w));
  SlotBank bank(*base_, 2);
  auto a = Adapter({"q", "v"}, 4, 54), b = Adapter({"v"}, 4, 55);
  auto sa = bank.Acquire(a);
  auto sb = bank.Acquire(b);
  ASSERT_TRUE(sa.ok() && sb.ok());
  const auto cross_v = [&](int decoder_block) -> const at::Tensor& {
    return bank.resident()
        .sites[(config_.num_layers + decoder_block) * kSitesPerBlock + 6]
        .a;
  };
  EXPECT_TRUE(internal::AdjacentFactors(cross_v(0), cross_v(1)));
  EXPECT_FALSE(internal::AdjacentFactors(cross_v(1), cross_v(2)));
  EXPECT_TRUE(cross_v(2).is_contiguous());
  const at::Tensor want = Reference({a.get(), b.get(), nullptr});
  const at::Tensor got = Logits(&bank.bank(), {*sa, *sb, -1});
  EXPECT_LT((got - want).abs().max().item<double>(), 1e-5 * want.abs().max().item<double>());
}

// AttachStepInt8Copies on a composed bank: the int8 copies keep the
// factors' layout (sizes, strides, offsets: neighbouring sites stay side by
// side), and each slot's B A * scale comes back from them within int8's
// rounding (one 127th of each block's largest value, per factor).
TEST_F(SlotBankTest, AttachStepInt8CopiesKeepTheLayoutAndTheProducts) {
  auto m1 = Adapter({"q", "v"}, 4, 61), m2 = Adapter({"q", "v"}, 4, 62);
  auto stack = StackModules(*base_, {m1.get(), m2.get()});
  ASSERT_TRUE(stack.ok()) << stack.status();
  const at::Tensor weights =
      at::tensor(std::vector<float>{0.5f, -1.f, 1.5f, 0.25f, 0.f, 0.f}).view({3, 2});
  auto bank = ComposeLoraHub(*stack, weights);
  ASSERT_TRUE(bank.ok()) << bank.status();
  ASSERT_TRUE(AttachStepInt8Copies(&*bank).ok());
  int sites = 0;
  for (const SiteBank& sb : bank->sites) {
    if (!sb.a.defined()) continue;
    ++sites;
    for (const auto& [t, q] : {std::pair{&sb.a, &sb.a_int8}, std::pair{&sb.b, &sb.b_int8}}) {
      ASSERT_TRUE(q->defined());
      EXPECT_EQ(q->scalar_type(), at::kChar);
      EXPECT_EQ(q->sizes(), t->sizes());
      EXPECT_EQ(q->strides(), t->strides());
      EXPECT_EQ(q->storage_offset(), t->storage_offset());
    }
    for (int64_t slot = 0; slot < 3; ++slot) {
      const auto cpu = [](const at::Tensor& t) { return t.to(at::kCPU).to(at::kDouble); };
      const at::Tensor want =
          at::mm(cpu(sb.b[slot]), cpu(sb.a[slot])) * cpu(sb.scale[slot]).item<double>();
      const at::Tensor got = at::mm(cpu(sb.b_int8[slot]), cpu(sb.a_int8[slot])) *
                             cpu(sb.scale_int8[slot]).item<double>();
      const double scale = want.abs().max().item<double>();
      if (slot == 2) {  // zero weights: a block of zeros
        EXPECT_EQ(got.abs().max().item<double>(), 0.0);
        continue;
      }
      EXPECT_LE((got - want).abs().max().item<double>(), 0.03 * scale) << slot;
      EXPECT_GT((got - want).abs().max().item<double>(), 0.0) << "rounded at all";
    }
  }
  EXPECT_GT(sites, 0);
}

// WeightedSums on the test device gives the bits of the same sums done
// with ATen on the CPU (dst = t0 * w0; dst += t1 * w1; ...): fp32 and bf16
// terms and destinations, fills, lengths that are no multiple of anything,
// more jobs than one launch's grid rows, more terms than the CUDA kernel
// loads at once (9, 20) or stages (70), tensors not aligned for its vector
// loads (views from the second element); malformed sums throw before any
// is written.
TEST_F(SlotBankTest, WeightedSumsMatchTheirAtenArithmetic) {
  const c10::Device dev = base_->device;
  auto gen = at::detail::createCPUGenerator(7);
  auto rand = [&](int64_t n, at::ScalarType t) {
    return at::randn({n}, gen, at::TensorOptions().dtype(at::kFloat)).to(t);
  };
  std::vector<WeightedSum> sums;
  std::vector<std::vector<at::Tensor>> cpu_terms;
  const std::vector<int64_t> lengths = {1, 3, 1000, 4097, 65537};
  const std::vector<int> many_terms = {9, 20, 70};
  for (int j = 0; j < 70000; ++j) {
    // Even jobs of the first 60 a multiple of 4 long (the CUDA kernel's vector loads).
    const int64_t n =
        j < 60 ? lengths[j % lengths.size()] * (j % 2 == 0 ? 4 : 1) : 2 + j % 5;
    // Terms (0: a fill); jobs 40-59 have many.
    const int k = j >= 40 && j < 60 ? many_terms[j % many_terms.size()] : j % 4;
    // Jobs 20-59: every third tensor a view from its buffer's second element.
    const bool offset = j >= 20 && j < 60 && j % 3 == 1;
    const auto on_device = [&](const at::Tensor& t) {
      if (!offset) return t.to(dev);
      at::Tensor buffer = at::zeros({t.numel() + 1}, t.options().device(dev));
      buffer.narrow(0, 1, t.numel()).copy_(t);
      return buffer.narrow(0, 1, t.numel());
    };
    WeightedSum sum;
    sum.dst = on_device(at::full({n}, 9.f, at::TensorOptions().dtype(
                                                j % 3 == 0 ? at::kBFloat16 : at::kFloat)));
    sum.fill = 0.25f * static_cast<float>(j % 7);
    std::vector<at::Tensor> on_cpu;
    for (int t = 0; t < k; ++t) {
      on_cpu.push_back(rand(n, (j + t) % 2 == 0 ? at::kFloat : at::kBFloat16));
      sum.terms.push_back(on_device(on_cpu.back()));
      sum.weights.push_back(0.37f * static_cast<float>(t) - 0.61f + 0.001f * j);
    }
    cpu_terms.push_back(std::move(on_cpu));
    sums.push_back(std::move(sum));
  }
  WeightedSums(sums);
  for (size_t j = 0; j < sums.size(); ++j) {
    const WeightedSum& sum = sums[j];
    at::Tensor want;
    if (sum.terms.empty()) {
      want = at::full({sum.dst.numel()}, sum.fill, at::kFloat);
    } else {
      want = cpu_terms[j][0].to(at::kFloat) * sum.weights[0];
      for (size_t t = 1; t < sum.terms.size(); ++t) {
        want.add_(cpu_terms[j][t].to(at::kFloat) * sum.weights[t]);
      }
    }
    ASSERT_TRUE(at::equal(sum.dst.cpu(), want.to(sum.dst.scalar_type())))
        << "job " << j << " of " << sum.terms.size() << " terms, n " << sum.dst.numel();
  }
  // Malformed: nothing is written.
  const at::Tensor dst = at::zeros({4}, at::TensorOptions().device(dev));
  const at::Tensor three = at::ones({3}, at::TensorOptions().device(dev));
  const at::Tensor strided = at::ones({8}, at::TensorOptions().device(dev)).slice(0, 0, 8, 2);
  WeightedSum fine{dst, {at::ones({4}, at::TensorOptions().device(dev))}, {2.f}};
  for (WeightedSum bad : {WeightedSum{dst, {three}, {1.f}}, WeightedSum{dst, {strided}, {1.f}},
                          WeightedSum{dst, {dst}, {}},
                          WeightedSum{dst, {dst.to(at::kDouble)}, {1.f}}}) {
    EXPECT_THROW(WeightedSums({fine, bad}), c10::Error);
    EXPECT_EQ(dst.abs().sum().item<float>(), 0.f);
  }
}

// The composition the serving engine uses: ComposeLoraHubModules adds the
// modules' factors in module order, each product and sum rounded, and agrees
// with the stacked GEMM (ComposeOne) to fp32 rounding.
TEST_F(SlotBankTest, ComposeLoraHubModulesIsTheWeightedSumOfTheModules) {
  const auto m0 = Adapter({"q", "v"}, 4, 31);
  const auto m1 = Adapter({"q", "v"}, 4, 32);
  const auto m2 = Adapter({"q", "v"}, 4, 33);
  const std::vector<const LoraAdapter*> modules = {m0.get(), m1.get(), m2.get()};
  const std::vector<double> w = {0.5, -0.3, 0.8};
  auto composed = ComposeLoraHubModules(*base_, modules, w);
  ASSERT_TRUE(composed.ok()) << composed.status();
  auto stack = StackModules(*base_, modules);
  ASSERT_TRUE(stack.ok()) << stack.status();
  auto gemm = ComposeOne(*stack, w);
  ASSERT_TRUE(gemm.ok()) << gemm.status();
  ASSERT_EQ(composed->sites.size(), m0->sites.size());
  for (size_t i = 0; i < composed->sites.size(); ++i) {
    const LoraSite& c = composed->sites[i];
    EXPECT_EQ(c.site, m0->sites[i].site);
    EXPECT_EQ(c.scaling, m0->sites[i].scaling);
    for (at::Tensor LoraSite::*f : {&LoraSite::a, &LoraSite::b}) {
      at::Tensor want = (m0->sites[i].*f).cpu() * static_cast<float>(w[0]);
      want.add_((m1->sites[i].*f).cpu() * static_cast<float>(w[1]));
      want.add_((m2->sites[i].*f).cpu() * static_cast<float>(w[2]));
      EXPECT_TRUE(at::equal((c.*f).cpu(), want)) << "site " << c.site;
      EXPECT_TRUE(at::allclose((c.*f).cpu(), (gemm->sites[i].*f).cpu(), 1e-6, 1e-7))
          << "site " << c.site;
    }
  }
  // Modules that each lie in one buffer (as the module cache keeps them; the
  // second one in bf16) compose as one sum of whole buffers: the same bits.
  const LoraAdapter f0 = Flattened(*m0, at::kFloat), f1 = Flattened(*m1, at::kBFloat16),
                    f2 = Flattened(*m2, at::kFloat);
  const LoraAdapter r1 = Flattened(f1, at::kFloat);  // m1 rounded to bf16, as f1 holds it
  auto whole = ComposeLoraHubModules(*base_, {&f0, &f1, &f2}, w);
  auto by_factor = ComposeLoraHubModules(*base_, {m0.get(), &r1, m2.get()}, w);
  ASSERT_TRUE(whole.ok() && by_factor.ok());
  for (size_t i = 0; i < whole->sites.size(); ++i) {
    EXPECT_TRUE(at::equal(whole->sites[i].a, by_factor->sites[i].a)) << "site " << i;
    EXPECT_TRUE(at::equal(whole->sites[i].b, by_factor->sites[i].b)) << "site " << i;
    EXPECT_EQ(whole->sites[i].scaling, by_factor->sites[i].scaling);
  }
  EXPECT_FALSE(ComposeLoraHubModules(*base_, modules, {1.0}).ok());
  const auto other = Adapter({"q"}, 4, 34);
  EXPECT_EQ(ComposeLoraHubModules(*base_, {m0.get(), other.get()}, {1.0, 1.0})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// RunSliceSums on the test device gives the bits of WeightedSums of the
// same slices done with ATen on the CPU: fp32 and bf16 buffers and
// destinations, fills, offsets and lengths that are no multiple of
// anything, the most terms a launch takes; terms that do not fit throw
// before anything is written. A plan runs again with other buffers.
TEST_F(SlotBankTest, SliceSumsAreWeightedSumsOfTheirSlices) {
  const c10::Device dev = base_->device;
  auto gen = at::detail::createCPUGenerator(11);
  const int64_t length = 70001;
  std::vector<SliceSum> sums;
  for (int j = 0; j < 300; ++j) {
    const int64_t n = j % 5 == 0 ? 4 * (1 + j % 257) : 1 + (j * 37) % 1000;
    SliceSum sum;
    sum.dst = at::full({n}, 9.f, at::TensorOptions()
                                     .dtype(j % 3 == 0 ? at::kBFloat16 : at::kFloat)
                                     .device(dev));
    sum.offset = j % 5 == 0 ? 4 * ((j * 131) % 17000) : (j * 7919) % (length - n);
    sum.summed = j % 7 != 3;
    sum.fill = 0.5f * static_cast<float>(j % 5);
    sums.push_back(std::move(sum));
  }
  const SliceSumPlan plan = PlanSliceSums(sums);
  for (const int terms : {1, 3, kMaxSliceSumTerms}) {
    SCOPED_TRACE(terms);
    std::vector<at::Tensor> on_cpu, on_device;
    std::vector<float> weights;
    for (int t = 0; t < terms; ++t) {
      on_cpu.push_back(at::randn({length}, gen).to(t % 2 == 0 ? at::kFloat : at::kBFloat16));
      on_device.push_back(on_cpu.back().to(dev));
      weights.push_back(0.37f * static_cast<float>(t) - 0.61f);
    }
    RunSliceSums(plan, on_device, weights);
    for (size_t j = 0; j < sums.size(); ++j) {
      const SliceSum& s = sums[j];
      const int64_t n = s.dst.numel();
      at::Tensor want = at::full({n}, s.fill, at::kFloat);
      if (s.summed) {
        want = on_cpu[0].narrow(0, s.offset, n).to(at::kFloat) * weights[0];
        for (int t = 1; t < terms; ++t) {
          want.add_(on_cpu[t].narrow(0, s.offset, n).to(at::kFloat) * weights[t]);
        }
      }
      ASSERT_TRUE(at::equal(s.dst.cpu(), want.to(s.dst.scalar_type()))) << "sum " << j;
    }
  }
  // Too short, too many, a weight missing, on another dtype: nothing written.
  const at::Tensor dst = at::zeros({4}, at::TensorOptions().device(dev));
  const SliceSumPlan small = PlanSliceSums({SliceSum{dst, 6}});
  const at::Tensor ten = at::ones({10}, at::TensorOptions().device(dev));
  EXPECT_THROW(RunSliceSums(small, {ten.narrow(0, 0, 9)}, {1.f}), c10::Error);
  EXPECT_THROW(RunSliceSums(small, std::vector<at::Tensor>(kMaxSliceSumTerms + 1, ten),
                            std::vector<float>(kMaxSliceSumTerms + 1, 1.f)),
               c10::Error);
  EXPECT_THROW(RunSliceSums(small, {ten, ten}, {1.f}), c10::Error);
  EXPECT_THROW(RunSliceSums(small, {ten.to(at::kDouble)}, {1.f}), c10::Error);
  EXPECT_EQ(dst.abs().sum().item<float>(), 0.f);
  RunSliceSums(small, {ten}, {2.f});
  EXPECT_EQ(dst.sum().item<float>(), 8.f);
  EXPECT_THROW(PlanSliceSums({SliceSum{dst, -1}}), c10::Error);
}

// Every tensor of `a`'s slot `sa` equals `b`'s slot `sb` bit for bit: the
// factors, their low-precision and int8 copies and the scales, at every site.
void ExpectSameSlot(const AdapterBank& a, int64_t sa, const AdapterBank& b, int64_t sb) {
  ASSERT_EQ(a.sites.size(), b.sites.size());
  for (size_t i = 0; i < a.sites.size(); ++i) {
    const SiteBank& x = a.sites[i];
    const SiteBank& y = b.sites[i];
    for (const auto& [tx, ty] : {std::pair{&x.a, &y.a}, std::pair{&x.b, &y.b},
                                 std::pair{&x.scale, &y.scale}, std::pair{&x.a_low, &y.a_low},
                                 std::pair{&x.b_low, &y.b_low}, std::pair{&x.a_int8, &y.a_int8},
                                 std::pair{&x.b_int8, &y.b_int8},
                                 std::pair{&x.scale_int8, &y.scale_int8}}) {
      ASSERT_EQ(tx->defined(), ty->defined()) << "site " << i;
      if (tx->defined()) {
        EXPECT_TRUE(at::equal(SlotView(*tx, sa), SlotView(*ty, sb))) << "site " << i;
      }
    }
  }
}

// AcquireMix computes a composition straight into a slot: the bits Acquire
// of ComposeLoraHubModules gives (fp32, and bf16 with the decode kernels'
// copies), in a slot an adapter of other sites left, through the slot's
// plan for other weights, and for a rank below the bank's (composed, then
// copied). A resident mix is found by its key; malformed mixes are refused
// and leave no slot behind.
TEST_F(SlotBankTest, AMixLoadsTheBitsOfItsComposition) {
  auto bf16 = Bf16Weights();
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  for (const T5Weights* w : {base_.get(), &*bf16}) {
    SCOPED_TRACE(at::toString(w->dtype));
    auto flat = [](const std::shared_ptr<const LoraAdapter>& m, at::ScalarType t) {
      return std::make_shared<const LoraAdapter>(Flattened(*m, t));
    };
    const std::vector<std::shared_ptr<const LoraAdapter>> modules = {
        flat(Adapter({"q", "v"}, 4, 51), at::kFloat),
        flat(Adapter({"q", "v"}, 4, 52), at::kBFloat16),
        flat(Adapter({"q", "v"}, 4, 53), at::kFloat)};
    auto mix_of = [&modules](std::vector<double> weights, std::string key) {
      ModuleMix mix;
      mix.key = std::move(key);
      mix.modules = modules;
      for (const auto& m : modules) mix.flats.push_back(FlatFactors(*m));
      mix.weights = std::move(weights);
      return mix;
    };
    // The same loads into two banks of one slot: mixes, and compositions.
    SlotBank mixes(*w, 1), copies(*w, 1);
    auto both = [&](const ModuleMix& mix) {
      std::vector<const LoraAdapter*> raw;
      for (const auto& m : mix.modules) raw.push_back(m.get());
      auto composed = ComposeLoraHubModules(*w, raw, mix.weights);
      ASSERT_TRUE(composed.ok()) << composed.status();
      auto sm = mixes.AcquireMix(mix);
      ASSERT_TRUE(sm.ok()) << sm.status();
      auto sc = copies.Acquire(std::make_shared<const LoraAdapter>(*std::move(composed)));
      ASSERT_TRUE(sc.ok()) << sc.status();
      ASSERT_EQ(*sm, 0);
      ASSERT_EQ(*sc, 0);
      ExpectSameSlot(mixes.resident(), 0, copies.resident(), 0);
      mixes.Release(0);
      copies.Release(0);
    };
    auto adapter_in_both = [&](const std::shared_ptr<const LoraAdapter>& a) {
      ASSERT_EQ(*mixes.Acquire(a), 0);
      ASSERT_EQ(*copies.Acquire(a), 0);
      mixes.Release(0);
      copies.Release(0);
    };
    // The slot first holds an adapter of other sites (rank 4: none widens).
    ASSERT_NO_FATAL_FAILURE(adapter_in_both(Adapter({"v", "o"}, 4, 54)));
    ASSERT_NO_FATAL_FAILURE(both(mix_of({0.5, -0.3, 0.8}, "mix0")));
    EXPECT_EQ(mixes.mix_loads(), 1);
    EXPECT_EQ(mixes.planned_copies(), 0);
    ASSERT_NO_FATAL_FAILURE(both(mix_of({0.1, 0.2, -0.7}, "mix1")));
    EXPECT_EQ(mixes.mix_loads(), 2);
    EXPECT_EQ(mixes.planned_copies(), 1);
    // Found by its key: no load.
    auto again = mixes.AcquireMix(mix_of({0.1, 0.2, -0.7}, "mix1"));
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(*again, 0);
    EXPECT_EQ(mixes.copies(), 3);
    EXPECT_EQ(mixes.users(0), 1);
    mixes.Release(0);
    // An adapter of rank 8 widens q and v; a rank-4 mix then takes the
    // composition's copy.
    ASSERT_NO_FATAL_FAILURE(adapter_in_both(Adapter({"q", "v"}, 8, 55)));
    ASSERT_NO_FATAL_FAILURE(both(mix_of({0.5, 0.5, 0.5}, "mix2")));
    EXPECT_EQ(mixes.mix_loads(), 2);
    // Malformed: refused, the slot not taken.
    ModuleMix no_key = mix_of({1, 1, 1}, "");
    ModuleMix no_weight = mix_of({1, 1}, "w");
    ModuleMix null_module = mix_of({1, 1, 1}, "n");
    null_module.modules[1] = nullptr;
    for (const ModuleMix* bad : {&no_key, &no_weight, &null_module}) {
      EXPECT_EQ(mixes.AcquireMix(*bad).status().code(), absl::StatusCode::kInvalidArgument);
    }
    SlotBank fresh(*w, 1);
    ModuleMix short_flat = mix_of({1, 1, 1}, "s");
    short_flat.flats[1] = short_flat.flats[1].narrow(0, 0, 10);
    EXPECT_EQ(fresh.AcquireMix(short_flat).status().code(), absl::StatusCode::kInternal);
    EXPECT_EQ(fresh.users(0), 0);
    EXPECT_EQ(fresh.copies(), 0);
    auto fine = fresh.AcquireMix(mix_of({1, 1, 1}, "s"));
    ASSERT_TRUE(fine.ok()) << fine.status();
    EXPECT_EQ(fresh.copies(), 1);
  }
}

// The serving engine's newcomers hold arbitrary slots of its SlotBank, or
// consecutive ones (runs of one row), whose scale is per slot: the packed
// prefill takes them whole through the run kernels' slot table
// (PackedDeltasWhole), as it takes the same adapters from MakeAdapterBank,
// whose sites have a common scaling. Runs of several rows still need a
// common scaling; a model in fp32 never packs adapted rows.
TEST_F(SlotBankTest, SlotBankRowsArePackedWholeThroughTheSlotTable) {
  auto bf16 = Bf16Weights();
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  auto a = Adapter({"q", "v"}, 4, 1), b = Adapter({"q", "v"}, 4, 2);
  SlotBank bank(*bf16, 4);
  ASSERT_EQ(*bank.Acquire(a), 0);
  ASSERT_EQ(*bank.Acquire(b), 1);
  auto slot_rows = MakeRowAdapters(*bf16, &bank.resident(), {0, 1});
  ASSERT_TRUE(slot_rows.ok()) << slot_rows.status();
  ASSERT_EQ(slot_rows->rows_per_slot, 1);
  EXPECT_EQ(PackedDeltasWhole(*bf16, *slot_rows), internal::SlotRunsEnabled());
  auto any_order = MakeRowAdapters(*bf16, &bank.resident(), {1, -1, 0});
  ASSERT_TRUE(any_order.ok()) << any_order.status();
  ASSERT_EQ(any_order->rows_per_slot, 0);
  EXPECT_EQ(PackedDeltasWhole(*bf16, *any_order), internal::SlotRunsEnabled());
  auto two_rows_each = MakeRowAdapters(*bf16, &bank.resident(), {0, 0, 1, 1});
  ASSERT_TRUE(two_rows_each.ok()) << two_rows_each.status();
  ASSERT_EQ(two_rows_each->rows_per_slot, 2);
  EXPECT_FALSE(PackedDeltasWhole(*bf16, *two_rows_each));
  EXPECT_FALSE(PackedDeltasWhole(*base_, *slot_rows));

  auto made = MakeAdapterBank(*bf16, {a.get(), b.get()});
  ASSERT_TRUE(made.ok()) << made.status();
  auto made_rows = MakeRowAdapters(*bf16, &*made, {0, 0, 1, 1});
  ASSERT_TRUE(made_rows.ok()) << made_rows.status();
  ASSERT_EQ(made_rows->rows_per_slot, 2);
  EXPECT_TRUE(PackedDeltasWhole(*bf16, *made_rows));
  // The run kernels are for reduced precision; one slot for every row and
  // no adapter at all are always whole.
  EXPECT_FALSE(PackedDeltasWhole(*base_, *made_rows));
  auto one_slot = MakeRowAdapters(*bf16, &bank.resident(), {1, 1});
  ASSERT_TRUE(one_slot.ok()) << one_slot.status();
  EXPECT_TRUE(PackedDeltasWhole(*bf16, *one_slot));
  EXPECT_TRUE(PackedDeltasWhole(*bf16, RowAdapters()));
}

}  // namespace
}  // namespace lorahub::model
