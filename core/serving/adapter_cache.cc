#include "core/serving/adapter_cache.h"

#include <cstring>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include "absl/strings/str_cat.h"
#include "core/model/fused_ops.h"
#include "core/model/loader.h"
#include "core/util/status_macros.h"

namespace lorahub::serving {
namespace {

// `a` with every factor copied into one new buffer (pinned host memory for
// `pinned`, where it can be had), the factors views into it. Why: a host
// tier module went to the device as 2 copies per site (flan-t5-large: 288
// synchronous copies from pageable memory); from one buffer it is one copy
// (ToDevice).
model::LoraAdapter Flattened(const model::LoraAdapter& a, bool pinned) {
  int64_t total = 0;
  for (const model::LoraSite& s : a.sites) {
    if (s.a.scalar_type() != a.sites[0].a.scalar_type() ||
        s.b.scalar_type() != a.sites[0].a.scalar_type()) {
      return a;  // mixed dtypes: as loaded
    }
    total += s.a.numel() + s.b.numel();
  }
  if (a.sites.empty()) return a;
  at::TensorOptions opts = a.sites[0].a.options().device(c10::kCPU);
  at::Tensor flat;
  if (pinned) {
    try {
      flat = at::empty({total}, opts.pinned_memory(true));
    } catch (const c10::Error&) {  // no CUDA runtime: pageable memory
    }
  }
  if (!flat.defined()) flat = at::empty({total}, opts);
  model::LoraAdapter out = a;
  int64_t offset = 0;
  for (model::LoraSite& s : out.sites) {
    for (at::Tensor* f : {&s.a, &s.b}) {
      at::Tensor view = flat.narrow(0, offset, f->numel()).view(f->sizes());
      view.copy_(*f);
      offset += f->numel();
      *f = std::move(view);
    }
  }
  return out;
}

// The adapter with its factors on `device`; on the same device the tensors
// are shared, not copied. Factors that are views into one contiguous
// buffer (Flattened) go in one copy of that buffer.
model::LoraAdapter ToDevice(const model::LoraAdapter& a, c10::Device device) {
  model::LoraAdapter out;
  out.name = a.name;
  out.sites.reserve(a.sites.size());
  const void* storage = a.sites.empty() ? nullptr : a.sites[0].a.storage().data();
  bool one_buffer = storage != nullptr;
  for (const model::LoraSite& s : a.sites) {
    one_buffer = one_buffer && s.a.storage().data() == storage &&
                 s.b.storage().data() == storage && s.a.is_contiguous() &&
                 s.b.is_contiguous() && s.b.scalar_type() == s.a.scalar_type() &&
                 s.a.scalar_type() == a.sites[0].a.scalar_type();
  }
  at::Tensor on_device;
  if (one_buffer) {  // on the same device: views of the same buffer
    const at::Tensor& first = a.sites[0].a;
    const int64_t n =
        static_cast<int64_t>(first.storage().nbytes()) / first.element_size();
    on_device = first.as_strided({n}, {1}, 0).to(device);
  }
  for (const model::LoraSite& s : a.sites) {
    model::LoraSite d = s;
    if (on_device.defined()) {
      d.a = on_device.as_strided(s.a.sizes(), s.a.strides(), s.a.storage_offset());
      d.b = on_device.as_strided(s.b.sizes(), s.b.strides(), s.b.storage_offset());
    } else {
      d.a = s.a.to(device);
      d.b = s.b.to(device);
    }
    out.sites.push_back(std::move(d));
  }
  return out;
}

}  // namespace

std::string ModuleContentKey(const ModuleLocation& loc) {
  return loc.weights_sha256.empty() ? absl::StrCat("dir:", loc.dir)
                                    : absl::StrCat("sha:", loc.weights_sha256);
}

AdapterCache::AdapterCache(const model::T5Weights* base,
                           ModuleResolver resolver,
                           std::shared_ptr<ModuleTier> host,
                           ModuleTierOptions device)
    : base_(base),
      resolver_(std::move(resolver)),
      host_(std::move(host)),
      device_(std::move(device)) {
  host_view_.config = base->config;
  host_view_.dtype = base->dtype;
  host_view_.device = c10::Device(c10::kCPU);
  host_view_.site_by_name = base->site_by_name;
  host_view_.num_sites = base->num_sites;
  host_view_.site_shape = base->site_shape;
}

absl::StatusOr<AdapterCache::Adapter> AdapterCache::HostModule(
    const std::string& id, const ModuleLocation& loc, const std::string& key) {
  if (host_) {
    if (Adapter hit = host_->Lookup(key)) return hit;
  }
  absl::StatusOr<model::LoraAdapter> loaded =
      model::LoadLoraAdapter(host_view_, loc.dir);
  if (!loaded.ok()) {
    return absl::Status(loaded.status().code(),
                        absl::StrCat("module '", id, "': ",
                                     loaded.status().message()));
  }
  loaded->name = id;
  auto adapter = std::make_shared<const model::LoraAdapter>(
      Flattened(*loaded, /*pinned=*/base_->device.is_cuda()));
  if (!host_) return adapter;
  return host_->Insert(key, std::move(adapter));
}

absl::StatusOr<AdapterCache::Adapter> AdapterCache::GetModule(
    const std::string& id) {
  LH_ASSIGN_OR_RETURN(ModuleLocation loc, resolver_(id));
  return ModuleAt(id, loc);
}

absl::StatusOr<AdapterCache::Adapter> AdapterCache::ModuleAt(const std::string& id,
                                                             const ModuleLocation& loc) {
  const std::string key = ModuleContentKey(loc);
  if (Adapter hit = device_.Lookup(key)) return hit;
  LH_ASSIGN_OR_RETURN(Adapter host, HostModule(id, loc, key));
  auto on_device =
      std::make_shared<const model::LoraAdapter>(ToDevice(*host, base_->device));
  host.reset();  // unpin the host entry before the device insert
  return device_.Insert(key, std::move(on_device));
}

bool AdapterCache::Resident(const std::string& key) const {
  return device_.Contains(key) || (host_ != nullptr && host_->Contains(key));
}
bool AdapterCache::InMemory(const std::string& id) const {
  absl::StatusOr<ModuleLocation> loc = resolver_(id);
  return !loc.ok() || Resident(ModuleContentKey(*loc));
}
absl::Status AdapterCache::Preload(const std::string& id) {
  if (!host_) return absl::OkStatus();
  LH_ASSIGN_OR_RETURN(ModuleLocation loc, resolver_(id));
  const std::string key = ModuleContentKey(loc);
  if (Resident(key)) return absl::OkStatus();
  return HostModule(id, loc, key).status();
}
absl::Status AdapterCache::WarmHost(const std::string& id) {
  if (!host_) return GetModule(id).status();
  LH_ASSIGN_OR_RETURN(ModuleLocation loc, resolver_(id));
  return HostModule(id, loc, ModuleContentKey(loc)).status();
}

bool AdapterCache::OnDevice(const ModuleLocation& location) const {
  return device_.Contains(ModuleContentKey(location));
}

absl::StatusOr<std::string> AdapterCache::CompositionKey(
    const AdapterSpec& spec, const std::vector<double>& weights,
    std::vector<ModuleLocation>* locations) const {
  // The method and every parameter it reads are part of the content key.
  std::string key = "mix";
  if (spec.method != "lorahub") {
    uint64_t density_bits;
    std::memcpy(&density_bits, &spec.density, sizeof(density_bits));
    absl::StrAppend(&key, ":", spec.method);
    if (spec.method == "ties" || spec.method == "dare_linear") {
      absl::StrAppend(&key, ":d=", absl::Hex(density_bits));
    }
    if (spec.method == "ties") absl::StrAppend(&key, ":m=", spec.majority_sign);
    if (spec.method == "dare_linear") absl::StrAppend(&key, ":s=", spec.seed);
  }
  for (size_t i = 0; i < spec.module_ids.size(); ++i) {
    LH_ASSIGN_OR_RETURN(ModuleLocation loc, resolver_(spec.module_ids[i]));
    uint64_t bits;
    std::memcpy(&bits, &weights[i], sizeof(bits));
    absl::StrAppend(&key, "|", ModuleContentKey(loc), "*", absl::Hex(bits));
    locations->push_back(std::move(loc));
  }
  return key;
}

absl::StatusOr<std::vector<AdapterCache::Adapter>> AdapterCache::ModulesAt(
    const AdapterSpec& spec, const std::vector<ModuleLocation>& locations) {
  std::vector<Adapter> modules;
  for (size_t i = 0; i < spec.module_ids.size(); ++i) {
    LH_ASSIGN_OR_RETURN(Adapter m, ModuleAt(spec.module_ids[i], locations[i]));
    modules.push_back(std::move(m));
  }
  return modules;
}

absl::StatusOr<AdapterCache::Adapter> AdapterCache::Get(
    const AdapterSpec& spec) {
  if (spec.is_base()) {
    if (!spec.weights.empty()) {
      return absl::InvalidArgumentError("weights given without modules");
    }
    return Adapter();
  }
  if (spec.module_ids.size() == 1 && spec.weights.empty() &&
      spec.method == "lorahub") {
    return GetModule(spec.module_ids[0]);
  }
  const model::CompositionParams params{spec.method, spec.density,
                                       spec.majority_sign, spec.seed};
  LH_RETURN_IF_ERROR(model::ValidateCompositionParams(params, ""));
  std::vector<double> weights = spec.weights;
  if (weights.empty() && spec.module_ids.size() == 1) weights = {1.0};
  if (weights.size() != spec.module_ids.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(spec.module_ids.size(), " modules but ",
                     weights.size(), " weights"));
  }
  // Profiler scopes (deploy/gpu/serve_trace.py's tables of a composition).
  std::vector<ModuleLocation> locations;
  std::string key;
  {
    RECORD_USER_SCOPE("lorahub::composition_key");
    LH_ASSIGN_OR_RETURN(key, CompositionKey(spec, weights, &locations));
    if (Adapter hit = device_.Lookup(key)) return hit;
  }
  std::vector<Adapter> modules;
  {
    RECORD_USER_SCOPE("lorahub::composition_modules");
    LH_ASSIGN_OR_RETURN(modules, ModulesAt(spec, locations));
  }
  std::vector<const model::LoraAdapter*> raw;
  for (const auto& m : modules) raw.push_back(m.get());
  std::shared_ptr<const model::LoraAdapter> adapter;
  {
    RECORD_USER_SCOPE("lorahub::compose");
    if (spec.method == "lorahub") {  // the composition has the modules' shapes
      LH_RETURN_IF_ERROR(model::CheckStackable(*base_, raw));
      LH_RETURN_IF_ERROR(device_.CheckRoom("composition", ModuleTier::AdapterBytes(*raw[0])));
    }
    LH_ASSIGN_OR_RETURN(model::LoraAdapter composed,
                        model::ComposeModules(*base_, raw, weights, params));
    composed.name = "composition";
    adapter = std::make_shared<const model::LoraAdapter>(std::move(composed));
  }
  // The modules stay pinned until the composition is in (or refused).
  RECORD_USER_SCOPE("lorahub::composition_insert");
  return device_.Insert(key, std::move(adapter), /*derived=*/true);
}

absl::StatusOr<std::shared_ptr<const model::ModuleMix>> AdapterCache::Mix(
    const AdapterSpec& spec) {
  const size_t n = spec.module_ids.size();
  std::vector<double> weights = spec.weights;
  if (weights.empty() && n == 1) weights = {1.0};
  // What Get refuses, it refuses; what only Get composes, it composes.
  if (spec.method != "lorahub" || n == 0 || weights.size() != n ||
      n > static_cast<size_t>(model::kMaxSliceSumTerms)) {
    return nullptr;
  }
  RECORD_USER_SCOPE("lorahub::mix");
  auto mix = std::make_shared<model::ModuleMix>();
  std::vector<ModuleLocation> locations;
  LH_ASSIGN_OR_RETURN(mix->key, CompositionKey(spec, weights, &locations));
  LH_ASSIGN_OR_RETURN(mix->modules, ModulesAt(spec, locations));
  std::vector<const model::LoraAdapter*> raw;
  for (const auto& m : mix->modules) raw.push_back(m.get());
  LH_RETURN_IF_ERROR(model::CheckStackable(*base_, raw));
  for (const auto& m : mix->modules) {
    at::Tensor flat = model::FlatFactors(*m);
    if (!flat.defined() || flat.device() != base_->device ||
        (flat.scalar_type() != at::kFloat && flat.scalar_type() != at::kBFloat16) ||
        (!mix->flats.empty() && flat.numel() != mix->flats[0].numel())) {
      return nullptr;
    }
    mix->flats.push_back(std::move(flat));
  }
  mix->weights = std::move(weights);
  return std::shared_ptr<const model::ModuleMix>(std::move(mix));
}

}  // namespace lorahub::serving
