// CUDA build of fused_ops_backend.h: the kernels of fused_kernels.cu and
// PyTorch's scaled-dot-product attention. Compiled only by the CMake build
// against a CUDA LibTorch with nvcc (deploy/cmake/README.md, "CUDA-only
// sources"), in place of fused_ops_stub.cc.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "core/model/fused_kernels.h"
#include "core/model/fused_ops_backend.h"

namespace lorahub::model::fused_backend {
namespace {

kernels::DType KernelDType(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kernels::DType::kFloat;
    case at::kBFloat16:
      return kernels::DType::kBFloat16;
    case at::kHalf:
      return kernels::DType::kHalf;
    default:
      return kernels::DType::kNone;
  }
}

}  // namespace

bool Compiled() { return true; }

bool RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps,
             at::ScalarType compute, NormOutput* out) {
  const kernels::DType w_dtype = KernelDType(weight.scalar_type());
  const kernels::DType r_dtype =
      compute == at::kFloat ? kernels::DType::kNone : KernelDType(compute);
  if (x.scalar_type() != at::kFloat || !weight.is_cuda() ||
      weight.device() != x.device() || weight.dim() != 1 || x.dim() < 1 ||
      x.size(-1) != weight.size(0) || w_dtype == kernels::DType::kNone ||
      (compute != at::kFloat && r_dtype == kernels::DType::kNone)) {
    return false;
  }
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  NormOutput result;
  result.full = at::empty_like(xc);
  result.rounded = r_dtype == kernels::DType::kNone
                       ? result.full
                       : at::empty(xc.sizes(), xc.options().dtype(compute));
  const int64_t dim = xc.size(-1);
  const int err = kernels::LaunchRmsNorm(
      xc.data_ptr<float>(), wc.data_ptr(), w_dtype,
      result.full.data_ptr<float>(),
      r_dtype == kernels::DType::kNone ? nullptr : result.rounded.data_ptr(),
      r_dtype, xc.numel() / dim, dim, static_cast<float>(eps),
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == 0, "RMS norm kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *out = std::move(result);
  return true;
}

bool Attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& bias, at::Tensor* out) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 ||
      k.scalar_type() != q.scalar_type() ||
      v.scalar_type() != q.scalar_type() ||
      bias.scalar_type() != q.scalar_type()) {
    return false;
  }
  // scale 1: T5 does not divide its scores by sqrt(d_kv).
  *out = at::scaled_dot_product_attention(q, k, v, bias, /*dropout_p=*/0.0,
                                          /*is_causal=*/false, /*scale=*/1.0);
  return true;
}

bool BmmFloat(const at::Tensor& a, const at::Tensor& b, at::Tensor* out) {
  if (!a.is_cuda() || a.scalar_type() != b.scalar_type() ||
      (a.scalar_type() != at::kBFloat16 && a.scalar_type() != at::kHalf)) {
    return false;
  }
  // bmm.dtype: cuBLAS with bf16/fp16 operands, fp32 compute and output.
  *out = at::bmm(a, b, at::kFloat);
  return true;
}

}  // namespace lorahub::model::fused_backend
