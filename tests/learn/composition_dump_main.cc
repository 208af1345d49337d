// Writes (to stdout, JSON) small random LoRA stacks for two targets, the weights, and what our
// Compose() returns for lorahub, cat, ties (total, frequency) and dare_linear. The script
// check_composition_vs_peft.py feeds the same stacks to PEFT's add_weighted_adapter and
// compares (run it where peft is installed, e.g. the GPU host; CPU is enough).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/learn/composition.h"

namespace {

using lorahub::learn::CompositionMethod;
using lorahub::learn::CompositionOptions;
using lorahub::learn::LoraStack;
using lorahub::learn::MajoritySignMethod;

nlohmann::json ToJson(const at::Tensor& t) {
  at::Tensor c = t.to(at::kDouble).contiguous();
  nlohmann::json j;
  j["shape"] = c.sizes().vec();
  std::vector<double> v(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  j["data"] = v;
  return j;
}

}  // namespace

int main() {
  at::manual_seed(1234);
  const int64_t n = 3, r = 2, in = 5, out = 4;
  const std::vector<double> alphas = {4, 2, 8};  // scalings alpha / r = 2, 1, 4
  const std::vector<double> weights = {0.7, -0.4, 0.25};
  std::vector<LoraStack> targets(2);
  nlohmann::json j;
  j["modules"] = n;
  j["rank"] = r;
  j["in"] = in;
  j["out"] = out;
  j["alphas"] = alphas;
  j["weights"] = weights;
  for (int t = 0; t < 2; ++t) {
    targets[t].a = at::randn({n, r, in});
    targets[t].b = at::randn({n, out, r});
    for (double a : alphas) targets[t].scaling.push_back(a / r);
    j["targets"][t]["a"] = ToJson(targets[t].a);
    j["targets"][t]["b"] = ToJson(targets[t].b);
  }
  struct Case {
    std::string name;
    CompositionMethod method;
    MajoritySignMethod sign;
    double density;
  };
  const std::vector<Case> cases = {
      {"lorahub", CompositionMethod::kLoraHub, MajoritySignMethod::kTotal, 1},
      {"cat", CompositionMethod::kCat, MajoritySignMethod::kTotal, 1},
      {"ties_total", CompositionMethod::kTies, MajoritySignMethod::kTotal, 0.5},
      {"ties_frequency", CompositionMethod::kTies, MajoritySignMethod::kFrequency, 0.5},
      {"dare_linear", CompositionMethod::kDareLinear, MajoritySignMethod::kTotal, 0.5},
  };
  const uint64_t dare_seed = 7;
  j["dare_seed"] = dare_seed;
  for (const Case& c : cases) {
    CompositionOptions o;
    o.method = c.method;
    o.majority_sign = c.sign;
    o.density = c.density;
    // One generator for all targets, in module order, as PEFT draws from torch's global one.
    o.generator = at::make_generator<at::CPUGeneratorImpl>(dare_seed);
    nlohmann::json cj;
    cj["density"] = c.density;
    for (int t = 0; t < 2; ++t) {
      auto composed = lorahub::learn::Compose(targets[t], weights, o);
      if (!composed.ok()) {
        std::fprintf(stderr, "%s: %s\n", c.name.c_str(), composed.status().ToString().c_str());
        return 1;
      }
      cj["targets"][t]["a"] = ToJson(composed->a);
      cj["targets"][t]["b"] = ToJson(composed->b);
      cj["targets"][t]["scaling"] = composed->scaling;
    }
    j["results"][c.name] = cj;
  }
  std::printf("%s\n", j.dump().c_str());
  return 0;
}
