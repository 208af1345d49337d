#include "core/model/fused_ops.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>

#include "core/model/fused_ops_backend.h"

namespace lorahub::model {
namespace {

// Autograd never reaches the CUDA kernels (they have no backward).
bool Differentiable(const at::Tensor& t) {
  return t.defined() && t.requires_grad();
}

// LORAHUB_NO_FUSED=1 sends every call to the ATen fallback (A/B timing,
// bisecting a numerical difference). Read once.
bool Disabled() {
  static const bool disabled = [] {
    const char* v = std::getenv("LORAHUB_NO_FUSED");
    return v != nullptr && *v != '\0' && std::string(v) != "0";
  }();
  return disabled;
}

}  // namespace

bool FusedKernelsCompiled() { return fused_backend::Compiled(); }

bool FusedKernelsEnabled() { return fused_backend::Compiled() && !Disabled(); }

NormOutput RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps,
                   at::ScalarType compute) {
  NormOutput out;
  if (x.is_cuda() && !Disabled() && !Differentiable(x) && !Differentiable(weight) &&
      fused_backend::RmsNorm(x, weight, eps, compute, &out)) {
    return out;
  }
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor variance = xf.pow(2).mean(-1, /*keepdim=*/true);
  out.full = weight.to(at::kFloat) * (xf * at::rsqrt(variance + eps));
  out.rounded = out.full.to(compute);
  return out;
}

at::Tensor Attention(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& bias) {
  at::Tensor out;
  if (q.is_cuda() && !Disabled() && !Differentiable(q) && !Differentiable(k) &&
      !Differentiable(v) && fused_backend::Attention(q, k, v, bias, &out)) {
    return out;
  }
  at::Tensor scores = at::matmul(q, k.transpose(-1, -2)) + bias;
  return at::matmul(at::softmax(scores, -1), v);
}

}  // namespace lorahub::model
