#include "core/learn/composition.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace lorahub::learn {
namespace {

absl::Status ValidateStack(const LoraStack& s, int64_t n_weights) {
  if (!s.a.defined() || !s.b.defined()) {
    return absl::InvalidArgumentError("composition: lora A and B stacks must be defined");
  }
  if (s.a.dim() != 3 || s.b.dim() != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        "composition: expected A [N, r, in] and B [N, out, r], got A with ", s.a.dim(),
        " dims and B with ", s.b.dim(), " dims"));
  }
  const int64_t n = s.a.size(0);
  if (n < 1 || s.b.size(0) != n) {
    return absl::InvalidArgumentError(absl::StrCat("composition: A stacks ", n,
                                                   " modules but B stacks ", s.b.size(0)));
  }
  if (s.b.size(2) != s.a.size(1)) {
    return absl::InvalidArgumentError(absl::StrCat("composition: rank mismatch, A has r = ",
                                                   s.a.size(1), ", B has r = ", s.b.size(2)));
  }
  if (!at::isFloatingType(s.a.scalar_type()) || s.a.scalar_type() != s.b.scalar_type()) {
    return absl::InvalidArgumentError("composition: A and B must share one floating dtype");
  }
  if (s.a.device() != s.b.device()) {
    return absl::InvalidArgumentError("composition: A and B must be on the same device");
  }
  if (static_cast<int64_t>(s.scaling.size()) != n) {
    return absl::InvalidArgumentError(absl::StrCat("composition: ", s.scaling.size(),
                                                   " scalings for ", n, " modules"));
  }
  for (double v : s.scaling) {
    if (!std::isfinite(v)) return absl::InvalidArgumentError("composition: scaling not finite");
  }
  if (n_weights != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("composition: ", n_weights, " weights for ", n, " modules"));
  }
  return absl::OkStatus();
}

at::ScalarType ComputeType(at::ScalarType t) {
  return (t == at::kDouble || t == at::kFloat) ? t : at::kFloat;
}

at::Tensor WeightTensor(const std::vector<double>& w, const at::Tensor& like, at::ScalarType t) {
  at::Tensor cpu = at::empty({static_cast<int64_t>(w.size())}, at::TensorOptions().dtype(at::kDouble));
  double* p = cpu.data_ptr<double>();
  for (size_t i = 0; i < w.size(); ++i) p[i] = w[i];
  return cpu.to(like.device(), t);
}

// sum_i w_i X_i for X [N, ...], w [N].
at::Tensor WeightedSum(const at::Tensor& x, const at::Tensor& w) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = x.size(0);
  return (x * w.view(shape)).sum(0);
}

// PEFT magnitude_based_pruning, per module: keep the top int(density * numel) |entries|.
at::Tensor MagnitudePrune(const at::Tensor& x, double density) {
  if (density >= 1) return x;
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < x.size(0); ++i) {
    at::Tensor flat = x[i].reshape({-1});
    const int64_t k = static_cast<int64_t>(density * static_cast<double>(flat.numel()));
    at::Tensor mask = at::zeros_like(flat);
    if (k > 0) {
      at::Tensor idx = std::get<1>(at::topk(flat.abs(), k, /*dim=*/-1, /*largest=*/true));
      mask.index_fill_(0, idx, 1);
    }
    out.push_back((flat * mask).reshape(x[i].sizes()));
  }
  return at::stack(out, 0);
}

// PEFT random_pruning with rescale, per module, masks drawn in module order.
at::Tensor RandomPrune(const at::Tensor& x, double density, at::Generator& gen) {
  if (density >= 1) return x;
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < x.size(0); ++i) {
    at::Tensor probs = at::full(x[i].sizes(), density, at::TensorOptions().dtype(x.scalar_type()));
    at::Tensor mask = at::bernoulli(probs, gen).to(x.device());
    out.push_back(x[i] * mask / density);
  }
  return at::stack(out, 0);
}

// PEFT ties(): prune, elect sign on the unweighted tensors, disjoint mean of weighted ones.
at::Tensor Ties(const at::Tensor& x, const at::Tensor& w, double density, MajoritySignMethod m) {
  at::Tensor pruned = MagnitudePrune(x, density);
  at::Tensor sign = pruned.sign();
  at::Tensor magnitude = m == MajoritySignMethod::kTotal ? pruned.sum(0) : sign.sum(0);
  at::Tensor majority = at::where(magnitude >= 0, at::ones_like(magnitude), -at::ones_like(magnitude));
  at::Tensor agree = (sign == majority.unsqueeze(0)).to(x.scalar_type());
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = x.size(0);
  at::Tensor weighted = pruned * w.view(shape);
  return (weighted * agree).sum(0) / at::clamp_min(agree.sum(0), 1.0);
}

absl::StatusOr<ComposedLora> ComposeImpl(const LoraStack& stack, const std::vector<double>& weights,
                                         const CompositionOptions& options) {
  const at::ScalarType in_type = stack.a.scalar_type();
  const at::ScalarType t = ComputeType(in_type);
  const at::Tensor a = stack.a.to(t), b = stack.b.to(t);
  const int64_t n = a.size(0);
  ComposedLora out;
  switch (options.method) {
    case CompositionMethod::kLoraHub: {
      const at::Tensor w = WeightTensor(weights, a, t);
      out.a = WeightedSum(a, w);
      out.b = WeightedSum(b, w);
      out.scaling = stack.scaling[0];
      break;
    }
    case CompositionMethod::kCat: {
      std::vector<double> ws(n);
      for (int64_t i = 0; i < n; ++i) ws[i] = weights[i] * stack.scaling[i];
      const at::Tensor w = WeightTensor(ws, a, t);
      out.a = (a * w.view({n, 1, 1})).reshape({n * a.size(1), a.size(2)});
      out.b = b.permute({1, 0, 2}).reshape({b.size(1), n * b.size(2)});
      out.scaling = 1;
      break;
    }
    case CompositionMethod::kTies:
    case CompositionMethod::kDareLinear: {
      if (!(options.density > 0) || !std::isfinite(options.density)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "composition: density must be in (0, 1] for ", CompositionMethodName(options.method),
            ", got ", options.density));
      }
      std::vector<double> wa(n), wb(n);
      for (int64_t i = 0; i < n; ++i) {
        const double ws = weights[i] * stack.scaling[i];
        wb[i] = std::sqrt(std::fabs(ws));
        wa[i] = ws >= 0 ? wb[i] : -wb[i];
      }
      const at::Tensor wa_t = WeightTensor(wa, a, t), wb_t = WeightTensor(wb, a, t);
      if (options.method == CompositionMethod::kTies) {
        out.a = Ties(a, wa_t, options.density, options.majority_sign);
        out.b = Ties(b, wb_t, options.density, options.majority_sign);
      } else {
        at::Generator gen = options.generator.has_value()
                                ? *options.generator
                                : at::make_generator<at::CPUGeneratorImpl>(options.seed);
        if (gen.device().type() != at::kCPU) {
          return absl::InvalidArgumentError("composition: dare_linear needs a CPU generator");
        }
        // Mirror PEFT's order: every A_i first, then every B_i (prune in the input dtype).
        const at::Tensor pa = RandomPrune(stack.a, options.density, gen).to(t);
        const at::Tensor pb = RandomPrune(stack.b, options.density, gen).to(t);
        out.a = WeightedSum(pa, wa_t);
        out.b = WeightedSum(pb, wb_t);
      }
      out.scaling = 1;
      break;
    }
  }
  out.a = out.a.to(in_type).contiguous();
  out.b = out.b.to(in_type).contiguous();
  return out;
}

}  // namespace

absl::StatusOr<CompositionMethod> ParseCompositionMethod(absl::string_view name) {
  if (name == "lorahub") return CompositionMethod::kLoraHub;
  if (name == "cat") return CompositionMethod::kCat;
  if (name == "ties") return CompositionMethod::kTies;
  if (name == "dare_linear") return CompositionMethod::kDareLinear;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown composition method '", name, "' (expected lorahub, cat, ties or dare_linear)"));
}

std::string CompositionMethodName(CompositionMethod method) {
  switch (method) {
    case CompositionMethod::kLoraHub: return "lorahub";
    case CompositionMethod::kCat: return "cat";
    case CompositionMethod::kTies: return "ties";
    case CompositionMethod::kDareLinear: return "dare_linear";
  }
  return "unknown";
}

absl::StatusOr<MajoritySignMethod> ParseMajoritySignMethod(absl::string_view name) {
  if (name == "total") return MajoritySignMethod::kTotal;
  if (name == "frequency") return MajoritySignMethod::kFrequency;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown majority sign method '", name, "' (expected total or frequency)"));
}

absl::StatusOr<ComposedLora> Compose(const LoraStack& stack, const std::vector<double>& weights,
                                     const CompositionOptions& options) {
  absl::Status valid = ValidateStack(stack, static_cast<int64_t>(weights.size()));
  if (!valid.ok()) return valid;
  for (double w : weights) {
    if (!std::isfinite(w)) return absl::InvalidArgumentError("composition: weight not finite");
  }
  try {
    return ComposeImpl(stack, weights, options);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("composition failed: ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("composition failed: ", e.what()));
  }
}

absl::StatusOr<ComposedLora> ComposeBatch(const LoraStack& stack, const at::Tensor& weights,
                                          CompositionMethod method) {
  if (!weights.defined() || weights.dim() != 2 || !at::isFloatingType(weights.scalar_type())) {
    return absl::InvalidArgumentError("composition: batched weights must be a floating [C, N]");
  }
  absl::Status valid = ValidateStack(stack, weights.size(1));
  if (!valid.ok()) return valid;
  if (method != CompositionMethod::kLoraHub && method != CompositionMethod::kCat) {
    return absl::InvalidArgumentError(absl::StrCat("composition: ", CompositionMethodName(method),
                                                   " has no batched form"));
  }
  try {
    const at::ScalarType in_type = stack.a.scalar_type();
    const at::ScalarType t = ComputeType(in_type);
    const at::Tensor a = stack.a.to(t), b = stack.b.to(t);
    const at::Tensor w = weights.to(a.device(), t);
    const int64_t c = w.size(0), n = a.size(0), r = a.size(1);
    ComposedLora out;
    if (method == CompositionMethod::kLoraHub) {
      out.a = at::einsum("cn,nri->cri", {w, a});
      out.b = at::einsum("cn,nor->cor", {w, b});
      out.scaling = stack.scaling[0];
    } else {
      const at::Tensor s = WeightTensor(stack.scaling, a, t);
      const at::Tensor ws = w * s.unsqueeze(0);  // [C, N]
      out.a = (a.unsqueeze(0) * ws.view({c, n, 1, 1})).reshape({c, n * r, a.size(2)});
      out.b = b.permute({1, 0, 2}).reshape({b.size(1), n * r}).unsqueeze(0).expand({c, b.size(1), n * r});
      out.scaling = 1;
    }
    out.a = out.a.to(in_type).contiguous();
    out.b = out.b.to(in_type).contiguous();
    return out;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("composition failed: ", e.what_without_backtrace()));
  }
}

}  // namespace lorahub::learn
