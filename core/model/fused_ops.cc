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
  if (x.is_cuda() && !Disabled() && !Differentiable(x) &&
      !Differentiable(weight) &&
      fused_backend::RmsNorm(x, weight, eps, compute, &out)) {
    return out;
  }
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor variance = xf.pow(2).mean(-1, /*keepdim=*/true);
  out.full = weight.to(at::kFloat) * (xf * at::rsqrt(variance + eps));
  out.rounded = out.full.to(compute);
  return out;
}

at::Tensor GeneralAttention(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& bias) {
  at::Tensor out;
  if (q.is_cuda() && !Disabled() && !Differentiable(q) && !Differentiable(k) &&
      !Differentiable(v) && fused_backend::Attention(q, k, v, bias, &out)) {
    return out;
  }
  at::Tensor scores = at::matmul(q, k.transpose(-1, -2)) + bias;
  return at::matmul(at::softmax(scores, -1), v);
}

at::Tensor SingleQueryAttention(const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& bias) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || q.size(2) != 1 ||
      k.size(0) != q.size(0) || k.size(1) != q.size(1) ||
      v.sizes().slice(0, 3) != k.sizes().slice(0, 3) ||
      k.size(3) != q.size(3)) {
    return GeneralAttention(q, k, v, bias);
  }
  const int64_t B = q.size(0), H = q.size(1), S = k.size(2);
  const int64_t d = q.size(3), dv = v.size(3);
  // [B*H, 1, d] x [B*H, d, S]: the keys' transpose is a stride swap, which
  // bmm passes to the GEMM as a transposed operand (no copy).
  at::Tensor scores = at::bmm(q.reshape({B * H, 1, d}),
                              k.reshape({B * H, S, d}).transpose(1, 2))
                          .view({B, H, 1, S});
  scores.add_(bias);  // broadcast: [1, H, 1, S] (self) or [B, 1, 1, S] (cross)
  const at::Tensor probs = at::softmax(scores, -1);
  return at::bmm(probs.view({B * H, 1, S}), v.reshape({B * H, S, dv}))
      .view({B, H, 1, dv});
}

bool DecodeAttentionGeneric() {
  static const bool generic = [] {
    const char* v = std::getenv("LORAHUB_DECODE_ATTN_GENERIC");
    return v != nullptr && *v != '\0' && std::string(v) != "0";
  }();
  return generic;
}

at::Tensor Attention(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& bias) {
  if (q.dim() == 4 && q.size(2) == 1 && !DecodeAttentionGeneric()) {
    return SingleQueryAttention(q, k, v, bias);
  }
  return GeneralAttention(q, k, v, bias);
}

}  // namespace lorahub::model
