#include "core/learn/adapter_export.h"

#include <ATen/ATen.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "core/io/host_tensor.h"
#include "core/io/safetensors.h"
#include "nlohmann/json.hpp"

namespace lorahub::learn {
namespace {

// The last dotted component of a module name ("...SelfAttention.q" -> "q").
std::string ShortName(const std::string& module) {
  const size_t dot = module.rfind('.');
  return dot == std::string::npos ? module : module.substr(dot + 1);
}

// A regex that matches exactly `module` (PEFT matches pattern keys as (.*\.)?(KEY)$).
std::string Escaped(const std::string& module) {
  return absl::StrReplaceAll(module, {{".", "\\."}});
}

// Copies a tensor to a float32 host tensor that owns its bytes.
io::HostTensor ToHost(const at::Tensor& t) {
  at::Tensor c = t.detach().to(at::kCPU, at::kFloat).contiguous();
  auto bytes = std::make_shared<std::vector<uint8_t>>(c.numel() * sizeof(float));
  if (!bytes->empty()) std::memcpy(bytes->data(), c.data_ptr<float>(), bytes->size());
  io::HostTensor h;
  h.dtype = io::DType::kF32;
  h.shape = c.sizes().vec();
  h.data = bytes->data();
  h.nbytes = bytes->size();
  h.owner = bytes;
  return h;
}

}  // namespace

absl::Status WritePeftAdapter(const model::T5Weights& base, const model::LoraAdapter& adapter,
                              const std::string& dir, const AdapterExportOptions& options) {
  if (adapter.sites.empty()) {
    return absl::InvalidArgumentError("export: the adapter adapts no module");
  }
  std::vector<std::string> names;
  for (const model::LoraSite& s : adapter.sites) {
    if (s.site < 0 || s.site >= base.num_sites || !s.a.defined() || !s.b.defined() ||
        s.a.dim() != 2 || s.b.dim() != 2 || s.a.size(0) != s.b.size(1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("export: bad site ", s.site, " in adapter '", adapter.name, "'"));
    }
    names.push_back(model::SiteName(base, s.site));
  }

  // target_modules: short names if they select exactly the adapted sites.
  std::set<std::string> shorts, adapted(names.begin(), names.end());
  for (const std::string& n : names) shorts.insert(ShortName(n));
  std::set<std::string> selected;
  for (const auto& [module, site] : base.site_by_name) {
    const bool present = site >= 0 && site < static_cast<int>(base.site_shape.size()) &&
                         base.site_shape[site].first > 0;
    if (present && shorts.count(ShortName(module))) selected.insert(module);
  }
  nlohmann::json targets = nlohmann::json::array();
  if (selected == adapted) {
    for (const std::string& s : shorts) targets.push_back(s);
  } else {
    for (const std::string& n : adapted) targets.push_back(n);
  }

  const int64_t r = adapter.sites[0].a.size(0);
  const double alpha = adapter.sites[0].scaling * static_cast<double>(r);
  nlohmann::json rank_pattern = nlohmann::json::object();
  nlohmann::json alpha_pattern = nlohmann::json::object();
  for (size_t i = 0; i < adapter.sites.size(); ++i) {
    const model::LoraSite& s = adapter.sites[i];
    const int64_t rank = s.a.size(0);
    const double site_alpha = s.scaling * static_cast<double>(rank);
    if (rank != r) rank_pattern[Escaped(names[i])] = rank;
    if (rank != r || site_alpha != alpha) alpha_pattern[Escaped(names[i])] = site_alpha;
  }

  nlohmann::json config = {
      {"peft_type", "LORA"},
      {"task_type", "SEQ_2_SEQ_LM"},
      {"base_model_name_or_path", options.base_model_name_or_path},
      {"r", r},
      {"lora_alpha", alpha},
      {"lora_dropout", 0.0},
      {"target_modules", targets},
      {"rank_pattern", rank_pattern},
      {"alpha_pattern", alpha_pattern},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"use_rslora", false},
      {"use_dora", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"modules_to_save", nullptr},
  };

  io::TensorMap tensors;
  try {
    for (size_t i = 0; i < adapter.sites.size(); ++i) {
      const std::string prefix = absl::StrCat("base_model.model.", names[i]);
      tensors[prefix + ".lora_A.weight"] = ToHost(adapter.sites[i].a);
      tensors[prefix + ".lora_B.weight"] = ToHost(adapter.sites[i].b);
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("export: ", e.what_without_backtrace()));
  }

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": cannot create: ", ec.message()));
  }
  const std::string config_path = dir + "/adapter_config.json";
  {
    std::ofstream out(config_path, std::ios::binary | std::ios::trunc);
    out << config.dump(2) << "\n";
    out.flush();
    if (!out) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, ": cannot write"));
    }
  }
  return io::WriteSafetensorsFile(dir + "/adapter_model.safetensors", tensors,
                                  {{"format", "pt"}});
}

}  // namespace lorahub::learn
