// CUDA build of fused_ops_backend.h: the kernels of fused_kernels.h and
// PyTorch's scaled-dot-product attention. Compiled only by the CMake build
// against a CUDA LibTorch with nvcc (deploy/cmake/README.md, "CUDA-only
// sources"), in place of fused_ops_stub.cc.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

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
    case at::kChar:
      return kernels::DType::kInt8;
    default:
      return kernels::DType::kNone;
  }
}

bool OnDeviceOf(const at::Tensor& t, const at::Tensor& x) {
  return t.defined() && t.is_cuda() && t.device() == x.device();
}

// Row slots as the row kernels index them: int64 [rows], contiguous, on
// x's device.
bool SlotsFit(const at::Tensor& slots, const at::Tensor& x, int64_t rows) {
  return OnDeviceOf(slots, x) && slots.dim() == 1 &&
         slots.scalar_type() == at::kLong && slots.is_contiguous() &&
         slots.size(0) == rows;
}

// The current CUDA stream of x's device.
cudaStream_t StreamOf(const at::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

// A job table in pinned host memory (PinnedTable), and its copy on `device`
// queued on the current stream without waiting (TableOn; LibTorch's pinned
// pool keeps the host memory until the copy has run).
at::Tensor PinnedTable(int64_t bytes) {
  return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
}
at::Tensor TableOn(const at::Tensor& host, c10::Device device) {
  return host.to(device, /*non_blocking=*/true);
}
// A table of one Job per item, each value-initialised and then written by
// fill(item, job), on `device` (PinnedTable, TableOn).
template <typename Job, typename Item, typename Fill>
at::Tensor JobTable(const std::vector<Item>& items, c10::Device device, Fill fill) {
  at::Tensor host = PinnedTable(static_cast<int64_t>(items.size() * sizeof(Job)));
  auto* jobs = reinterpret_cast<Job*>(host.data_ptr());
  for (size_t i = 0; i < items.size(); ++i) {
    jobs[i] = Job();
    fill(items[i], jobs[i]);
  }
  return TableOn(host, device);
}

// New outputs of an add + norm over x (fp32): sum and full fp32 like x,
// rounded in `compute` (the same tensor as full when r_dtype is kNone:
// fp32 compute).
// keep_full false: no fp32 `full` where the rounded output is another
// tensor (fused_ops.h AddRmsNorm).
AddNormOutput AddNormOutputsLike(const at::Tensor& x, at::ScalarType compute,
                                 kernels::DType r_dtype,
                                 bool keep_full = true) {
  AddNormOutput result;
  result.sum = at::empty_like(x);
  if (r_dtype == kernels::DType::kNone) {
    result.norm.full = at::empty_like(x);
    result.norm.rounded = result.norm.full;
    return result;
  }
  if (keep_full) result.norm.full = at::empty_like(x);
  result.norm.rounded = at::empty(x.sizes(), x.options().dtype(compute));
  return result;
}

// The kernels' view of `delta` (contiguous) for a residual norm over x
// (fused_ops.h AddRmsNorm): x's shape in any float dtype, or SplitKProject's
// partials, rounded to `compute`. False where it is neither.
bool NormDeltaOf(const at::Tensor& x, const at::Tensor& delta,
                 at::ScalarType compute, kernels::NormDelta* d) {
  if (!delta.is_cuda() || delta.device() != x.device()) return false;
  d->p = delta.data_ptr();
  if (delta.sizes() == x.sizes()) {
    d->dtype = KernelDType(delta.scalar_type());
    return d->dtype != kernels::DType::kNone;
  }
  if (!IsSplitKOutput(delta, x) || !delta.is_contiguous() ||
      delta.size(0) > kernels::kMaxNormDeltaParts) {
    return false;
  }
  d->dtype = KernelDType(compute);
  d->parts = static_cast<int>(delta.size(0));
  d->part_stride = x.numel();
  return d->dtype != kernels::DType::kNone;
}

}  // namespace

bool Compiled() { return true; }

bool StreamCapturing(c10::Device device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(
          c10::cuda::getCurrentCUDAStream(device.index()).stream(), &status) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return true;  // unknown: the caller keeps nothing
  }
  return status != cudaStreamCaptureStatusNone;
}

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
      r_dtype, xc.numel() / dim, dim, static_cast<float>(eps), StreamOf(x));
  TORCH_CHECK(err == 0, "RMS norm kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *out = std::move(result);
  return true;
}

bool AddRmsNorm(const at::Tensor& x, const at::Tensor& delta,
                const at::Tensor& weight, double eps, at::ScalarType compute,
                bool keep_full, AddNormOutput* out) {
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
  const at::Tensor dc = delta.contiguous();
  kernels::NormDelta d;
  if (!NormDeltaOf(x, dc, compute, &d)) return false;
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  AddNormOutput result = AddNormOutputsLike(xc, compute, r_dtype, keep_full);
  const int64_t dim = xc.size(-1);
  const int err = kernels::LaunchAddRmsNorm(
      xc.data_ptr<float>(), d, result.sum.data_ptr<float>(), wc.data_ptr(),
      w_dtype,
      result.norm.full.defined() ? result.norm.full.data_ptr<float>()
                                 : nullptr,
      r_dtype == kernels::DType::kNone ? nullptr
                                       : result.norm.rounded.data_ptr(),
      r_dtype, xc.numel() / dim, dim, static_cast<float>(eps),
      StreamOf(x));
  TORCH_CHECK(err == 0, "residual + RMS norm kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *out = std::move(result);
  return true;
}

namespace {

// The row stride of `t` seen as [rows, t.size(-1)] with unit column stride
// (leading dimensions collapse into rows), or -1 when it cannot be.
int64_t RowStride(const at::Tensor& t) {
  if (t.dim() < 2 || t.stride(-1) != 1) return -1;
  for (int64_t i = 0; i + 2 < t.dim(); ++i) {
    if (t.size(i) != 1 && t.stride(i) != t.stride(i + 1) * t.size(i + 1)) {
      return -1;
    }
  }
  return t.stride(-2);
}

}  // namespace

bool GatedGeluTanh(const at::Tensor& gate, const at::Tensor& up,
                   at::Tensor* out) {
  const kernels::DType dtype = KernelDType(gate.scalar_type());
  const int64_t gs = RowStride(gate), us = RowStride(up);
  if (dtype == kernels::DType::kNone || up.scalar_type() != gate.scalar_type() ||
      !up.is_cuda() || up.device() != gate.device() ||
      up.sizes() != gate.sizes() || gs < 0 || us < 0) {
    return false;
  }
  c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor result = at::empty(gate.sizes(), gate.options());
  const int64_t dim = gate.size(-1);
  const int64_t rows = dim == 0 ? 0 : gate.numel() / dim;
  const int err = kernels::LaunchGatedGeluTanh(
      gate.data_ptr(), gs, up.data_ptr(), us, result.data_ptr(), dtype, rows,
      dim, StreamOf(gate));
  TORCH_CHECK(err == 0, "gated GELU kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *out = std::move(result);
  return true;
}

namespace {

// The kernels' arguments for q [B, H, T, D], k [B, H, S, D], v [B, H, S, Dv]
// and the bias expanded to [B, H, T, S] (b4), the result in out_dtype (out
// itself and the variant not set).
kernels::AttentionArgs AttentionArgsOf(const at::Tensor& q,
                                       const at::Tensor& k,
                                       const at::Tensor& v,
                                       const at::Tensor& b4,
                                       at::ScalarType out_dtype) {
  kernels::AttentionArgs a;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.bias = b4.data_ptr();
  a.q_dtype = KernelDType(q.scalar_type());
  a.qkv_dtype = KernelDType(k.scalar_type());
  a.bias_dtype = KernelDType(b4.scalar_type());
  a.out_dtype = KernelDType(out_dtype);
  a.B = q.size(0);
  a.H = q.size(1);
  a.T = q.size(2);
  a.S = k.size(2);
  a.D = q.size(3);
  a.Dv = v.size(3);
  for (int i = 0; i < 4; ++i) {
    a.q_stride[i] = q.stride(i);
    a.k_stride[i] = k.stride(i);
    a.v_stride[i] = v.stride(i);
    a.bias_stride[i] = b4.stride(i);
  }
  return a;
}

}  // namespace

bool SmallAttention(const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& bias,
                    at::ScalarType out_dtype,
                    kernels::AttentionVariant variant, at::Tensor* out) {
  // q in the keys' dtype, or fp32 queries over bf16/fp16 keys and values.
  const bool mixed = q.scalar_type() == at::kFloat &&
                     (k.scalar_type() == at::kBFloat16 ||
                      k.scalar_type() == at::kHalf);
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || !k.is_cuda() ||
      !v.is_cuda() || !bias.is_cuda() || k.device() != q.device() ||
      v.device() != q.device() || bias.device() != q.device() ||
      (k.scalar_type() != q.scalar_type() && !mixed) ||
      v.scalar_type() != k.scalar_type() ||
      (k.scalar_type() != at::kFloat && k.scalar_type() != at::kBFloat16 &&
       !mixed) ||
      (bias.scalar_type() != at::kFloat &&
       bias.scalar_type() != at::kBFloat16) ||
      KernelDType(out_dtype) == kernels::DType::kNone) {
    return false;
  }
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t S = k.size(2), Dv = v.size(3);
  if (k.size(0) != B || k.size(1) != H || k.size(3) != D || v.size(0) != B ||
      v.size(1) != H || v.size(2) != S || D > 256 || Dv > 256 || S > 8192 ||
      S < 1 || bias.dim() > 4) {
    return false;
  }
  const bool tiled = T >= kernels::kTiledQueryMin;
  if (tiled && !kernels::TiledAttentionAvailable(S, D, Dv)) return false;
  at::Tensor b4;
  try {
    b4 = bias.expand({B, H, T, S});  // broadcast dimensions get stride 0
  } catch (const c10::Error&) {
    return false;
  }
  c10::cuda::CUDAGuard guard(q.device());
  // Written as [B, T, H, Dv] and returned as its [B, H, T, Dv] view: the
  // head merge before the output projection is then a view, not a copy.
  at::Tensor result = at::empty({B, T, H, Dv}, q.options().dtype(out_dtype));
  kernels::AttentionArgs a = AttentionArgsOf(q, k, v, b4, out_dtype);
  a.out = result.data_ptr();
  a.variant = variant;
  const cudaStream_t stream = StreamOf(q);
  const int err = tiled ? kernels::LaunchTiledAttention(a, stream)
                        : kernels::LaunchSmallAttention(a, stream);
  TORCH_CHECK(err == 0, "short-query attention kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *out = result.transpose(1, 2);
  return true;
}

namespace {

// Packed rows' offsets as the kernels read them: int32 [B + 1], B >= 1,
// contiguous, on like's device.
bool StartsFit(const at::Tensor& starts, const at::Tensor& like) {
  return OnDeviceOf(starts, like) && starts.scalar_type() == at::kInt &&
         starts.dim() == 1 && starts.size(0) >= 2 && starts.is_contiguous();
}

// A LoraRunSlots table for `runs` runs on like's device.
bool RunSlotsFit(const LoraRunSlots& t, int64_t runs, const at::Tensor& like) {
  return OnDeviceOf(t.slots, like) && t.slots.scalar_type() == at::kLong &&
         t.slots.dim() == 1 && t.slots.size(0) == runs &&
         t.slots.is_contiguous() &&
         (!t.mask.defined() ||
          (OnDeviceOf(t.mask, like) && t.mask.scalar_type() == at::kFloat &&
           t.mask.numel() == runs && t.mask.is_contiguous()));
}

}  // namespace

bool PackedAttention(const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& bias,
                     const at::Tensor& starts, at::ScalarType out_dtype,
                     at::Tensor* out) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || bias.dim() != 4 ||
      !OnDeviceOf(q, q) || !OnDeviceOf(k, q) || !OnDeviceOf(v, q) ||
      !OnDeviceOf(bias, q) || !StartsFit(starts, q) ||
      k.scalar_type() != q.scalar_type() ||
      v.scalar_type() != q.scalar_type() ||
      (q.scalar_type() != at::kFloat && q.scalar_type() != at::kBFloat16) ||
      (bias.scalar_type() != at::kFloat &&
       bias.scalar_type() != at::kBFloat16) ||
      KernelDType(out_dtype) == kernels::DType::kNone) {
    return false;
  }
  const int64_t H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t L = bias.size(3);  // the longest row
  if (q.size(0) != 1 || k.sizes() != q.sizes() || v.sizes() != q.sizes() ||
      bias.size(0) != 1 || bias.size(1) != H || bias.size(2) != L ||
      L < kernels::kTiledQueryMin || L > N ||
      !kernels::TiledAttentionAvailable(L, D, D)) {
    return false;
  }
  const int64_t B = starts.size(0) - 1;
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor result = at::empty({1, N, H, D}, q.options().dtype(out_dtype));
  kernels::AttentionArgs a = AttentionArgsOf(q, k, v, bias, out_dtype);
  a.B = B;
  a.T = a.S = L;
  a.bias_stride[0] = 0;  // one position bias for every row
  a.seq_starts = starts.data_ptr<int32_t>();
  a.packed_tokens = N;
  a.out = result.data_ptr();
  const int err = kernels::LaunchTiledAttention(a, StreamOf(q));
  // Shapes the register-tiled kernel does not take: nothing launched.
  if (err == static_cast<int>(cudaErrorInvalidValue)) return false;
  TORCH_CHECK(err == 0, "packed attention kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *out = result.transpose(1, 2);
  return true;
}

namespace {

// What LaunchLoraShrink takes: x fp32 [B, in], a [S, R, in], slots int64
// [B] contiguous.
bool ShrinkTakes(const at::Tensor& x, const at::Tensor& a,
                 const at::Tensor& slots) {
  if (!OnDeviceOf(x, x) || !OnDeviceOf(a, x) ||
      x.scalar_type() != at::kFloat || x.dim() != 2 || a.dim() != 3 ||
      KernelDType(a.scalar_type()) == kernels::DType::kNone) {
    return false;
  }
  const int64_t B = x.size(0), R = a.size(1);
  return B <= 65535 && SlotsFit(slots, x, B) && a.size(2) == x.size(1) &&
         R > 0 && x.size(1) <= kernels::kMaxLoraIn &&
         R <= kernels::kMaxLoraRanks;
}

// What LaunchLoraExpand takes: sites of one B dtype whose ranks lie within
// R, over y fp32 [B, total], with S slots.
bool ExpandTakes(const at::Tensor& y, int64_t B, int64_t R, int64_t S,
                 const std::vector<LoraRowSite>& sites,
                 const at::Tensor& mask) {
  if (sites.empty() || !OnDeviceOf(y, y) || y.scalar_type() != at::kFloat ||
      y.dim() != 2 || y.size(0) != B) {
    return false;
  }
  if (mask.defined() &&
      (!OnDeviceOf(mask, y) || mask.scalar_type() != at::kFloat ||
       mask.numel() != B)) {
    return false;
  }
  const kernels::DType w_dtype = KernelDType(sites[0].b.scalar_type());
  for (const LoraRowSite& s : sites) {
    if (!OnDeviceOf(s.b, y) || s.b.dim() != 3 ||
        KernelDType(s.b.scalar_type()) != w_dtype ||
        w_dtype == kernels::DType::kNone || w_dtype == kernels::DType::kInt8 ||
        s.b.size(0) != S ||
        s.b.size(2) <= 0 || s.rank_offset < 0 ||
        s.rank_offset + s.b.size(2) > R || s.col < 0 ||
        s.col + s.b.size(1) > y.size(1) || !OnDeviceOf(s.scale, y) ||
        s.scale.scalar_type() != at::kFloat || s.scale.numel() != S) {
      return false;
    }
  }
  return true;
}

// The factors and slots of a shrink of B rows (x and out not set).
kernels::LoraShrinkArgs ShrinkArgs(const at::Tensor& a,
                                   const at::Tensor& slots, int64_t B) {
  kernels::LoraShrinkArgs shrink;
  shrink.a = a.data_ptr();
  shrink.a_dtype = KernelDType(a.scalar_type());
  for (int i = 0; i < 3; ++i) shrink.a_stride[i] = a.stride(i);
  shrink.slots = slots.data_ptr<int64_t>();
  shrink.B = B;
  shrink.R = a.size(1);
  shrink.in = a.size(2);
  return shrink;
}

// ShrinkTakes' tensors: xa, a new fp32 [B, R].
at::Tensor RunShrink(const at::Tensor& x, const at::Tensor& a,
                     const at::Tensor& slots) {
  const int64_t B = x.size(0), R = a.size(1);
  at::Tensor xa = at::empty({B, R}, x.options());
  if (B == 0) return xa;
  kernels::LoraShrinkArgs shrink = ShrinkArgs(a, slots, B);
  shrink.x = x.data_ptr<float>();
  shrink.x_stride[0] = x.stride(0);
  shrink.x_stride[1] = x.stride(1);
  shrink.out = xa.data_ptr<float>();
  const int err = kernels::LaunchLoraShrink(shrink, StreamOf(x));
  TORCH_CHECK(err == 0, "LoRA shrink kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return xa;
}

// ExpandTakes' tensors, xa fp32 [B, R] with unit column stride.
void RunExpand(const at::Tensor& y, const at::Tensor& xa,
               const std::vector<LoraRowSite>& sites, const at::Tensor& slots,
               const at::Tensor& mask) {
  const int64_t B = y.size(0);
  if (B == 0) return;
  // The mask and the scalings as [N] views (stride of the one non-unit
  // dimension); kept alive until the launches are queued.
  const at::Tensor mask1 = mask.defined() ? mask.reshape({B}) : at::Tensor();
  std::vector<at::Tensor> scales;
  kernels::LoraExpandArgs expand;
  expand.xa = xa.data_ptr<float>();
  expand.xa_stride[0] = xa.stride(0);
  expand.xa_stride[1] = xa.stride(1);
  expand.xa_cols = xa.size(1);
  expand.w_dtype = KernelDType(sites[0].b.scalar_type());
  expand.mask = mask1.defined() ? mask1.data_ptr<float>() : nullptr;
  expand.mask_stride = mask1.defined() ? mask1.stride(0) : 0;
  expand.slots = slots.data_ptr<int64_t>();
  expand.B = B;
  // One launch per kMaxExpandSites sites.
  for (size_t first = 0; first < sites.size();
       first += kernels::kMaxExpandSites) {
    expand.num_sites = 0;
    for (size_t k = first;
         k < sites.size() && expand.num_sites < kernels::kMaxExpandSites; ++k) {
      const LoraRowSite& s = sites[k];
      scales.push_back(s.scale.reshape({s.scale.numel()}));
      const at::Tensor ys = y.narrow(1, s.col, s.b.size(1));
      kernels::LoraExpandSite& e = expand.sites[expand.num_sites++];
      e.w = s.b.data_ptr();
      for (int i = 0; i < 3; ++i) e.w_stride[i] = s.b.stride(i);
      e.scale = scales.back().data_ptr<float>();
      e.scale_stride = scales.back().stride(0);
      e.y = ys.data_ptr<float>();
      e.y_stride[0] = ys.stride(0);
      e.y_stride[1] = ys.stride(1);
      e.out = s.b.size(1);
      e.r = s.b.size(2);
      e.rank_offset = s.rank_offset;
    }
    const int err = kernels::LaunchLoraExpand(expand, StreamOf(y));
    TORCH_CHECK(err == 0, "LoRA expand kernel: ",
                cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
}

}  // namespace

bool AddRmsNormShrink(const at::Tensor& x, const at::Tensor& delta,
                      const at::Tensor& weight, double eps,
                      at::ScalarType compute, const at::Tensor& a,
                      const at::Tensor& slots, AddNormOutput* out,
                      at::Tensor* xa) {
  const kernels::DType r_dtype =
      compute == at::kFloat ? kernels::DType::kNone : KernelDType(compute);
  const bool add = delta.defined();
  if (!x.is_cuda() || x.scalar_type() != at::kFloat || x.dim() < 1 ||
      !x.is_contiguous() || (add && !delta.is_contiguous()) ||
      !weight.is_contiguous() ||
      weight.dim() != 1 || weight.size(0) != x.size(-1) || !a.defined() ||
      a.dim() != 3 || a.size(2) != x.size(-1) || x.size(-1) == 0 ||
      !SlotsFit(slots, x, x.numel() / x.size(-1)) ||
      (compute != at::kFloat && r_dtype == kernels::DType::kNone)) {
    return false;
  }
  for (const at::Tensor* t : {&weight, &a}) {
    if (!OnDeviceOf(*t, x)) return false;
  }
  kernels::AddNormShrinkArgs p;  // p.delta.p null: no delta
  if (add && !NormDeltaOf(x, delta, compute, &p.delta)) return false;
  p.shrink = ShrinkArgs(a, slots, slots.numel());
  p.x = x.data_ptr<float>();
  p.weight = weight.data_ptr();
  p.weight_dtype = KernelDType(weight.scalar_type());
  p.rounded_dtype = r_dtype;
  p.eps = static_cast<float>(eps);
  // The launcher's checks, first: false must leave the outputs alone.
  if (!kernels::AddRmsNormShrinkFits(p)) return false;
  // One fused op to tests/model/objective_ops_test; only once it runs.
  RECORD_USER_SCOPE("lorahub::add_rms_norm_shrink");
  c10::cuda::CUDAGuard device_guard(x.device());
  AddNormOutput result = AddNormOutputsLike(x, compute, r_dtype);
  if (!add) result.sum = at::Tensor();
  at::Tensor shrunk = at::empty({p.shrink.B, p.shrink.R}, x.options());
  p.sum = add ? result.sum.data_ptr<float>() : nullptr;
  p.full = result.norm.full.data_ptr<float>();
  p.rounded = r_dtype == kernels::DType::kNone
                  ? nullptr
                  : result.norm.rounded.data_ptr();
  p.shrink.out = shrunk.data_ptr<float>();
  const int err = kernels::LaunchAddRmsNormShrink(p, StreamOf(x));
  TORCH_CHECK(err == 0, "residual + RMS norm + LoRA shrink kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *out = std::move(result);
  *xa = std::move(shrunk);
  return true;
}

bool LoraRowDeltas(const at::Tensor& y, const at::Tensor& x,
                   const at::Tensor& a, const std::vector<LoraRowSite>& sites,
                   const at::Tensor& slots, const at::Tensor& mask) {
  // Every check first: nothing runs unless every launch can.
  if (!ShrinkTakes(x, a, slots) || !OnDeviceOf(y, x) ||
      !ExpandTakes(y, x.size(0), a.size(1), a.size(0), sites, mask)) {
    return false;
  }
  c10::cuda::CUDAGuard guard(x.device());
  RunExpand(y, RunShrink(x, a, slots), sites, slots, mask);
  return true;
}

at::Tensor LoraRowShrink(const at::Tensor& x, const at::Tensor& a,
                         const at::Tensor& slots) {
  if (!ShrinkTakes(x, a, slots)) return at::Tensor();
  c10::cuda::CUDAGuard guard(x.device());
  return RunShrink(x, a, slots);
}

bool LoraRowExpand(const at::Tensor& y, const at::Tensor& xa,
                   const std::vector<LoraRowSite>& sites,
                   const at::Tensor& slots, const at::Tensor& mask) {
  if (sites.empty() || !OnDeviceOf(xa, y) ||
      xa.scalar_type() != at::kFloat || xa.dim() != 2 || xa.stride(1) != 1 ||
      !SlotsFit(slots, y, xa.size(0)) || xa.size(1) > kernels::kMaxLoraRanks ||
      !ExpandTakes(y, xa.size(0), xa.size(1), sites[0].b.size(0), sites,
                   mask)) {
    return false;
  }
  c10::cuda::CUDAGuard guard(y.device());
  RunExpand(y, xa, sites, slots, mask);
  return true;
}

namespace {

// A RowLoraExpand as the kernel takes it (xa fp32 [B, R] with unit column
// stride, b bf16 [S, H * D, r] with unit stride along r, scale fp32 with
// one value per slot); false otherwise. `keep` holds the scale's [S] view.
bool StepLora(const RowLoraExpand* e, const at::Tensor& q, int64_t slots,
              kernels::AttentionRowLora* out, at::Tensor* keep) {
  if (e == nullptr) return true;
  const int64_t B = q.size(0), HD = q.size(1) * q.size(3);
  if (!OnDeviceOf(e->xa, q) || !OnDeviceOf(e->b, q) ||
      !OnDeviceOf(e->scale, q) || e->xa.scalar_type() != at::kFloat ||
      e->xa.dim() != 2 || e->xa.size(0) != B || e->xa.stride(1) != 1 ||
      (e->b.scalar_type() != at::kBFloat16 && e->b.scalar_type() != at::kChar) ||
      e->b.dim() != 3 ||
      e->b.size(0) != slots || e->b.size(1) != HD || e->b.stride(2) != 1 ||
      e->rank_offset < 0 || e->rank_offset + e->b.size(2) > e->xa.size(1) ||
      e->scale.scalar_type() != at::kFloat || e->scale.numel() != slots) {
    return false;
  }
  *keep = e->scale.reshape({slots});
  out->xa = e->xa.data_ptr<float>() + e->rank_offset;
  out->xa_row_stride = e->xa.stride(0);
  out->w = e->b.data_ptr();
  out->w_dtype = KernelDType(e->b.scalar_type());
  out->w_stride[0] = e->b.stride(0);
  out->w_stride[1] = e->b.stride(1);
  out->r = e->b.size(2);
  out->scale = keep->data_ptr<float>();
  out->scale_stride = keep->stride(0);
  return true;
}

}  // namespace

bool DecodeStepAttention(const DecodeStepInputs& step, at::ScalarType out_dtype,
                         at::Tensor* out) {
  const at::Tensor& q = step.q;
  const at::Tensor& k = step.k;
  const at::Tensor& v = step.v;
  const bool store = step.k_new.defined();
  const bool lora = step.q_lora != nullptr || step.v_lora != nullptr;
  if (!OnDeviceOf(q, q) || !OnDeviceOf(k, q) || !OnDeviceOf(v, q) ||
      !OnDeviceOf(step.bias, q) || q.dim() != 4 || k.dim() != 4 ||
      v.dim() != 4 || q.scalar_type() != at::kFloat || q.size(2) != 1 ||
      v.scalar_type() != k.scalar_type() ||
      (k.scalar_type() != at::kFloat && k.scalar_type() != at::kBFloat16) ||
      (step.bias.scalar_type() != at::kFloat &&
       step.bias.scalar_type() != at::kBFloat16) ||
      step.bias.dim() > 4 ||
      KernelDType(out_dtype) == kernels::DType::kNone) {
    return false;
  }
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), S = k.size(2);
  if (k.size(0) != B || k.size(1) != H || k.size(3) != D ||
      v.sizes() != k.sizes() || S < 1) {
    return false;
  }
  if (lora && !SlotsFit(step.slots, q, B)) return false;
  if (lora && step.mask.defined() &&
      (!OnDeviceOf(step.mask, q) || step.mask.scalar_type() != at::kFloat ||
       step.mask.numel() != B)) {
    return false;
  }
  if (store &&
      (!OnDeviceOf(step.k_new, q) || !OnDeviceOf(step.v_new, q) ||
       !OnDeviceOf(step.t, q) || step.k_new.sizes() != q.sizes() ||
       step.v_new.sizes() != q.sizes() ||
       step.k_new.strides() != step.v_new.strides() ||
       step.k_new.scalar_type() != at::kFloat ||
       step.v_new.scalar_type() != at::kFloat || step.k_new.stride(3) != 1 ||
       step.t.scalar_type() != at::kLong || step.t.dim() != 1 ||
       (step.t.numel() != 1 && step.t.numel() != B))) {
    return false;
  }
  if (step.v_lora != nullptr && !store) return false;
  const at::Tensor& starts = step.key_starts;
  if (starts.defined() &&
      (store || !OnDeviceOf(starts, q) || starts.scalar_type() != at::kInt ||
       starts.dim() != 1 || starts.numel() != B || !starts.is_contiguous())) {
    return false;
  }
  const at::Tensor& lens = step.key_lens;
  const bool known_lens = lens.defined() && starts.defined() &&
                          OnDeviceOf(lens, q) &&
                          lens.scalar_type() == at::kInt && lens.dim() == 1 &&
                          lens.numel() == B && lens.is_contiguous();
  static_assert(kMaxStepParts == kernels::kMaxStepParts);
  if (step.parts < 1 || step.parts > kMaxStepParts) return false;
  at::Tensor b4;
  try {
    b4 = step.bias.expand({B, H, 1, S});
  } catch (const c10::Error&) {
    return false;
  }
  const int64_t slots =
      step.q_lora != nullptr   ? step.q_lora->b.size(0)
      : step.v_lora != nullptr ? step.v_lora->b.size(0)
                               : 0;
  kernels::DecodeStepArgs x;
  at::Tensor q_scale, v_scale, mask1;
  if (!StepLora(step.q_lora, q, slots, &x.q_lora, &q_scale) ||
      !StepLora(step.v_lora, q, slots, &x.v_lora, &v_scale)) {
    return false;
  }
  kernels::AttentionArgs a = AttentionArgsOf(q, k, v, b4, out_dtype);
  if (starts.defined()) a.key_starts = starts.data_ptr<int32_t>();
  if (known_lens) x.key_lens = lens.data_ptr<int32_t>();
  x.stage_self = !StagedSelfStepOff();
  x.parts = static_cast<int>(step.parts);
  x.part_stride = step.part_stride;
  if (lora) {
    x.slots = step.slots.data_ptr<int64_t>();
    if (step.mask.defined()) {
      mask1 = step.mask.reshape({B});
      x.mask = mask1.data_ptr<float>();
      x.mask_stride = mask1.stride(0);
    }
  }
  if (store) {
    x.k_new = step.k_new.data_ptr<float>();
    x.v_new = step.v_new.data_ptr<float>();
    x.kv_new_stride[0] = step.k_new.stride(0);
    x.kv_new_stride[1] = step.k_new.stride(1);
    x.t = step.t.data_ptr<int64_t>();
    x.t_stride = step.t.numel() == 1 ? 0 : step.t.stride(0);
  }
  c10::cuda::CUDAGuard guard(q.device());
  // Written as [B, 1, H, D] and returned as its [B, H, 1, D] view (as
  // SmallAttention).
  at::Tensor result = at::empty({B, 1, H, D}, q.options().dtype(out_dtype));
  a.out = result.data_ptr();
  const int err = kernels::LaunchDecodeStepAttention(a, x, StreamOf(q));
  // The launcher's own checks (head size, alignment): nothing launched.
  if (err == static_cast<int>(cudaErrorInvalidValue)) return false;
  TORCH_CHECK(err == 0, "decode step attention kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *out = result.transpose(1, 2);
  return true;
}

namespace {

// LoraRunDeltas, and with `starts` defined LoraPackedRunDeltas (y and x
// [1, tokens, ...]; slot s's run the tokens starts[s] .. starts[s + 1] - 1,
// max_run the longest) or, x undefined, LoraPackedRunExpand (xa [1, tokens,
// ...]).
bool RunDeltas(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a,
               const at::Tensor& xa, const std::vector<LoraRunSite>& sites,
               double scale, const at::Tensor& y_round,
               const at::Tensor& starts, int64_t max_run,
               const LoraRunSlots* run_slots) {
  const bool shrink = x.defined();
  const bool packed = starts.defined();
  if (packed && (!StartsFit(starts, y) ||
                 y.dim() != 3 || y.size(0) != 1 || max_run < 1 ||
                 max_run > y.size(1))) {
    return false;
  }
  const at::Tensor& in = shrink ? x : xa;
  if (y_round.defined() &&
      ((shrink && !packed) || !OnDeviceOf(y_round, y) ||
       y_round.scalar_type() != at::kBFloat16 ||
       y_round.sizes() != y.sizes() || y_round.strides() != y.strides())) {
    return false;
  }
  static_assert(kLoraRunMaxSites ==
                static_cast<size_t>(kernels::kRunLoraMaxSites));
  if (sites.empty() || sites.size() > kLoraRunMaxSites ||
      !OnDeviceOf(y, y) || !OnDeviceOf(in, y) || y.dim() != 3 ||
      in.dim() != 3 || y.scalar_type() != at::kFloat ||
      in.scalar_type() != at::kFloat || in.size(0) != y.size(0) ||
      in.size(1) != y.size(1) || y.stride(2) != 1 || in.stride(2) != 1 ||
      (shrink && (!OnDeviceOf(a, y) || a.dim() != 3 ||
                  a.scalar_type() != at::kFloat ||
                  a.size(2) != x.size(2) || a.stride(2) != 1))) {
    return false;
  }
  const int64_t runs = packed ? starts.size(0) - 1 : y.size(0);
  const at::Tensor& b0 = sites[0].b;
  // Without a slot table the factors hold the runs' slots in order; with
  // one, the bank's (a and b alike).
  const int64_t bank = run_slots != nullptr ? b0.size(0) : runs;
  if (shrink && a.size(0) != bank) return false;
  if (run_slots != nullptr && !RunSlotsFit(*run_slots, runs, y)) return false;
  kernels::RunLoraArgs p;
  p.slots = runs;
  p.M = packed ? max_run : y.size(1);
  p.R = shrink ? a.size(1) : xa.size(2);
  p.r = p.R / static_cast<int64_t>(sites.size());
  p.num_sites = static_cast<int>(sites.size());
  for (size_t k = 0; k < sites.size(); ++k) {
    const at::Tensor& b = sites[k].b;
    if (!OnDeviceOf(b, y) || b.dim() != 3 || b.scalar_type() != at::kFloat ||
        b.sizes() != b0.sizes() ||
        b.strides() != b0.strides() || b.size(0) != bank ||
        b.size(2) != p.r || b.stride(2) != 1 || sites[k].col < 0 ||
        sites[k].col + b.size(1) > y.size(2)) {
      return false;
    }
    p.sites[k].b = b.data_ptr<float>();
    p.sites[k].col = sites[k].col;
    if (run_slots != nullptr) {
      const at::Tensor& scales = sites[k].scales;
      if (!OnDeviceOf(scales, y) || scales.scalar_type() != at::kFloat ||
          !scales.is_contiguous() || scales.numel() != bank) {
        return false;
      }
      p.sites[k].slot_scales = scales.data_ptr<float>();
    }
  }
  if (run_slots != nullptr) {
    p.run_slots = run_slots->slots.data_ptr<int64_t>();
    if (run_slots->mask.defined()) {
      p.run_mask = run_slots->mask.data_ptr<float>();
    }
  }
  p.out = b0.size(1);
  p.b_stride[0] = b0.stride(0);
  p.b_stride[1] = b0.stride(1);
  p.scale = static_cast<float>(scale);
  p.y = y.data_ptr<float>();
  p.y_stride[0] = packed ? 0 : y.stride(0);
  p.y_stride[1] = y.stride(1);
  if (y_round.defined()) p.y_bf16 = y_round.data_ptr();
  if (shrink) {
    p.x = x.data_ptr<float>();
    p.x_stride[0] = packed ? 0 : x.stride(0);
    p.x_stride[1] = x.stride(1);
    p.a = a.data_ptr<float>();
    p.a_stride[0] = a.stride(0);
    p.a_stride[1] = a.stride(1);
    p.in = x.size(2);
  } else {
    p.xa = xa.data_ptr<float>();
    p.xa_stride[0] = packed ? 0 : xa.stride(0);
    p.xa_stride[1] = xa.stride(1);
  }
  if (packed) p.run_starts = starts.data_ptr<int32_t>();
  c10::cuda::CUDAGuard device_guard(y.device());
  if (!kernels::RunLoraFits(p)) return false;
  // One scope per call: tests count the LoRA GEMMs a pass runs.
  RECORD_USER_SCOPE("lorahub::run_lora");
  at::Tensor xa_buffer;
  if (shrink) {
    xa_buffer = packed ? at::empty({y.size(1), p.R}, y.options())
                       : at::empty({p.slots, p.M, p.R}, y.options());
    p.xa_buffer = xa_buffer.data_ptr<float>();
  }
  const int err = kernels::LaunchRunLora(p, StreamOf(y));
  TORCH_CHECK(err == 0, "run LoRA kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return true;
}

}  // namespace

bool LoraRunDeltas(const at::Tensor& y, const at::Tensor& x,
                   const at::Tensor& a, const at::Tensor& xa,
                   const std::vector<LoraRunSite>& sites, double scale,
                   const at::Tensor& y_round, const LoraRunSlots* run_slots) {
  return RunDeltas(y, x, a, xa, sites, scale, y_round, at::Tensor(), 0,
                   run_slots);
}

bool LoraPackedRunDeltas(const at::Tensor& y, const at::Tensor& x,
                         const at::Tensor& a,
                         const std::vector<LoraRunSite>& sites, double scale,
                         const at::Tensor& starts, int64_t max_run,
                         const at::Tensor& y_round,
                         const LoraRunSlots* run_slots) {
  return RunDeltas(y, x, a, at::Tensor(), sites, scale, y_round, starts,
                   max_run, run_slots);
}

at::Tensor LoraPackedRunShrink(const at::Tensor& x, const at::Tensor& a,
                               const at::Tensor& starts, int64_t max_run) {
  if (x.dim() != 3 || x.size(0) != 1 || a.dim() != 3 || !OnDeviceOf(x, x) ||
      !OnDeviceOf(a, x) || x.scalar_type() != at::kFloat ||
      a.scalar_type() != at::kFloat || a.size(2) != x.size(2) ||
      x.stride(2) != 1 || a.stride(2) != 1 || !StartsFit(starts, x) ||
      starts.size(0) - 1 != a.size(0) || max_run < 1 || max_run > x.size(1)) {
    return at::Tensor();
  }
  kernels::RunLoraArgs p;
  p.slots = a.size(0);
  p.M = max_run;
  p.R = a.size(1);
  p.in = x.size(2);
  p.x = x.data_ptr<float>();
  p.x_stride[1] = x.stride(1);
  p.a = a.data_ptr<float>();
  p.a_stride[0] = a.stride(0);
  p.a_stride[1] = a.stride(1);
  p.run_starts = starts.data_ptr<int32_t>();
  c10::cuda::CUDAGuard device_guard(x.device());
  if (!kernels::RunShrinkGroupsFits(p)) return at::Tensor();
  RECORD_USER_SCOPE("lorahub::run_shrink");
  at::Tensor xa = at::empty({1, x.size(1), p.R}, x.options());
  p.xa_buffer = xa.data_ptr<float>();
  const int err = kernels::LaunchRunShrinkGroups(p, StreamOf(x));
  TORCH_CHECK(err == 0, "run shrink kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return xa;
}

bool LoraPackedRunExpand(const at::Tensor& y, const at::Tensor& xa,
                         const std::vector<LoraRunSite>& sites, double scale,
                         const at::Tensor& starts, int64_t max_run,
                         const at::Tensor& y_round) {
  return RunDeltas(y, at::Tensor(), at::Tensor(), xa, sites, scale, y_round,
                   starts, max_run, nullptr);
}

bool NarrowGemm(const at::Tensor& x, const at::Tensor& w, at::Tensor* out) {
  if (x.dim() != 3 || w.dim() != 3 || !x.is_cuda() || !w.is_cuda() ||
      x.device() != w.device() || x.scalar_type() != at::kFloat ||
      w.scalar_type() != at::kFloat || x.size(0) != w.size(0) ||
      x.size(2) != w.size(2) || x.stride(2) != 1 || w.stride(2) != 1) {
    return false;
  }
  kernels::NarrowGemmArgs a;
  a.G = x.size(0);
  a.M = x.size(1);
  a.N = w.size(1);
  a.K = x.size(2);
  a.x = x.data_ptr<float>();
  a.w = w.data_ptr<float>();
  for (int i = 0; i < 2; ++i) {
    a.x_stride[i] = x.stride(i);
    a.w_stride[i] = w.stride(i);
  }
  // The launcher's checks, first: false must leave *out alone.
  if (!kernels::NarrowGemmFits(a)) return false;
  // A GEMM to tests/model/objective_ops_test's counts, as the cuBLAS call it
  // replaces was; only once it runs (false must not count).
  RECORD_USER_SCOPE("lorahub::narrow_gemm");
  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor result = at::empty({a.G, a.M, a.N}, x.options());
  a.out = result.data_ptr<float>();
  const int err = kernels::LaunchNarrowGemm(a, StreamOf(x));
  TORCH_CHECK(err == 0, "narrow GEMM kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *out = result;
  return true;
}

bool TokenNll(const at::Tensor& logits, const at::Tensor& labels, at::Tensor* nll) {
  static_assert(kIgnoredLabel == kernels::kIgnoredLabel);
  if (logits.dim() != 3 || labels.dim() != 2 ||
      logits.scalar_type() != at::kBFloat16 ||
      labels.scalar_type() != at::kLong || !logits.is_contiguous() ||
      !labels.is_contiguous() || !OnDeviceOf(labels, logits) ||
      labels.size(0) != logits.size(0) || labels.size(1) != logits.size(1) ||
      logits.size(2) < 1 || labels.numel() < 1) {
    return false;
  }
  c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor out = at::empty(labels.sizes(), logits.options().dtype(at::kFloat));
  const int err = kernels::LaunchTokenNll(logits.data_ptr(), labels.numel(),
                                          logits.size(2), labels.data_ptr<int64_t>(),
                                          out.data_ptr<float>(), StreamOf(logits));
  TORCH_CHECK(err == 0, "token NLL kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *nll = out;
  return true;
}

namespace {

// A bf16 [rows, cols] weight with contiguous rows on x's device, 16-byte
// aligned (the kernel copies its rows 16 bytes at a time).
bool RowMajorBf16(const at::Tensor& w, const at::Tensor& x, int64_t rows, int64_t cols) {
  return w.defined() && w.scalar_type() == at::kBFloat16 && OnDeviceOf(w, x) &&
         w.dim() == 2 && w.size(0) == rows && w.size(1) == cols && w.stride(1) == 1 &&
         w.stride(0) == cols && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0;
}

// A contiguous bf16 [n] vector (a norm's weight) on x's device.
bool Bf16Vector(const at::Tensor& v, const at::Tensor& x, int64_t n) {
  return v.defined() && v.scalar_type() == at::kBFloat16 && OnDeviceOf(v, x) && v.dim() == 1 &&
         v.size(0) == n && v.is_contiguous();
}

// fp32 on x's device, `sizes`, the last dimension contiguous, every stride
// and the start a multiple of `align` elements.
bool Fp32Rows(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef sizes, int64_t align) {
  if (!t.defined() || t.scalar_type() != at::kFloat || !OnDeviceOf(t, x) ||
      t.sizes() != sizes || t.stride(-1) != 1 ||
      reinterpret_cast<uintptr_t>(t.data_ptr()) % (4 * align) != 0) {
    return false;
  }
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.stride(d) % align != 0) return false;
  }
  return true;
}

}  // namespace

bool PersistentDecoder(const std::vector<PersistentDecoderLayerInputs>& layers,
                       const at::Tensor& final_norm, const at::Tensor& embedded,
                       const at::Tensor& self_bias, const at::Tensor& cross_bias,
                       double eps, at::Tensor* hidden) {
  constexpr int64_t D = kernels::kPersistentDecoderModel;
  constexpr int64_t H = kernels::kPersistentDecoderHeads;
  constexpr int64_t DK = kernels::kPersistentDecoderHeadDim;
  constexpr int64_t F = kernels::kPersistentDecoderFeedForward;
  const at::Tensor& x = embedded;
  if (layers.empty() ||
      static_cast<int64_t>(layers.size()) > kernels::kPersistentDecoderMaxLayers ||
      x.scalar_type() != at::kFloat || x.dim() != 3 || x.size(2) != D ||
      x.size(0) < 1 || x.size(1) < 1 ||
      x.size(0) * x.size(1) > kernels::kPersistentDecoderMaxRows ||
      !Bf16Vector(final_norm, x, D)) {
    return false;
  }
  const int64_t B = x.size(0), T = x.size(1);
  const at::Tensor& k0 = layers[0].cross_k;
  if (!k0.defined() || k0.dim() != 4) return false;
  const int64_t S = k0.size(2);
  if (S < 1 || S > kernels::kPersistentDecoderMaxKeys ||
      !Fp32Rows(self_bias, x, {1, H, T, T}, 1) || !Fp32Rows(cross_bias, x, {B, 1, 1, S}, 1)) {
    return false;
  }
  kernels::PersistentDecoderArgs a;
  for (size_t l = 0; l < layers.size(); ++l) {
    const PersistentDecoderLayerInputs& in = layers[l];
    kernels::PersistentDecoderLayer& out = a.layer[l];
    for (int i = 0; i < kernels::kPdWeights; ++i) {
      const int64_t rows = i == kernels::kPdWi0 || i == kernels::kPdWi1 ? F : D;
      const int64_t cols = i == kernels::kPdWo ? F : D;
      if (!RowMajorBf16(in.weights[i], x, rows, cols)) return false;
      out.w[i] = in.weights[i].data_ptr();
    }
    for (int i = 0; i < 3; ++i) {
      if (!Bf16Vector(in.norms[i], x, D)) return false;
      out.norm[i] = in.norms[i].data_ptr();
    }
    // One set of strides for every layer's keys and values (float4 loads).
    for (const at::Tensor* kv : {&in.cross_k, &in.cross_v}) {
      if (!Fp32Rows(*kv, x, {B, H, S, DK}, 4) || kv->strides() != k0.strides()) return false;
    }
    out.cross_k = in.cross_k.data_ptr<float>();
    out.cross_v = in.cross_v.data_ptr<float>();
  }
  c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t R = B * T;
  const auto f32 = x.options();
  const auto bf = x.options().dtype(at::kBFloat16);
  at::Tensor residual = x.reshape({R, D}).clone(at::MemoryFormat::Contiguous);
  at::Tensor qkv = at::empty({R, 3 * D}, f32);
  at::Tensor ctx = at::empty({R, D}, bf);
  at::Tensor cross_q = at::empty({R, D}, f32);
  at::Tensor gelu = at::empty({R, F}, bf);
  at::Tensor partial = at::empty({kernels::kPersistentDecoderPartials}, f32);
  at::Tensor out = at::empty({B, T, D}, f32);
  at::Tensor counter =
      at::zeros({kernels::kPersistentDecoderCounters}, x.options().dtype(at::kInt));
  a.final_norm = final_norm.data_ptr();
  for (int d = 0; d < 3; ++d) a.cross_stride[d] = k0.stride(d);
  a.cross_bias = cross_bias.data_ptr<float>();
  a.cross_bias_stride = cross_bias.stride(0);
  a.self_bias = self_bias.data_ptr<float>();
  a.self_bias_stride[0] = self_bias.stride(1);
  a.self_bias_stride[1] = self_bias.stride(2);
  a.h = residual.data_ptr<float>();
  a.qkv = qkv.data_ptr<float>();
  a.ctx = ctx.data_ptr();
  a.cross_q = cross_q.data_ptr<float>();
  a.gelu = gelu.data_ptr();
  a.partial = partial.data_ptr<float>();
  a.out = out.data_ptr<float>();
  a.counter = reinterpret_cast<unsigned*>(counter.data_ptr<int>());
  a.layers = static_cast<int>(layers.size());
  a.B = static_cast<int>(B);
  a.T = static_cast<int>(T);
  a.S = static_cast<int>(S);
  a.eps = static_cast<float>(eps);
  RECORD_USER_SCOPE("lorahub::persistent_decoder");
  const int err = kernels::LaunchPersistentDecoder(a, StreamOf(x));
  if (err == static_cast<int>(cudaErrorNotSupported)) return false;  // nothing launched
  TORCH_CHECK(err == 0, "persistent decoder kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *hidden = out;
  return true;
}

bool GreedyTokens(const at::Tensor& logits, at::Tensor* unfinished,
                  int64_t pad, int64_t eos, at::Tensor* next,
                  const GreedyInto& into, bool* host_written) {
  if (logits.dim() != 2 ||
      (logits.scalar_type() != at::kFloat &&
       logits.scalar_type() != at::kBFloat16) ||
      !logits.is_contiguous() || logits.size(0) < 1 || logits.size(1) < 1) {
    return false;
  }
  if (unfinished != nullptr &&
      (unfinished->dim() != 1 || unfinished->size(0) != logits.size(0) ||
       unfinished->scalar_type() != at::kBool ||
       !unfinished->is_contiguous() || !OnDeviceOf(*unfinished, logits))) {
    return false;
  }
  const int64_t B = logits.size(0);
  // int64 [B] contiguous on the logits' device, as row slots are.
  if (into.device.defined() && !SlotsFit(into.device, logits, B)) return false;
  c10::cuda::CUDAGuard device_guard(logits.device());
  // The host buffer's address on the device, where it is mapped (pinned
  // memory is, with unified addressing); else the caller copies.
  int64_t* host_next = nullptr;
  const at::Tensor& host = into.host;
  if (host.defined() && host.device().is_cpu() &&
      host.scalar_type() == at::kLong && host.dim() == 1 &&
      host.size(0) == B && host.is_contiguous() && host.is_pinned()) {
    void* mapped = nullptr;
    if (cudaHostGetDevicePointer(&mapped, host.data_ptr(), 0) ==
        cudaSuccess) {
      host_next = static_cast<int64_t*>(mapped);
    } else {
      (void)cudaGetLastError();  // not sticky; clear it for later checks
    }
  }
  at::Tensor out = into.device.defined()
                       ? into.device
                       : at::empty({B}, logits.options().dtype(at::kLong));
  const int err = kernels::LaunchGreedyTokens(
      logits.data_ptr(),
      logits.scalar_type() == at::kFloat ? kernels::DType::kFloat
                                         : kernels::DType::kBFloat16,
      B, logits.size(1),
      unfinished != nullptr ? unfinished->data_ptr<bool>() : nullptr, pad, eos,
      out.data_ptr<int64_t>(), host_next, StreamOf(logits));
  TORCH_CHECK(err == 0, "greedy tokens kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *next = out;
  if (host_written != nullptr) *host_written = host_next != nullptr;
  return true;
}

bool StartDecoderStep(const at::Tensor& table, const at::Tensor& tokens,
                      const at::Tensor& self_bias, at::Tensor& t,
                      int64_t t_max, DecoderStepStart* out) {
  if (table.dim() != 2 || tokens.dim() != 1 || self_bias.dim() != 4 ||
      t.dim() != 1 || !OnDeviceOf(table, tokens) ||
      !OnDeviceOf(self_bias, tokens) || !OnDeviceOf(t, tokens) ||
      (table.scalar_type() != at::kFloat &&
       table.scalar_type() != at::kBFloat16) ||
      tokens.scalar_type() != at::kLong || t.scalar_type() != at::kLong ||
      self_bias.scalar_type() != at::kFloat || !table.is_contiguous() ||
      !tokens.is_contiguous() || !self_bias.is_contiguous() ||
      !t.is_contiguous() || self_bias.size(0) != 1 ||
      self_bias.size(2) != self_bias.size(3) ||
      (t.size(0) != 1 && t.size(0) != tokens.size(0))) {
    return false;
  }
  const int64_t B = tokens.size(0), R = t.size(0);
  const int64_t H = self_bias.size(1), C = self_bias.size(2);
  c10::cuda::CUDAGuard guard(tokens.device());
  const auto f32 = self_bias.options();
  at::Tensor hidden = at::empty({B, 1, table.size(1)}, f32);
  at::Tensor bias = at::empty({R, H, 1, C}, f32);
  at::Tensor t_step = at::empty_like(t);
  kernels::DecoderStepStartArgs a;
  a.table = table.data_ptr();
  a.tokens = tokens.data_ptr<int64_t>();
  a.self_bias = self_bias.data_ptr<float>();
  a.t = t.data_ptr<int64_t>();
  a.hidden = hidden.data_ptr<float>();
  a.bias = bias.data_ptr<float>();
  a.t_step = t_step.data_ptr<int64_t>();
  a.rows = B;
  a.t_rows = R;
  a.dim = table.size(1);
  a.vocab = table.size(0);
  a.heads = H;
  a.capacity = C;
  a.t_max = t_max;
  const int err = kernels::LaunchDecoderStepStart(
      a, KernelDType(table.scalar_type()), StreamOf(tokens));
  if (err == static_cast<int>(cudaErrorInvalidValue)) return false;
  TORCH_CHECK(err == 0, "decoder step start kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *out = DecoderStepStart{std::move(hidden), std::move(bias),
                          std::move(t_step)};
  return true;
}

bool RunShrink(const at::Tensor& x, const at::Tensor& a, at::Tensor* out) {
  if (x.dim() != 3 || a.dim() != 3 || !x.is_cuda() || !a.is_cuda() ||
      x.device() != a.device() || x.scalar_type() != at::kFloat ||
      a.scalar_type() != at::kFloat || x.size(0) != a.size(0) ||
      x.size(2) != a.size(2) || x.stride(2) != 1 || a.stride(2) != 1) {
    return false;
  }
  kernels::RunLoraArgs p;
  p.slots = x.size(0);
  p.M = x.size(1);
  p.R = a.size(1);
  p.in = x.size(2);
  p.x = x.data_ptr<float>();
  p.a = a.data_ptr<float>();
  for (int i = 0; i < 2; ++i) {
    p.x_stride[i] = x.stride(i);
    p.a_stride[i] = a.stride(i);
  }
  c10::cuda::CUDAGuard device_guard(x.device());  // the fit reads its SMs
  // The launcher's checks, first: false must leave *out alone.
  if (!kernels::RunShrinkFits(p)) return false;
  // A GEMM to tests/model/objective_ops_test's counts, as the cuBLAS call it
  // replaces was; only once it runs (false must not count).
  RECORD_USER_SCOPE("lorahub::run_shrink");
  at::Tensor result = at::empty({p.slots, p.M, p.R}, x.options());
  p.xa_buffer = result.data_ptr<float>();
  const int err = kernels::LaunchRunShrink(p, StreamOf(x));
  TORCH_CHECK(err == 0, "run shrink kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  *out = result;
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

bool BmmFloatInto(const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& out) {
  if (!OnDeviceOf(a, out) || !OnDeviceOf(b, out) ||
      a.scalar_type() != b.scalar_type() ||
      (a.scalar_type() != at::kBFloat16 && a.scalar_type() != at::kHalf) ||
      out.scalar_type() != at::kFloat || a.dim() != 3 || b.dim() != 3 ||
      out.dim() != 3 || out.size(0) != a.size(0) || out.size(1) != a.size(1) ||
      out.size(2) != b.size(2) || b.size(0) != a.size(0) ||
      b.size(1) != a.size(2) || out.stride(2) != 1 ||
      out.stride(1) < out.size(2)) {
    return false;
  }
  // bmm.dtype_out: the batched GEMM writes out through its strides.
  at::Tensor target = out;
  at::bmm_out(target, a, b, at::kFloat);
  return true;
}

bool SplitBf16(const at::Tensor& x, const at::Tensor& hi,
               const at::Tensor& lo) {
  if (!OnDeviceOf(hi, x) || !OnDeviceOf(lo, x) || x.scalar_type() != at::kFloat ||
      hi.scalar_type() != at::kBFloat16 || lo.scalar_type() != at::kBFloat16 ||
      x.dim() != 3 || hi.sizes() != x.sizes() || lo.sizes() != x.sizes() ||
      lo.strides() != hi.strides() || x.stride(2) != 1 || hi.stride(2) != 1 ||
      !lo.is_alias_of(hi)) {
    return false;
  }
  kernels::SplitBf16Args a;
  a.in = x.data_ptr<float>();
  a.hi = hi.data_ptr();
  a.G = x.size(0);
  a.R = x.size(1);
  a.C = x.size(2);
  for (int i = 0; i < 2; ++i) {
    a.in_stride[i] = x.stride(i);
    a.out_stride[i] = hi.stride(i);
  }
  a.lo_offset = lo.storage_offset() - hi.storage_offset();
  const c10::cuda::CUDAGuard guard(x.device());
  return kernels::LaunchSplitBf16(a, StreamOf(x)) == cudaSuccess;
}

bool SplitScoresSoftmax(const at::Tensor& scores, const at::Tensor& bias,
                        const at::Tensor& p, const at::Tensor& p_split) {
  if (!OnDeviceOf(bias, scores) || !OnDeviceOf(p, scores) ||
      !OnDeviceOf(p_split, scores) || scores.scalar_type() != at::kFloat ||
      bias.scalar_type() != at::kFloat || p.scalar_type() != at::kFloat ||
      p_split.scalar_type() != at::kBFloat16 || scores.dim() != 3 ||
      scores.size(1) % 2 != 0 || !scores.is_contiguous() ||
      !p.is_contiguous() || !p_split.is_contiguous()) {
    return false;
  }
  const int64_t B = scores.size(0), M = scores.size(1) / 2, S = scores.size(2);
  if (bias.dim() != 2 || bias.size(0) != B || bias.size(1) != S ||
      p.sizes() != at::IntArrayRef({B, M, S}) ||
      p_split.sizes() != at::IntArrayRef({B, M, 2 * S})) {
    return false;
  }
  kernels::SplitScoresSoftmaxArgs a;
  a.scores = scores.data_ptr<float>();
  a.bias = bias.data_ptr<float>();
  a.bias_stride[0] = bias.stride(0);
  a.bias_stride[1] = bias.stride(1);
  a.p = p.data_ptr<float>();
  a.p_split = p_split.data_ptr();
  a.B = B;
  a.M = M;
  a.S = S;
  const c10::cuda::CUDAGuard guard(scores.device());
  return kernels::LaunchSplitScoresSoftmax(a, StreamOf(scores)) == cudaSuccess;
}

bool HeadLoraDeltas(const at::Tensor& ctx, const at::Tensor& u,
                    const at::Tensor& w, const at::Tensor& slots,
                    const at::Tensor& row_scale) {
  if (!OnDeviceOf(u, ctx) || !OnDeviceOf(w, ctx) ||
      !OnDeviceOf(row_scale, ctx) || ctx.scalar_type() != at::kFloat ||
      u.scalar_type() != at::kFloat || w.scalar_type() != at::kFloat ||
      row_scale.scalar_type() != at::kFloat || ctx.dim() != 4 ||
      u.dim() != 4 || w.dim() != 3 || !ctx.is_contiguous() ||
      !u.is_contiguous() || !row_scale.is_contiguous() || w.stride(2) != 1) {
    return false;
  }
  const int64_t B = ctx.size(0), T = ctx.size(1), H = ctx.size(2),
                D = ctx.size(3), r = u.size(3);
  if (u.sizes() != at::IntArrayRef({B, T, H, r}) || w.size(1) != H * D ||
      w.size(2) != r || row_scale.dim() != 1 || row_scale.size(0) != B ||
      !SlotsFit(slots, ctx, B)) {
    return false;
  }
  kernels::HeadLoraArgs a;
  a.ctx = ctx.data_ptr<float>();
  a.u = u.data_ptr<float>();
  a.w = w.data_ptr<float>();
  a.w_stride[0] = w.stride(0);
  a.w_stride[1] = w.stride(1);
  a.slots = slots.data_ptr<int64_t>();
  a.row_scale = row_scale.data_ptr<float>();
  a.B = B;
  a.T = T;
  a.H = H;
  a.D = D;
  a.r = r;
  const c10::cuda::CUDAGuard guard(ctx.device());
  return kernels::LaunchHeadLoraDeltas(a, StreamOf(ctx)) == cudaSuccess;
}

bool WeightedSums(const std::vector<WeightedSum>& sums) {
  const at::Tensor& first = sums[0].dst;
  if (!first.is_cuda()) return false;
  // The job table, then the term table, in one pinned buffer copied in once.
  int64_t num_terms = 0, max_n = 0;
  for (const WeightedSum& s : sums) {
    num_terms += static_cast<int64_t>(s.terms.size());
    max_n = std::max<int64_t>(max_n, s.dst.numel());
  }
  if (sums.size() > static_cast<size_t>(INT32_MAX) || num_terms > INT32_MAX) return false;
  const int64_t job_bytes =
      static_cast<int64_t>(sums.size() * sizeof(kernels::WeightedSumJob));
  const int64_t bytes =
      job_bytes + num_terms * static_cast<int64_t>(sizeof(kernels::WeightedSumTerm));
  at::Tensor host = PinnedTable(bytes);
  auto* jobs = reinterpret_cast<kernels::WeightedSumJob*>(host.data_ptr());
  auto* terms =
      reinterpret_cast<kernels::WeightedSumTerm*>(host.data_ptr<uint8_t>() + job_bytes);
  int32_t next = 0;
  for (size_t j = 0; j < sums.size(); ++j) {
    const WeightedSum& s = sums[j];
    kernels::WeightedSumJob& job = jobs[j];
    job = kernels::WeightedSumJob();
    job.dst = s.dst.data_ptr();
    job.n = s.dst.numel();
    job.first_term = next;
    job.num_terms = static_cast<int32_t>(s.terms.size());
    job.fill = s.fill;
    job.dst_bf16 = s.dst.scalar_type() == at::kBFloat16 ? 1 : 0;
    for (size_t t = 0; t < s.terms.size(); ++t) {
      kernels::WeightedSumTerm& term = terms[next++];
      term = kernels::WeightedSumTerm();
      term.src = s.terms[t].data_ptr();
      term.weight = s.weights[t];
      term.src_bf16 = s.terms[t].scalar_type() == at::kBFloat16 ? 1 : 0;
    }
  }
  c10::cuda::CUDAGuard guard(first.device());
  const at::Tensor table = TableOn(host, first.device());
  // LORAHUB_WEIGHTED_SUM_SCALAR=1 (read once): the scalar loop for every job
  // (A/B; weighted_sum_kernels.cu says why not).
  static const bool scalar = EnvFlag("LORAHUB_WEIGHTED_SUM_SCALAR");
  const int err = kernels::LaunchWeightedSums(
      reinterpret_cast<const kernels::WeightedSumJob*>(table.data_ptr()),
      reinterpret_cast<const kernels::WeightedSumTerm*>(table.data_ptr<uint8_t>() + job_bytes),
      static_cast<int>(sums.size()), max_n, !scalar, StreamOf(first));
  TORCH_CHECK(err == 0, "weighted sums kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return true;
}

static_assert(kMaxSliceSumTerms == kernels::kMaxSliceTerms, "fused_ops.h's bound is the kernel's");

at::Tensor SliceSumTable(const std::vector<SliceSum>& sums) {
  const at::Tensor& first = sums[0].dst;
  if (!first.is_cuda() || sums.size() > static_cast<size_t>(INT32_MAX)) return at::Tensor();
  return JobTable<kernels::WeightedSumJob>(
      sums, first.device(), [](const SliceSum& s, kernels::WeightedSumJob& job) {
        job.dst = s.dst.data_ptr();
        job.n = s.dst.numel();
        job.num_terms = s.summed ? 1 : 0;  // the kernel reads "summed" only
        job.fill = s.fill;
        job.dst_bf16 = s.dst.scalar_type() == at::kBFloat16 ? 1 : 0;
        job.src_offset = s.offset;
      });
}

void RunSliceSums(const at::Tensor& table, int num_jobs, int64_t max_n,
                  const std::vector<at::Tensor>& terms, const std::vector<float>& weights) {
  kernels::SliceTerms launch;
  launch.num = static_cast<int32_t>(terms.size());
  for (size_t t = 0; t < terms.size(); ++t) {
    launch.terms[t].src = terms[t].data_ptr();
    launch.terms[t].weight = weights[t];
    launch.terms[t].src_bf16 = terms[t].scalar_type() == at::kBFloat16 ? 1 : 0;
  }
  c10::cuda::CUDAGuard guard(table.device());
  const int err = kernels::LaunchSliceSums(
      reinterpret_cast<const kernels::WeightedSumJob*>(table.data_ptr()), num_jobs, max_n,
      launch, StreamOf(table));
  TORCH_CHECK(err == 0, "slice sums kernel: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

at::Tensor Int8QuantizationTable(const std::vector<Int8Quantization>& jobs) {
  const at::Tensor& first = jobs[0].a;
  if (!first.is_cuda() || jobs.size() > static_cast<size_t>(INT32_MAX)) return at::Tensor();
  return JobTable<kernels::Int8FactorJob>(
      jobs, first.device(), [](const Int8Quantization& j, kernels::Int8FactorJob& job) {
        job.a = j.a.data_ptr<float>();
        job.b = j.b.data_ptr<float>();
        job.na = j.a.numel();
        job.nb = j.b.numel();
        job.a_q = static_cast<int8_t*>(j.a_q.data_ptr());
        job.b_q = static_cast<int8_t*>(j.b_q.data_ptr());
        job.lora_scale = j.lora_scale.data_ptr<float>();
        job.scale_out = j.scale_out.data_ptr<float>();
      });
}

void RunInt8Quantization(const at::Tensor& table, int num_jobs) {
  c10::cuda::CUDAGuard guard(table.device());
  const int err = kernels::LaunchQuantizeFactorsInt8(
      reinterpret_cast<const kernels::Int8FactorJob*>(table.data_ptr()), num_jobs,
      StreamOf(table));
  TORCH_CHECK(err == 0, "int8 factor quantization kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

at::Tensor LowRankMergeTable(const std::vector<LowRankUpdate>& updates,
                             int64_t* max_tiles, bool* tensor_cores) {
  const at::Tensor& first = updates[0].w;
  if (!first.is_cuda() || updates.size() > static_cast<size_t>(INT32_MAX)) return at::Tensor();
  auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  std::vector<kernels::LowRankMergeJob> jobs(updates.size());
  *max_tiles = 0;
  *tensor_cores = true;
  for (size_t j = 0; j < updates.size(); ++j) {
    const LowRankUpdate& u = updates[j];
    const int64_t rows = u.w.size(0), cols = u.w.size(1), rank = u.a.size(0);
    if (rank < 1 || rank > kernels::kMaxLowRankMergeRank || cols % 4 != 0 || !aligned(u.w) ||
        !aligned(u.out)) {
      return at::Tensor();
    }
    kernels::LowRankMergeJob& job = jobs[j];
    job.w = u.w.data_ptr();
    job.out = u.out.data_ptr();
    job.a = u.a.data_ptr<float>();
    job.b = u.b.data_ptr<float>();
    job.rows = rows;
    job.cols = cols;
    job.rank = static_cast<int32_t>(rank);
    job.scale = u.scale;
    job.bf16 = u.w.scalar_type() == at::kBFloat16 ? 1 : 0;
    *tensor_cores = *tensor_cores && job.bf16 == 1 && rank % 4 == 0 && aligned(u.a) &&
                    aligned(u.b);
    *max_tiles = std::max(*max_tiles, kernels::LowRankMergeTiles(rows, cols));
  }
  if (*max_tiles > INT32_MAX) return at::Tensor();
  const int64_t bytes = static_cast<int64_t>(jobs.size() * sizeof(kernels::LowRankMergeJob));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.data_ptr(), jobs.data(), static_cast<size_t>(bytes));
  return host.to(first.device());
}

bool ComposeFromBf16(const at::Tensor& w, const at::Tensor& factors, const at::Tensor& out) {
  if (!factors.is_cuda()) return false;
  c10::cuda::CUDAGuard guard(factors.device());
  const int err = kernels::LaunchComposeBf16(
      w.data_ptr<float>(), static_cast<int>(factors.size(0)), factors.data_ptr(),
      factors.size(1), out.data_ptr<float>(), StreamOf(factors));
  TORCH_CHECK(err == 0, "bf16 composition kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return true;
}

bool ComposeRows(const at::Tensor& w, const at::Tensor& factors, const at::Tensor& out) {
  c10::cuda::CUDAGuard guard(factors.device());
  const int err = kernels::LaunchComposeRows(
      w.data_ptr<float>(), static_cast<int>(w.size(0)), static_cast<int>(factors.size(0)),
      factors.data_ptr<float>(), factors.size(1), out.data_ptr<float>(), StreamOf(factors));
  TORCH_CHECK(err == 0, "composition kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return true;
}

void RunLowRankMerge(const at::Tensor& table, int num_jobs, int64_t max_tiles,
                     bool tensor_cores, int max_blocks) {
  c10::cuda::CUDAGuard guard(table.device());
  const int err = kernels::LaunchLowRankMerge(
      reinterpret_cast<const kernels::LowRankMergeJob*>(table.data_ptr()), num_jobs, max_tiles,
      tensor_cores, max_blocks, StreamOf(table));
  TORCH_CHECK(err == 0, "low-rank merge kernel: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace lorahub::model::fused_backend
