#include "core/model/lora.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <regex>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/model/fused_ops.h"
#include "core/model/host_upload.h"

namespace lorahub::model {
namespace {

constexpr char kPrefix[] = "base_model.model.";
constexpr char kSuffixA[] = ".lora_A.weight";
constexpr char kSuffixB[] = ".lora_B.weight";

// PEFT's target rule: a regex string must match the whole name; a list entry
// matches when equal to the name or a suffix after a dot. An empty list means
// PEFT's T5 default ["q", "v"].
absl::StatusOr<bool> Targeted(const config::LoraConfig& c,
                              const std::string& module) {
  if (c.target_modules_regex.has_value()) {
    try {
      return std::regex_match(module, std::regex(*c.target_modules_regex));
    } catch (const std::regex_error&) {
      return absl::InvalidArgumentError(absl::StrCat(
          "target_modules regex '", *c.target_modules_regex, "' is invalid"));
    }
  }
  std::vector<std::string> targets = c.target_modules;
  if (targets.empty()) targets = {"q", "v"};
  for (const std::string& t : targets) {
    if (module == t || absl::EndsWith(module, "." + t)) return true;
  }
  return false;
}

// PEFT's get_pattern_key: the first key K with re.match("(.*\.)?(K)$", name).
template <typename V>
absl::StatusOr<V> PatternValue(const std::vector<std::pair<std::string, V>>& p,
                               const std::string& module, V fallback) {
  for (const auto& [key, value] : p) {
    try {
      if (std::regex_match(module, std::regex("(.*\\.)?(" + key + ")"))) {
        return value;
      }
    } catch (const std::regex_error&) {
      return absl::InvalidArgumentError(
          absl::StrCat("pattern key '", key, "' is not a valid regex"));
    }
  }
  return fallback;
}

std::string Shape(const at::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes().vec(), ","), "]");
}

}  // namespace

absl::StatusOr<LoraAdapter> BuildLoraAdapter(const T5Weights& base,
                                             const config::LoraConfig& config,
                                             const io::TensorMap& tensors,
                                             const std::string& source) {
  try {
    std::map<std::string, std::pair<at::Tensor, at::Tensor>> modules;
    for (const auto& [key, host] : tensors) {
      bool is_a = absl::EndsWith(key, kSuffixA);
      bool is_b = absl::EndsWith(key, kSuffixB);
      if (!absl::StartsWith(key, kPrefix) || (!is_a && !is_b)) {
        return absl::InvalidArgumentError(absl::StrCat(
            source, ": unexpected tensor '", key,
            "' (want base_model.model.<module>.lora_{A,B}.weight)"));
      }
      std::string module =
          key.substr(sizeof(kPrefix) - 1, key.size() - (sizeof(kPrefix) - 1) -
                                              (sizeof(kSuffixA) - 1));
      auto site = base.site_by_name.find(module);
      if (site == base.site_by_name.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": tensor '", key,
                         "': the base model has no module '", module, "'"));
      }
      auto targeted = Targeted(config, module);
      if (!targeted.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": ", targeted.status().message()));
      }
      if (!*targeted) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": tensor '", key, "': module '", module,
                         "' is not selected by target_modules"));
      }
      if (host.shape.size() != 2) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": tensor '", key, "' is not 2-D"));
      }
      auto t = HostToTensor(host, absl::StrCat(source, ": ", key));
      if (!t.ok()) return t.status();
      if (!t->is_floating_point()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": tensor '", key, "' is not floating point"));
      }
      (is_a ? modules[module].first : modules[module].second) = *t;
    }
    LoraAdapter adapter;
    adapter.name = source;
    for (auto& [module, ab] : modules) {
      const std::string key_a = absl::StrCat(kPrefix, module, kSuffixA);
      const std::string key_b = absl::StrCat(kPrefix, module, kSuffixB);
      if (!ab.first.defined() || !ab.second.defined()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": missing tensor '",
                         ab.first.defined() ? key_b : key_a, "'"));
      }
      const int site = base.site_by_name.at(module);
      const auto [out, in] = base.site_shape[site];
      auto rank = PatternValue<int>(config.rank_pattern, module, config.r);
      if (!rank.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": rank_pattern ", rank.status().message()));
      }
      auto alpha =
          PatternValue<double>(config.alpha_pattern, module, config.lora_alpha);
      if (!alpha.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": alpha_pattern ", alpha.status().message()));
      }
      if (ab.first.size(0) != *rank || ab.first.size(1) != in) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": tensor '", key_a, "' has shape ",
                         Shape(ab.first), ", expected [", *rank, ",", in, "]"));
      }
      if (ab.second.size(0) != out || ab.second.size(1) != *rank) {
        return absl::InvalidArgumentError(absl::StrCat(
            source, ": tensor '", key_b, "' has shape ", Shape(ab.second),
            ", expected [", out, ",", *rank, "]"));
      }
      LoraSite s;
      s.site = site;
      // LoRA factors stay fp32 whatever the compute dtype, as PEFT keeps
      // them (the delta is computed in fp32 and added before rounding).
      s.a = ab.first.to(base.device, at::kFloat).contiguous();
      s.b = ab.second.to(base.device, at::kFloat).contiguous();
      s.scaling = config.use_rslora ? *alpha / std::sqrt(double(*rank))
                                    : *alpha / *rank;
      adapter.sites.push_back(std::move(s));
    }
    // Every targeted module must be present.
    for (const auto& [module, site] : base.site_by_name) {
      auto targeted = Targeted(config, module);
      if (!targeted.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": ", targeted.status().message()));
      }
      if (*targeted && !modules.count(module)) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": missing tensor '", kPrefix, module,
                         kSuffixA, "' (module selected by target_modules)"));
      }
    }
    if (adapter.sites.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": adapter has no tensors"));
    }
    std::sort(
        adapter.sites.begin(), adapter.sites.end(),
        [](const LoraSite& x, const LoraSite& y) { return x.site < y.site; });
    return adapter;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat(source, ": ", e.what_without_backtrace()));
  }
}

absl::StatusOr<AdapterBank> MakeAdapterBank(
    const T5Weights& base, const std::vector<const LoraAdapter*>& adapters) {
  try {
    AdapterBank bank;
    const int64_t S = static_cast<int64_t>(adapters.size());
    bank.num_slots = static_cast<int>(S);
    bank.sites.resize(base.num_sites);
    // Per site: the largest rank among slots.
    std::vector<int64_t> rank(base.num_sites, 0);
    for (const LoraAdapter* ad : adapters) {
      if (!ad) continue;
      for (const LoraSite& s : ad->sites) {
        if (s.site < 0 || s.site >= base.num_sites) {
          return absl::InvalidArgumentError("adapter site out of range");
        }
        rank[s.site] = std::max(rank[s.site], s.a.size(0));
      }
    }
    auto opts = at::TensorOptions().dtype(at::kFloat).device(base.device);
    for (int site = 0; site < base.num_sites; ++site) {
      if (rank[site] == 0) continue;
      const auto [out, in] = base.site_shape[site];
      SiteBank& sb = bank.sites[site];
      sb.a = at::zeros({S, rank[site], in}, opts);
      sb.b = at::zeros({S, out, rank[site]}, opts);
      sb.scale = at::zeros({S, 1, 1}, opts);
    }
    for (int64_t slot = 0; slot < S; ++slot) {
      if (!adapters[slot]) continue;
      for (const LoraSite& s : adapters[slot]->sites) {
        SiteBank& sb = bank.sites[s.site];
        const int64_t r = s.a.size(0);
        sb.a[slot].narrow(0, 0, r).copy_(s.a);
        sb.b[slot].narrow(1, 0, r).copy_(s.b);
        sb.scale[slot].fill_(s.scaling);
      }
    }
    // A site's common scale: every slot adapts it, with one scaling.
    for (int site = 0; site < base.num_sites; ++site) {
      if (rank[site] == 0) continue;
      double common = std::numeric_limits<double>::quiet_NaN();
      bool same = true;
      for (int64_t slot = 0; slot < S && same; ++slot) {
        const LoraSite* found = nullptr;
        if (adapters[slot]) {
          for (const LoraSite& s : adapters[slot]->sites) {
            if (s.site == site) found = &s;
          }
        }
        if (found == nullptr || (slot > 0 && found->scaling != common)) {
          same = false;
        } else {
          common = found->scaling;
        }
      }
      if (same) bank.sites[site].common_scale = common;
    }
    return bank;
  } catch (const c10::Error& e) {
    return absl::InternalError(e.what_without_backtrace());
  }
}

absl::StatusOr<RowAdapters> MakeRowAdapters(const T5Weights& base,
                                            const AdapterBank* bank,
                                            const std::vector<int64_t>& slots) {
  RowAdapters rows;
  bool any = false, all = !slots.empty();
  for (int64_t s : slots) {
    if (s < -1 || (bank != nullptr && s >= bank->num_slots) ||
        (bank == nullptr && s != -1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter slot ", s, " out of range"));
    }
    any |= s >= 0;
    all &= s >= 0;
  }
  if (bank == nullptr || bank->num_slots == 0 || !any) return rows;
  try {
    rows.bank = bank;
    const int64_t n = static_cast<int64_t>(slots.size());
    at::Tensor clamped = HostStaging({n}, at::kLong, base.device);
    at::Tensor mask = HostStaging({n, 1, 1}, at::kFloat, base.device);
    int64_t* c = clamped.data_ptr<int64_t>();
    float* m = mask.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      c[i] = std::max<int64_t>(slots[i], 0);
      m[i] = slots[i] >= 0 ? 1.f : 0.f;
    }
    rows.slots = Upload(clamped, base.device);
    rows.mask = Upload(mask, base.device);
    rows.all_rows = all;
    rows.uniform_slot = slots[0];
    for (int64_t s : slots) {
      if (s != slots[0]) rows.uniform_slot = -1;
    }
    // Runs of equal length of consecutive slots: slots[i] = first + i / run.
    if (all && rows.uniform_slot < 0) {
      int64_t run = 1;
      while (run < n && slots[run] == slots[0]) ++run;
      bool runs = n % run == 0 && slots[0] + n / run <= bank->num_slots;
      for (int64_t i = 0; i < n && runs; ++i) {
        runs = slots[i] == slots[0] + i / run;
      }
      if (runs) {
        rows.rows_per_slot = run;
        rows.slot_offset = slots[0];
      }
    }
    return rows;
  } catch (const c10::Error& e) {
    return absl::InternalError(e.what_without_backtrace());
  }
}

RowAdapters SelectRows(const RowAdapters& rows, const at::Tensor& index) {
  if (rows.bank == nullptr) return rows;
  RowAdapters out = rows;
  out.slots = rows.slots.index_select(0, index);
  out.mask = rows.mask.index_select(0, index);
  out.rows_per_slot = 0;  // the runs do not survive a reordering
  return out;  // uniform_slot is unchanged by any row selection
}

absl::StatusOr<T5Weights> CopyAdaptedWeights(const T5Weights& base,
                                             const std::set<int>& sites) {
  try {
    T5Weights copy = base;
    auto adapted = [&](const Linear& linear) {
      return linear.site >= 0 && sites.count(linear.site) > 0;
    };
    // A fused tensor with an adapted member gets a copy, and its members become views of
    // the copy, so that writes through them reach the fused GEMMs.
    std::set<const Linear*> done;
    auto unshare = [&done](at::Tensor& fused, const std::vector<Linear*>& members) {
      fused = fused.clone();
      int64_t row = 0;
      for (Linear* m : members) {
        const int64_t n = m->weight.size(0);
        m->weight = fused.narrow(0, row, n);
        row += n;
        done.insert(m);
      }
    };
    std::vector<Linear*> cross_members;
    bool cross_adapted = false;
    for (BlockWeights& b : copy.decoder) {
      cross_members.push_back(&b.cross_attn.k);
      cross_members.push_back(&b.cross_attn.v);
      cross_adapted = cross_adapted || adapted(b.cross_attn.k) || adapted(b.cross_attn.v);
    }
    if (cross_adapted && FusedCrossKv(copy)) unshare(copy.cross_kv, cross_members);
    for (auto* stack : {&copy.encoder, &copy.decoder}) {
      for (BlockWeights& b : *stack) {
        AttentionWeights& a = b.self_attn;
        if ((adapted(a.q) || adapted(a.k) || adapted(a.v)) && FusedQkv(a)) {
          unshare(a.qkv, {&a.q, &a.k, &a.v});
        }
        FeedForwardWeights& ff = b.ff;
        if ((adapted(ff.wi_0) || adapted(ff.wi_1)) && FusedWi01(ff)) {
          unshare(ff.wi_01, {&ff.wi_0, &ff.wi_1});
        }
      }
    }
    for (int site : sites) {
      Linear* linear = SiteLinear(copy, site);
      if (linear == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("no linear layer at site ", site));
      }
      if (done.count(linear) == 0) linear->weight = linear->weight.clone();
    }
    return copy;
  } catch (const c10::Error& e) {
    return absl::InternalError(e.what_without_backtrace());
  }
}

absl::StatusOr<T5Weights> MergeAdapter(const T5Weights& base,
                                       const LoraAdapter& adapter) {
  std::set<int> sites;
  for (const LoraSite& s : adapter.sites) sites.insert(s.site);
  absl::StatusOr<T5Weights> merged = CopyAdaptedWeights(base, sites);
  if (!merged.ok()) return merged.status();
  try {
    for (const LoraSite& s : adapter.sites) {
      at::Tensor& weight = SiteLinear(*merged, s.site)->weight;
      at::Tensor delta = at::matmul(s.b.to(at::kFloat), s.a.to(at::kFloat));
      weight.copy_(weight.to(at::kFloat) + delta * s.scaling);
    }
    return merged;
  } catch (const c10::Error& e) {
    return absl::InternalError(e.what_without_backtrace());
  }
}

absl::Status CheckStackable(const T5Weights& base,
                            const std::vector<const LoraAdapter*>& modules) {
  if (modules.empty() || modules[0] == nullptr) {
    return absl::InvalidArgumentError("no modules to stack");
  }
  const LoraAdapter& first = *modules[0];
  for (size_t m = 1; m < modules.size(); ++m) {
    if (modules[m] == nullptr) return absl::InvalidArgumentError("null module");
    const LoraAdapter& other = *modules[m];
    if (other.sites.size() != first.sites.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          other.name, ": adapts ", other.sites.size(), " modules, but ",
          first.name, " adapts ", first.sites.size()));
    }
    for (size_t i = 0; i < first.sites.size(); ++i) {
      const LoraSite& x = first.sites[i];
      const LoraSite& y = other.sites[i];
      if (x.site != y.site) {
        return absl::InvalidArgumentError(absl::StrCat(
            other.name, ": module '", SiteName(base, y.site), "' differs from ",
            first.name, "'s '", SiteName(base, x.site), "'"));
      }
      if (x.a.size(0) != y.a.size(0)) {
        return absl::InvalidArgumentError(absl::StrCat(
            other.name, ": module '", SiteName(base, y.site), "' has rank ",
            y.a.size(0), ", but ", first.name, " has rank ", x.a.size(0)));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ModuleStack> StackModules(
    const T5Weights& base, const std::vector<const LoraAdapter*>& modules) {
  if (absl::Status s = CheckStackable(base, modules); !s.ok()) return s;
  const LoraAdapter& first = *modules[0];
  try {
    ModuleStack stack;
    stack.num_modules = static_cast<int>(modules.size());
    stack.num_base_sites = base.num_sites;
    stack.num_encoder_layers = base.config.num_layers;
    const int64_t N = stack.num_modules;
    std::map<std::tuple<int64_t, int64_t, int64_t>, std::vector<size_t>> by_shape;
    for (size_t i = 0; i < first.sites.size(); ++i) {
      stack.sites.push_back(first.sites[i].site);
      stack.scaling.push_back(first.sites[i].scaling);
      const at::Tensor& a = first.sites[i].a;  // [r, in]
      const at::Tensor& b = first.sites[i].b;  // [out, r]
      by_shape[{a.size(0), a.size(1), b.size(0)}].push_back(i);
    }
    stack.a.resize(stack.sites.size());
    stack.b.resize(stack.sites.size());
    for (auto& [shape, entries] : by_shape) {
      ModuleStack::Group g;
      std::tie(g.r, g.in, g.out) = shape;
      g.entries = entries;
      std::stable_partition(g.entries.begin(), g.entries.end(), [&](size_t i) {
        return !IsCrossKeyValueSite(stack.sites[i], stack.num_encoder_layers);
      });
      const int64_t k = static_cast<int64_t>(g.entries.size());
      const int64_t a_len = g.r * g.in;
      const int64_t b_len = g.out * g.r;
      std::vector<at::Tensor> parts;  // [N, a_len] each, then [N, b_len] each
      for (int pass = 0; pass < 2; ++pass) {
        for (size_t i : g.entries) {
          std::vector<at::Tensor> per_module;
          for (const LoraAdapter* m : modules) {
            const at::Tensor& f = pass == 0 ? m->sites[i].a : m->sites[i].b;
            per_module.push_back(f.reshape({1, -1}).to(at::kFloat));
          }
          parts.push_back(at::cat(per_module, 0));
        }
      }
      g.factors = at::cat(parts, 1);  // [N, k * (a_len + b_len)]
      for (int64_t j = 0; j < k; ++j) {
        const size_t i = g.entries[j];
        stack.a[i] = g.factors.narrow(1, j * a_len, a_len).view({N, g.r, g.in});
        stack.b[i] =
            g.factors.narrow(1, k * a_len + j * b_len, b_len).view({N, g.out, g.r});
      }
      stack.groups.push_back(std::move(g));
    }
    return stack;
  } catch (const c10::Error& e) {
    return absl::InternalError(e.what_without_backtrace());
  }
}

absl::StatusOr<ComposedAdapters> ComposeLoraHub(const ModuleStack& stack,
                                                const at::Tensor& weights) {
  if (weights.dim() != 2 || weights.size(1) != stack.num_modules) {
    return absl::InvalidArgumentError(absl::StrCat(
        "composition weights must be [C, ", stack.num_modules, "]"));
  }
  try {
    ComposedAdapters bank;
    const int64_t C = weights.size(0);
    bank.num_slots = static_cast<int>(C);
    bank.sites.resize(stack.num_base_sites);
    if (stack.groups.empty()) return bank;
    const c10::Device device = stack.groups[0].factors.device();
    at::Tensor w = weights.to(device, at::kFloat);
    std::map<double, at::Tensor> scales;  // one [C, 1, 1] tensor per scaling value
    for (const ModuleStack::Group& g : stack.groups) {
      // [C, k * (a_len + b_len)]. Populations through the composition
      // kernel; one candidate keeps cuBLAS's gemv, which reads the factors
      // at about HBM's rate already (as ObjectiveRunner::Compose).
      at::Tensor composed = at::empty({C, g.factors.size(1)}, g.factors.options());
      if (C < 2 || !ComposeRows(w, g.factors, composed)) at::mm_out(composed, w, g.factors);
      const int64_t k = static_cast<int64_t>(g.entries.size());
      const int64_t a_len = g.r * g.in;
      const int64_t b_len = g.out * g.r;
      for (int64_t j = 0; j < k; ++j) {
        const size_t i = g.entries[j];
        SiteBank& sb = bank.sites[stack.sites[i]];
        sb.a = composed.narrow(1, j * a_len, a_len).view({C, g.r, g.in});
        sb.b = composed.narrow(1, k * a_len + j * b_len, b_len).view({C, g.out, g.r});
        at::Tensor& scale = scales[stack.scaling[i]];
        if (!scale.defined()) {
          scale = at::full({C, 1, 1}, stack.scaling[i],
                           at::TensorOptions().dtype(at::kFloat).device(device));
        }
        sb.scale = scale;
        sb.common_scale = stack.scaling[i];
      }
    }
    return bank;
  } catch (const c10::Error& e) {
    return absl::InternalError(e.what_without_backtrace());
  }
}

namespace {

// Copies of whole factor storages, each made once by `make` (from the
// storage's elements as one flat tensor), and views into them with a
// factor's sizes, strides and offset: factors that lie side by side in one
// storage (composed A factors) stay so in their copies.
class StorageCopies {
 public:
  explicit StorageCopies(std::function<at::Tensor(const at::Tensor&)> make)
      : make_(std::move(make)) {}
  at::Tensor Of(const at::Tensor& t) {
    at::Tensor& flat = copies_[t.storage().data()];
    if (!flat.defined()) {
      const int64_t n = static_cast<int64_t>(t.storage().nbytes()) / t.element_size();
      flat = make_(t.as_strided({n}, {1}, 0));
    }
    return flat.as_strided(t.sizes(), t.strides(), t.storage_offset());
  }

 private:
  std::function<at::Tensor(const at::Tensor&)> make_;
  std::map<const void*, at::Tensor> copies_;
};

}  // namespace

at::Tensor SlotView(const at::Tensor& t, int64_t slot) {
  return t.as_strided(t.sizes().slice(1), t.strides().slice(1),
                      t.storage_offset() + slot * t.stride(0));
}

absl::Status AttachRowKernelCopies(AdapterBank* bank, at::ScalarType dtype) {
  if (bank == nullptr) return absl::InvalidArgumentError("no bank");
  try {
    StorageCopies converted(
        [dtype](const at::Tensor& flat) { return flat.to(dtype).contiguous(); });
    for (SiteBank& sb : bank->sites) {
      if (!sb.a.defined()) continue;
      if (dtype == at::kFloat) {
        sb.a_low = sb.b_low = at::Tensor();
        continue;
      }
      sb.a_low = sb.a.scalar_type() == dtype ? sb.a : converted.Of(sb.a);
      sb.b_low = sb.b.scalar_type() == dtype ? sb.b : converted.Of(sb.b);
    }
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(e.what_without_backtrace());
  }
}

Int8Quantization SlotInt8Quantization(const SiteBank& sb, int64_t slot) {
  return {SlotView(sb.a, slot),       SlotView(sb.b, slot),
          SlotView(sb.a_int8, slot),  SlotView(sb.b_int8, slot),
          SlotView(sb.scale, slot).view({1}), SlotView(sb.scale_int8, slot).view({1})};
}

absl::Status AttachStepInt8Copies(AdapterBank* bank) {
  if (bank == nullptr) return absl::InvalidArgumentError("no bank");
  auto slot_blocks_contiguous = [](const at::Tensor& t) {
    return t.dim() == 3 && t.stride(2) == 1 && t.stride(1) == t.size(2);
  };
  for (const SiteBank& sb : bank->sites) {
    if (sb.a.defined() &&
        (!slot_blocks_contiguous(sb.a) || !slot_blocks_contiguous(sb.b) ||
         sb.a.scalar_type() != at::kFloat || sb.b.scalar_type() != at::kFloat)) {
      return absl::InvalidArgumentError(
          "int8 step factors: each slot's fp32 factor blocks must be contiguous");
    }
  }
  try {
    StorageCopies int8_copies(
        [](const at::Tensor& flat) { return at::zeros_like(flat, at::kChar); });
    std::vector<Int8Quantization> jobs;
    for (SiteBank& sb : bank->sites) {
      if (!sb.a.defined()) continue;
      sb.a_int8 = int8_copies.Of(sb.a);
      sb.b_int8 = int8_copies.Of(sb.b);
      sb.scale_int8 = at::empty({sb.a.size(0), 1, 1}, sb.a.options());
      for (int64_t slot = 0; slot < sb.a.size(0); ++slot) {
        jobs.push_back(SlotInt8Quantization(sb, slot));
      }
    }
    QuantizeFactorsInt8(std::move(jobs));
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(e.what_without_backtrace());
  }
}

absl::StatusOr<LoraAdapter> ComposeOne(const ModuleStack& stack,
                                       const std::vector<double>& weights) {
  if (static_cast<int>(weights.size()) != stack.num_modules) {
    return absl::InvalidArgumentError(
        absl::StrCat("got ", weights.size(), " weights for ", stack.num_modules,
                     " modules"));
  }
  try {
    LoraAdapter adapter;
    adapter.name = "composed";
    adapter.sites.resize(stack.sites.size());
    if (stack.groups.empty()) return adapter;
    at::Tensor w = at::tensor(weights, at::kDouble)
                       .to(stack.groups[0].factors.device(), at::kFloat)
                       .view({1, -1});
    for (const ModuleStack::Group& g : stack.groups) {
      // One GEMM, then one as_strided view per factor: a few hundred host-side view ops are
      // most of this function's time on a GPU, so no intermediate bank of narrowed views.
      at::Tensor composed = at::mm(w, g.factors);  // [1, k * (a_len + b_len)]
      const int64_t k = static_cast<int64_t>(g.entries.size());
      const int64_t a_len = g.r * g.in;
      const int64_t b_len = g.out * g.r;
      for (int64_t j = 0; j < k; ++j) {
        const size_t i = g.entries[j];
        LoraSite& s = adapter.sites[i];
        s.site = stack.sites[i];
        s.a = composed.as_strided({g.r, g.in}, {g.in, 1}, j * a_len);
        s.b = composed.as_strided({g.out, g.r}, {g.r, 1}, k * a_len + j * b_len);
        s.scaling = stack.scaling[i];
      }
    }
    return adapter;
  } catch (const c10::Error& e) {
    return absl::InternalError(e.what_without_backtrace());
  }
}

at::Tensor FlatFactors(const LoraAdapter& m) {
  if (m.sites.empty()) return at::Tensor();
  const at::Tensor& first = m.sites[0].a;
  const c10::StorageImpl* storage = first.storage().unsafeGetStorageImpl();
  int64_t offset = 0;
  for (const LoraSite& s : m.sites) {
    for (const at::Tensor* f : {&s.a, &s.b}) {
      if (f->storage().unsafeGetStorageImpl() != storage || f->storage_offset() != offset ||
          !f->is_contiguous() || f->scalar_type() != first.scalar_type()) {
        return at::Tensor();
      }
      offset += f->numel();
    }
  }
  return first.as_strided({offset}, {1}, 0);
}

absl::StatusOr<LoraAdapter> ComposeLoraHubModules(
    const T5Weights& base, const std::vector<const LoraAdapter*>& modules,
    const std::vector<double>& weights) {
  if (absl::Status s = CheckStackable(base, modules); !s.ok()) return s;
  if (weights.size() != modules.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "got ", weights.size(), " weights for ", modules.size(), " modules"));
  }
  const LoraAdapter& first = *modules[0];
  try {
    int64_t total = 0;
    for (const LoraSite& site : first.sites) total += site.a.numel() + site.b.numel();
    LoraAdapter out;
    out.name = "composed";
    if (first.sites.empty()) return out;
    const at::Tensor flat =
        at::empty({total}, first.sites[0].a.options().dtype(at::kFloat));
    const std::vector<float> w(weights.begin(), weights.end());
    // Modules that each lie in one buffer with the output's layout (the module cache's):
    // one sum of whole buffers, the same arithmetic per element as a sum per factor.
    WeightedSum whole;
    whole.dst = flat;
    whole.weights = w;
    for (const LoraAdapter* m : modules) {
      at::Tensor t = FlatFactors(*m);
      if (!t.defined() || t.numel() != total || t.device() != flat.device() ||
          (t.scalar_type() != at::kFloat && t.scalar_type() != at::kBFloat16)) {
        whole.terms.clear();
        break;
      }
      whole.terms.push_back(std::move(t));
    }
    std::vector<WeightedSum> sums;
    sums.reserve(2 * first.sites.size());
    int64_t offset = 0;
    for (size_t i = 0; i < first.sites.size(); ++i) {
      LoraSite site;
      site.site = first.sites[i].site;
      site.scaling = first.sites[i].scaling;
      for (at::Tensor LoraSite::*factor : {&LoraSite::a, &LoraSite::b}) {
        const at::Tensor& shape = first.sites[i].*factor;
        at::Tensor dst = flat.as_strided(shape.sizes(), {shape.size(1), 1}, offset);
        offset += shape.numel();
        if (!whole.terms.empty()) {
          site.*factor = std::move(dst);
          continue;
        }
        WeightedSum sum;
        sum.weights = w;
        for (const LoraAdapter* m : modules) {
          at::Tensor t = m->sites[i].*factor;
          if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kBFloat16) {
            t = t.to(at::kFloat);
          }
          if (t.device() != flat.device()) t = t.to(flat.device());
          sum.terms.push_back(t.contiguous());
        }
        sum.dst = dst;
        site.*factor = std::move(dst);
        sums.push_back(std::move(sum));
      }
      out.sites.push_back(std::move(site));
    }
    if (!whole.terms.empty()) sums = {std::move(whole)};
    WeightedSums(sums);
    return out;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("composing modules: ", e.what_without_backtrace()));
  }
}

}  // namespace lorahub::model
