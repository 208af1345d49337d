#include "core/model/slot_bank.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/model/fused_ops.h"
#include "core/util/status_macros.h"

namespace lorahub::model {
namespace {

// Calls zero(view) for slot `slot`'s view of every tensor at the bank's
// sites that `adapted` leaves out: what an earlier adapter left there,
// which a load zeroes (the int8 copies follow from the fp32 factors).
template <typename Zero>
void ForEachUnadapted(const AdapterBank& bank, int64_t slot, const std::vector<bool>& adapted,
                      Zero zero) {
  for (size_t site = 0; site < bank.sites.size(); ++site) {
    const SiteBank& sb = bank.sites[site];
    if (adapted[site] || !sb.a.defined()) continue;
    for (const at::Tensor* t : {&sb.a, &sb.b, &sb.scale, &sb.a_low, &sb.b_low}) {
      if (t->defined()) zero(SlotView(*t, slot));
    }
  }
}

}  // namespace

SlotBank::SlotBank(const T5Weights& base, int64_t capacity)
    : base_(base),
      low_dtype_(RowKernelFactorDtype(base.dtype, base.device)),
      int8_(RowKernelInt8(base.dtype, base.device)),
      slots_(static_cast<size_t>(std::max<int64_t>(capacity, 1))) {
  bank_.num_slots = static_cast<int>(slots_.size());
  bank_.sites.resize(base.num_sites);
  active_ = bank_;
  site_users_.assign(static_cast<size_t>(base.num_sites), 0);
}

absl::StatusOr<int64_t> SlotBank::Acquire(
    const std::shared_ptr<const LoraAdapter>& adapter) {
  if (adapter == nullptr) {
    return absl::InvalidArgumentError("slot bank: no adapter");
  }
  LH_RETURN_IF_ERROR(CheckSites(*adapter, "adapter"));
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].adapter.lock() == adapter) return Use(i);
  }
  LH_ASSIGN_OR_RETURN(const int64_t free, TakeFreeSlot());
  Slot& slot = slots_[free];
  try {
    Load(free, *adapter);
  } catch (const c10::Error& e) {
    slot.sites.clear();
    return absl::InternalError(
        absl::StrCat("slot bank: ", e.what_without_backtrace()));
  }
  slot.adapter = adapter;
  ++copies_;
  return Use(free);
}

absl::Status SlotBank::CheckSites(const LoraAdapter& adapter, const char* what) const {
  for (const LoraSite& s : adapter.sites) {
    if (s.site < 0 || s.site >= base_.num_sites) {
      return absl::InvalidArgumentError(absl::StrCat(
          "slot bank: ", what, " '", adapter.name, "' site ", s.site, " out of range"));
    }
  }
  return absl::OkStatus();
}

int64_t SlotBank::Use(size_t slot) {
  if (slots_[slot].users++ == 0) CountSites(slots_[slot], 1);
  return static_cast<int64_t>(slot);
}

absl::StatusOr<int64_t> SlotBank::TakeFreeSlot() {
  // Never-used slots have released_at 0, so they go first.
  int64_t free = -1;
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].users == 0 &&
        (free < 0 || slots_[i].released_at < slots_[free].released_at)) {
      free = static_cast<int64_t>(i);
    }
  }
  if (free < 0) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "slot bank: all ", slots_.size(), " adapter slots are in use"));
  }
  // Not resident while it is being overwritten.
  slots_[free].adapter.reset();
  slots_[free].mix_key.clear();
  return free;
}

absl::StatusOr<int64_t> SlotBank::AcquireMix(const ModuleMix& mix) {
  const size_t n = mix.modules.size();
  if (mix.key.empty() || n == 0 || n > static_cast<size_t>(kMaxSliceSumTerms) ||
      mix.flats.size() != n || mix.weights.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "slot bank: a mix needs a key and 1 to ", kMaxSliceSumTerms,
        " modules with a buffer and a weight each; got ", n, " modules, ",
        mix.flats.size(), " buffers, ", mix.weights.size(), " weights"));
  }
  for (const auto& m : mix.modules) {
    if (m == nullptr) return absl::InvalidArgumentError("slot bank: a mix's module is null");
    LH_RETURN_IF_ERROR(CheckSites(*m, "module"));
  }
  for (size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].mix_key == mix.key) return Use(i);
  }
  LH_ASSIGN_OR_RETURN(const int64_t free, TakeFreeSlot());
  Slot& slot = slots_[free];
  if (absl::Status st = LoadMix(free, mix); !st.ok()) {
    slot.sites.clear();
    return st;
  }
  slot.mix_key = mix.key;
  ++copies_;
  return Use(free);
}

absl::Status SlotBank::LoadMix(int64_t slot, const ModuleMix& mix) {
  const LoraAdapter& first = *mix.modules[0];
  try {
    for (const LoraSite& s : first.sites) Reserve(s.site, s.a.size(0));
    if (MixPlanFits(slot, first)) {
      ++planned_copies_;
    } else if (!PlanMix(slot, first)) {
      // A rank below the bank's: the slot's factors there are no slice of a
      // module's buffer.
      std::vector<const LoraAdapter*> raw;
      for (const auto& m : mix.modules) raw.push_back(m.get());
      LH_ASSIGN_OR_RETURN(LoraAdapter composed,
                          ComposeLoraHubModules(base_, raw, mix.weights));
      Load(slot, composed);
      return absl::OkStatus();
    }
    {
      RECORD_USER_SCOPE("lorahub::slot_mix");
      const std::vector<float> w(mix.weights.begin(), mix.weights.end());
      RunSliceSums(slots_[slot].mix_plan.sums, mix.flats, w);
    }
    slots_[slot].sites = slots_[slot].mix_plan.sites;
    ++mix_loads_;
    if (int8_) {
      RECORD_USER_SCOPE("lorahub::slot_int8");
      Quantize(slot);
    }
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("slot bank: ", e.what_without_backtrace()));
  }
}

bool SlotBank::MixPlanFits(int64_t slot, const LoraAdapter& first) const {
  const MixPlan& plan = slots_[slot].mix_plan;
  if (plan.layout != layout_ || plan.sites.size() != first.sites.size()) return false;
  for (size_t i = 0; i < first.sites.size(); ++i) {
    const LoraSite& s = first.sites[i];
    if (s.site != plan.sites[i] || s.a.size(0) != plan.ranks[i] ||
        s.scaling != plan.scaling[i]) {
      return false;
    }
  }
  return true;
}

bool SlotBank::PlanMix(int64_t slot, const LoraAdapter& first) {
  MixPlan& plan = slots_[slot].mix_plan;
  plan = MixPlan();
  std::vector<SliceSum> sums;
  std::vector<bool> adapted(bank_.sites.size(), false);
  auto fill = [&sums](const at::Tensor& dst, double value) {
    SliceSum sum;
    sum.dst = dst;
    sum.summed = false;
    sum.fill = static_cast<float>(value);
    sums.push_back(std::move(sum));
  };
  // The modules' buffers hold each site's a, then its b, in site order
  // (FlatFactors); the slot's copies in the decode kernels' dtype read the
  // same elements.
  int64_t offset = 0;
  for (const LoraSite& s : first.sites) {
    const SiteBank& sb = bank_.sites[s.site];
    if (s.a.size(0) != sb.a.size(1)) return false;
    const int64_t a_at = offset, b_at = offset + s.a.numel();
    offset = b_at + s.b.numel();
    for (const auto& [factor, from] : {std::pair{&sb.a, a_at}, std::pair{&sb.b, b_at},
                                     std::pair{&sb.a_low, a_at}, std::pair{&sb.b_low, b_at}}) {
      if (factor->defined()) sums.push_back(SliceSum{SlotView(*factor, slot), from});
    }
    fill(SlotView(sb.scale, slot), s.scaling);
    adapted[s.site] = true;
    plan.sites.push_back(s.site);
    plan.ranks.push_back(s.a.size(0));
    plan.scaling.push_back(s.scaling);
  }
  ForEachUnadapted(bank_, slot, adapted, [&](const at::Tensor& t) { fill(t, 0.0); });
  plan.sums = PlanSliceSums(std::move(sums));
  plan.layout = layout_;
  return true;
}

void SlotBank::Release(int64_t slot) {
  if (slot < 0 || slot >= capacity() || slots_[slot].users == 0) return;
  if (--slots_[slot].users == 0) {
    slots_[slot].released_at = ++clock_;
    CountSites(slots_[slot], -1);
  }
}

std::vector<int> SlotBank::SitesAllocatedWith(int site) const {
  // Sites whose A factors lie side by side in every slot, [n, 2, r, in], so
  // that the run kernels shrink both in one pass (projection.cc AdjacentA),
  // as the composed banks lay them:
  // - a block's self-attention q and v (slots 0 and 2 of its sites): a
  //   decode step's one shrink fused into the norm (t5_forward.cc ShrinkRun)
  //   and an admission's packed encoder pass (PackedLoraDeltas);
  // - the cross-attention v (slot 6) of decoder blocks 2k and 2k + 1: an
  //   admission's cross keys and values (CrossKeyValues), 12 run launches
  //   instead of 24 on flan-t5-large.
  // LORAHUB_SLOT_SEPARATE_SITES=1 (read once; A/B): every site alone;
  // LORAHUB_SLOT_STEP_PAIRS_ONLY=1: only the decoder's q and v (the
  // sixty-ninth session's layout).
  static const bool separate = EnvFlag("LORAHUB_SLOT_SEPARATE_SITES");
  static const bool step_pairs_only = EnvFlag("LORAHUB_SLOT_STEP_PAIRS_ONLY");
  const int block = site / kSitesPerBlock, member = site % kSitesPerBlock;
  const int encoder_blocks = base_.config.num_layers;
  std::vector<int> group = {site};
  if (separate) return group;
  if (member == 0 || member == 2) {
    if (step_pairs_only && block < encoder_blocks) return group;
    group = {block * kSitesPerBlock, block * kSitesPerBlock + 2};
  } else if (member == 6 && block >= encoder_blocks && !step_pairs_only) {
    const int first = encoder_blocks + (block - encoder_blocks) / 2 * 2;
    if (first + 1 >= encoder_blocks + base_.config.num_decoder_layers) return group;
    group = {first * kSitesPerBlock + 6, (first + 1) * kSitesPerBlock + 6};
  } else {
    return group;
  }
  if (base_.site_shape[group[0]] != base_.site_shape[group[1]]) return {site};
  return group;
}

void SlotBank::Reserve(int site, int64_t r) {
  if (bank_.sites[site].a.defined() && bank_.sites[site].a.size(1) >= r) return;
  const std::vector<int> group = SitesAllocatedWith(site);
  int64_t have = 0;  // the group's rank (they are allocated together)
  for (int g : group) {
    if (bank_.sites[g].a.defined()) have = std::max(have, bank_.sites[g].a.size(1));
  }
  if (have > 0 && r <= have) return;
  if (before_reallocation_) before_reallocation_();
  r = std::max(r, have);
  const auto [out, in] = base_.site_shape[site];
  const int64_t n = capacity();
  const auto k = static_cast<int64_t>(group.size());
  auto opts = at::TensorOptions().dtype(at::kFloat).device(base_.device);
  // Zero-padded ranks do not change B A.
  at::Tensor a = at::zeros({n, k, r, in}, opts);
  at::Tensor a8 = int8_ ? at::zeros({n, k, r, in}, opts.dtype(at::kChar)) : at::Tensor();
  for (int64_t i = 0; i < k; ++i) {
    SiteBank& sb = bank_.sites[group[i]];
    at::Tensor b = at::zeros({n, out, r}, opts);
    if (sb.a.defined()) {
      a.select(1, i).narrow(1, 0, sb.a.size(1)).copy_(sb.a);
      b.narrow(2, 0, sb.b.size(2)).copy_(sb.b);
    } else {
      sb.scale = at::zeros({n, 1, 1}, opts);
    }
    sb.a = a.select(1, i);
    sb.b = std::move(b);
    if (int8_) {  // Load keeps them in step with a and b
      sb.a_int8 = a8.select(1, i);
      sb.b_int8 = at::zeros({n, out, r}, opts.dtype(at::kChar));
      sb.scale_int8 = at::zeros({n, 1, 1}, opts);
    }
  }
  if (low_dtype_ != at::kFloat) {  // Load keeps them in step with a and b
    const at::Tensor a_low = a.to(low_dtype_);
    for (int64_t i = 0; i < k; ++i) {
      SiteBank& sb = bank_.sites[group[i]];
      sb.a_low = a_low.select(1, i);
      sb.b_low = sb.b.to(low_dtype_);
    }
  }
  for (int g : group) {  // the new tensors for slots with users
    if (site_users_[g] > 0) active_.sites[g] = bank_.sites[g];
  }
  // Every plan's views are of the old layout (and would keep its memory).
  ++layout_;
  for (Slot& s : slots_) {
    s.plan = LoadPlan();
    s.mix_plan = MixPlan();
    s.int8_plan = Int8QuantizationPlan();
  }
  if (int8_ && have > 0) {  // the resident slots' factors, zero-padded
    std::vector<Int8Quantization> jobs;
    for (int g : group) {
      for (int64_t slot = 0; slot < n; ++slot) {
        jobs.push_back(SlotInt8Quantization(bank_.sites[g], slot));
      }
    }
    QuantizeFactorsInt8(std::move(jobs));
  }
}

bool SlotBank::LoadPlanned(int64_t slot, const LoraAdapter& adapter) {
  LoadPlan& plan = slots_[slot].plan;
  if (plan.layout != layout_ || plan.sites.size() != adapter.sites.size()) return false;
  const size_t per_site = plan.low ? 5 : 3;  // a, b, [a_low, b_low], scale
  for (size_t i = 0; i < adapter.sites.size(); ++i) {
    const LoraSite& s = adapter.sites[i];
    const WeightedSum& a = plan.sums[i * per_site];
    const WeightedSum& b = plan.sums[i * per_site + 1];
    if (s.site != plan.sites[i] || s.a.sizes() != a.dst.sizes() ||
        s.b.sizes() != b.dst.sizes() || !Summable(s.a) || !Summable(s.b)) {
      return false;
    }
  }
  for (size_t i = 0; i < adapter.sites.size(); ++i) {
    const LoraSite& s = adapter.sites[i];
    WeightedSum* sum = &plan.sums[i * per_site];
    sum[0].terms[0] = s.a;
    sum[1].terms[0] = s.b;
    if (plan.low) {
      sum[2].terms[0] = s.a;
      sum[3].terms[0] = s.b;
    }
    sum[per_site - 1].fill = static_cast<float>(s.scaling);
  }
  WeightedSums(plan.sums);
  // The sources are the adapter's: not held past the load.
  for (size_t i = 0; i < adapter.sites.size(); ++i) {
    for (size_t k = 0; k + 1 < per_site; ++k) {
      plan.sums[i * per_site + k].terms[0] = at::Tensor();
    }
  }
  slots_[slot].sites = plan.sites;
  ++planned_copies_;
  return true;
}

bool SlotBank::Summable(const at::Tensor& t) const {
  return t.device() == base_.device && t.is_contiguous() &&
         (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
}

void SlotBank::Load(int64_t slot, const LoraAdapter& adapter) {
  // Profiler scopes (deploy/gpu/serve_trace.py's tables of a slot load).
  {
    RECORD_USER_SCOPE("lorahub::slot_factors");
    LoadFactors(slot, adapter);
  }
  if (int8_) {
    RECORD_USER_SCOPE("lorahub::slot_int8");
    Quantize(slot);
  }
}

void SlotBank::Quantize(int64_t slot) {
  Slot& s = slots_[slot];
  if (s.int8_layout != layout_) {
    std::vector<Int8Quantization> jobs;
    for (const SiteBank& sb : bank_.sites) {
      if (sb.a_int8.defined()) jobs.push_back(SlotInt8Quantization(sb, slot));
    }
    s.int8_plan = PlanInt8Quantization(std::move(jobs));
    s.int8_layout = layout_;
  }
  RunInt8Quantization(s.int8_plan);
}

void SlotBank::LoadFactors(int64_t slot, const LoraAdapter& adapter) {
  for (const LoraSite& s : adapter.sites) Reserve(s.site, s.a.size(0));
  // LORAHUB_NO_SLOT_PLAN=1 (read once): every load makes its sums (A/B).
  static const bool no_plan = EnvFlag("LORAHUB_NO_SLOT_PLAN");
  if (!no_plan && LoadPlanned(slot, adapter)) return;
  std::vector<bool> adapted(bank_.sites.size(), false);
  std::vector<int>& sites = slots_[slot].sites;
  sites.clear();
  LoadPlan& plan = slots_[slot].plan;
  plan.layout = -1;
  bool plannable = true;  // every site copied by whole-tensor sums
  // Every copy and fill below, as one WeightedSums call (one kernel on CUDA).
  std::vector<WeightedSum> sums;
  auto copy = [&sums](const at::Tensor& dst, const at::Tensor& src) {
    WeightedSum sum;
    sum.dst = dst;
    sum.terms = {src};
    sum.weights = {1.f};
    sums.push_back(std::move(sum));
  };
  auto fill = [&sums](const at::Tensor& dst, double value) {
    WeightedSum sum;
    sum.dst = dst;
    sum.fill = static_cast<float>(value);
    sums.push_back(std::move(sum));
  };
  for (const LoraSite& s : adapter.sites) {
    SiteBank& sb = bank_.sites[s.site];
    const int64_t r = s.a.size(0);
    const int64_t rank = sb.a.size(1);
    at::Tensor a = SlotView(sb.a, slot);
    at::Tensor b = SlotView(sb.b, slot);
    if (r == rank && Summable(s.a) && Summable(s.b)) {
      copy(a, s.a);
      copy(b, s.b);
      if (sb.a_low.defined()) {
        copy(SlotView(sb.a_low, slot), s.a);
        copy(SlotView(sb.b_low, slot), s.b);
      }
    } else {  // a smaller rank (zero-padded) or factors elsewhere: ATen ops
      plannable = false;
      a.narrow(0, 0, r).copy_(s.a);
      b.narrow(1, 0, r).copy_(s.b);
      if (r < rank) {
        a.narrow(0, r, rank - r).zero_();
        b.narrow(1, r, rank - r).zero_();
      }
      if (sb.a_low.defined()) {
        SlotView(sb.a_low, slot).copy_(a);
        SlotView(sb.b_low, slot).copy_(b);
      }
    }
    fill(SlotView(sb.scale, slot), s.scaling);
    adapted[s.site] = true;
    sites.push_back(s.site);
  }
  ForEachUnadapted(bank_, slot, adapted, [&](const at::Tensor& t) { fill(t, 0.0); });
  WeightedSums(sums);
  const bool low = !adapter.sites.empty() && bank_.sites[adapter.sites[0].site].a_low.defined();
  for (const LoraSite& s : adapter.sites) {
    plannable &= bank_.sites[s.site].a_low.defined() == low;
  }
  if (!plannable) return;
  for (WeightedSum& sum : sums) {
    if (!sum.terms.empty()) sum.terms[0] = at::Tensor();  // not held past the load
  }
  plan.layout = layout_;
  plan.sites = sites;
  plan.sums = std::move(sums);
  plan.low = low;
}

void SlotBank::CountSites(const Slot& slot, int delta) {
  for (int site : slot.sites) {
    int& n = site_users_[site];
    const bool was_used = n > 0;
    n += delta;
    if ((n > 0) != was_used) active_.sites[site] = n > 0 ? bank_.sites[site] : SiteBank();
  }
}

}  // namespace lorahub::model
