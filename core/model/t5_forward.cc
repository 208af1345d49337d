#include "core/model/t5_forward.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/fused_ops.h"
#include "core/model/query_side_cross.h"
#include "core/model/t5_layers.h"

namespace lorahub::model {
namespace internal {
namespace {

// The input of a matmul against `weight`: x rounded to the weight's dtype.
at::Tensor MatmulInput(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() == weight.scalar_type() ? x
                                                 : x.to(weight.scalar_type());
}

at::Tensor SplitHeads(const at::Tensor& x, int64_t heads, int64_t d_kv) {
  return x.view({x.size(0), x.size(1), heads, d_kv}).transpose(1, 2);
}

at::Tensor Activation(const at::Tensor& x, const std::string& name) {
  if (name == "relu") return at::relu(x);
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" ||
      name == "gelu_fast") {
    // transformers' NewGELU formula; one kernel (internally fp32).
    return at::gelu(x, "tanh");
  }
  if (name == "gelu") return at::gelu(x);
  if (name == "silu" || name == "swish") return at::silu(x);
  TORCH_CHECK(false, "unsupported activation '", name, "'");
}

// act(gate) * up; the tanh GELU as one fused op (fused_ops.h) when both
// have one dtype (with a LoRA delta on only one of them, they do not).
at::Tensor GatedActivation(const at::Tensor& gate, const at::Tensor& up,
                           const std::string& name) {
  if ((name == "gelu_new" || name == "gelu_pytorch_tanh" ||
       name == "gelu_fast") &&
      gate.scalar_type() == up.scalar_type()) {
    return GatedGeluTanh(gate, up);
  }
  return Activation(gate, name) * up;
}

// The LM head's GEMM input for the final norm's output h: h (scaled where
// the model says) rounded once to the compute dtype.
at::Tensor LmHeadInput(const T5Weights& w, at::Tensor h) {
  if (w.scale_decoder_outputs) h = h * std::pow(w.config.d_model, -0.5);
  return MatmulInput(h, w.lm_head);
}

// Logits in the compute dtype.
at::Tensor LmHeadLogits(const T5Weights& w, const at::Tensor& h) {
  return at::matmul(LmHeadInput(w, h), w.lm_head.t());
}

// Logits in fp32: LmHeadLogits widened before anything reads them.
at::Tensor LmHead(const T5Weights& w, const at::Tensor& h) {
  return LmHeadLogits(w, h).to(at::kFloat);
}

}  // namespace

// Host-side checks only.
bool AdjacentFactors(const at::Tensor& p, const at::Tensor& n) {
  if (!p.defined() || !n.defined() || p.dim() != 3 || n.sizes() != p.sizes() ||
      n.strides() != p.strides() || n.scalar_type() != p.scalar_type() ||
      n.device() != p.device() || p.stride(2) != 1 ||
      p.stride(1) != p.size(2) || !n.is_alias_of(p)) {
    return false;
  }
  const int64_t block = p.size(1) * p.size(2);
  return static_cast<const char*>(n.data_ptr()) ==
         static_cast<const char*>(p.data_ptr()) + block * p.element_size();
}

at::Tensor SideBySideA(const at::Tensor& a0, int64_t count) {
  if (count == 1) return a0;
  return a0.as_strided({a0.size(0), count * a0.size(1), a0.size(2)},
                       {a0.stride(0), a0.size(2), 1});
}

bool Adapted(const RowAdapters& rows, int site) {
  return rows.bank != nullptr && site >= 0 &&
         rows.bank->sites[site].a.defined();
}

// Runs stay on cuBLAS's batched GEMM: there the NarrowGemm kernel, which
// reads a slot's A once per 8 rows, was slower (a CMA-ES population, a
// per-row prefill).
at::Tensor DownProject(const at::Tensor& xin, const at::Tensor& a,
                       const RowAdapters& rows, bool narrow) {
  const int64_t in = xin.size(-1);
  if (rows.uniform_slot >= 0) {
    const at::Tensor a1 = a[rows.uniform_slot];  // [R, in]
    at::Tensor out;
    if (narrow &&
        NarrowGemm(xin.reshape({1, -1, in}), a1.unsqueeze(0), &out)) {
      std::vector<int64_t> sizes = xin.sizes().vec();
      sizes.back() = a1.size(0);
      return out.view(sizes);
    }
    return at::matmul(xin, a1.t());
  }
  // Rows come in runs of rows_per_slot per slot (slot_offset, +1, ...): one
  // batched GEMM over the slots, no gather of A.
  const int64_t slots = xin.size(0) / rows.rows_per_slot;
  return at::bmm(xin.reshape({slots, -1, in}),
                 a.narrow(0, rows.slot_offset, slots).transpose(1, 2));
}

// Everything below may throw c10::Error; the public functions catch it.

double MinValue(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return -3.3895313892515355e38;  // finfo(bf16).min
    case at::kHalf:
      return -65504.0;
    case at::kDouble:
      return std::numeric_limits<double>::lowest();
    default:
      return std::numeric_limits<float>::lowest();
  }
}

// The variance, the scaling and the weight multiply in fp32 whatever the
// dtype of x (the fp32 residual stream), then ONE rounding to the compute
// dtype for the matmuls (fused_ops.h: one kernel on CUDA). In fp32 this is
// transformers' arithmetic exactly; in bf16 transformers rounds
// x * rsqrt(variance) to bf16 and multiplies by the weight in bf16.
Normed RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps,
               at::ScalarType compute) {
  NormOutput n = model::RmsNorm(x, weight, eps, compute);
  return Normed{std::move(n.rounded), std::move(n.full)};
}

// Reduced-precision mode (bf16/fp16 compute dtype): weights and matmul
// inputs are in the compute dtype (the BLAS accumulates in fp32), and what
// the output of a bf16 matmul feeds is fp32: the residual stream between
// sublayers, RMS norm, attention scores, position bias, masks and softmax,
// the LoRA delta (added to the base output before any rounding), and the
// logits. In fp32 mode every cast below is a no-op.

namespace {

// True when an input projection of the feed-forward sublayer (wi, wi_0,
// wi_1) takes a per-row LoRA delta, whose input is the norm's fp32 output.
bool FeedForwardAdapted(const FeedForwardWeights& ff,
                        const RowAdapters& rows) {
  return Adapted(rows, ff.wi.site) || Adapted(rows, ff.wi_0.site) ||
         Adapted(rows, ff.wi_1.site);
}

// The input of the LoRA deltas: `x_full` when given (x before its rounding
// to the compute dtype), else x; fp32.
at::Tensor LoraInput(const at::Tensor& x, const at::Tensor& x_full) {
  return (x_full.defined() ? x_full : x).to(at::kFloat);
}

// True when the delta of `sb` runs in the low-precision output `y` itself:
// the bank's factors are in y's dtype (bf16/fp16; ObjectiveRunner with
// bf16_lora composes so, the scaling folded into B). Then x A^T and the
// accumulation into y are GEMMs in that dtype (fp32 accumulation inside
// the BLAS; y + delta rounded once), from the rounded input x, and the
// output stays in the compute dtype: no widening of y, no fp32 GEMMs.
// A bank is all-fp32 or (ObjectiveRunner on a bf16 model) all-bf16.
bool LowPrecisionDelta(const SiteBank& sb, at::ScalarType y) {
  return y != at::kFloat && sb.a.scalar_type() == y &&
         sb.b.scalar_type() == y;
}

// True when the rows' layout runs the LoRA factors as plain or batched GEMMs
// over the bank's slots (one slot for all rows; runs of rows per slot with a
// common scaling), i.e. without a gather of A and B.
bool GemmLayout(const RowAdapters& rows, const SiteBank& sb) {
  return rows.uniform_slot >= 0 ||
         (rows.rows_per_slot > 0 && !std::isnan(sb.common_scale));
}

// y [B, T, N] (rows of one stride, B a multiple of `slots`) as [slots,
// B / slots * T, N]: a view, also of a column slice of a wider output.
at::Tensor RunView(const at::Tensor& y, int64_t slots) {
  const int64_t per_slot = y.size(0) / slots * y.size(1);
  return y.as_strided({slots, per_slot, y.size(2)},
                      {per_slot * y.stride(1), y.stride(1), y.stride(2)},
                      y.storage_offset());
}

// y += scale * xa B^T in place for a GemmLayout (xa from DownProject, or a
// column slice of it). The scaling is folded into the accumulating GEMM when
// every slot has the same one. `narrow`: as DownProject's; runs then take
// the run kernel's expand (fused_ops.h LoraRunDeltas) where it runs.
void UpProjectAdd(at::Tensor y, const at::Tensor& xa, const SiteBank& sb,
                  const RowAdapters& rows, bool narrow) {
  const int64_t out = y.size(-1);
  if (rows.uniform_slot >= 0) {
    const at::Tensor& b = sb.b[rows.uniform_slot];  // [out, r]
    if (!std::isnan(sb.common_scale)) {
      y.view({-1, out}).addmm_(xa.reshape({-1, b.size(1)}), b.t(),
                               /*beta=*/1, /*alpha=*/sb.common_scale);
      return;
    }
    y.add_(at::matmul(xa, b.t()) * sb.scale[rows.uniform_slot]);
    return;
  }
  const int64_t slots = xa.size(0);
  if (narrow && y.dim() == 3 && y.size(0) % slots == 0 &&
      y.stride(0) == y.size(1) * y.stride(1) &&
      LoraRunDeltas(RunView(y, slots), at::Tensor(), at::Tensor(), xa,
                    {{sb.b.narrow(0, rows.slot_offset, slots), 0}},
                    sb.common_scale)) {
    return;
  }
  y.view({slots, -1, out})
      .baddbmm_(xa, sb.b.narrow(0, rows.slot_offset, slots).transpose(1, 2),
                /*beta=*/1, /*alpha=*/sb.common_scale);
}

// Single-token rows (decode steps) on CUDA: the deltas of sites[i, j) (their
// A factors side by side when j - i > 1: AdjacentA) added into their column
// slices of y by fused_ops' gather-free per-row kernels (LoraRowDeltas): one
// shrink for the run, one expand per site. False, having changed nothing,
// where those do not run; the caller then runs the GEMMs.
bool RowGemvDeltas(const at::Tensor& y, const std::vector<int64_t>& cols,
                   const std::vector<const SiteBank*>& sites, size_t i,
                   size_t j, const at::Tensor& xin, const RowAdapters& rows) {
  if (!xin.is_cuda() || xin.dim() != 3 || xin.size(1) != 1 || y.dim() != 3 ||
      y.size(1) != 1 || !LoraRowGemvEnabled()) {
    return false;
  }
  // The low-precision copies where every site of the run has them (same
  // layout as a and b; lora.h AttachRowKernelCopies).
  bool low = true;
  for (size_t k = i; k < j; ++k) low = low && sites[k]->a_low.defined();
  const at::Tensor& a0 = low ? sites[i]->a_low : sites[i]->a;  // [S, r, in]
  const int64_t r = a0.size(1);
  const at::Tensor a = SideBySideA(a0, static_cast<int64_t>(j - i));
  std::vector<LoraRowSite> run;
  for (size_t k = i; k < j; ++k) {
    run.push_back({cols[k], static_cast<int64_t>(k - i) * r,
                   low ? sites[k]->b_low : sites[k]->b, sites[k]->scale});
  }
  return LoraRowDeltas(y.select(1, 0), xin.select(1, 0), a, run, rows.slots,
                       rows.all_rows ? at::Tensor() : rows.mask);
}

// Runs of rows per slot (GemmLayout without a uniform slot): the deltas of
// sites[i, j) (their A factors side by side: AdjacentA) into their column
// slices of y by the run kernels (fused_ops.h LoraRunDeltas: the shrink,
// one expand for every site), for callers whose `narrow` holds (a
// reduced-precision model). False, having changed nothing, where they do
// not run; the caller then runs the GEMMs.
bool RunKernelDeltas(const at::Tensor& y, const std::vector<int64_t>& cols,
                     const std::vector<const SiteBank*>& sites, size_t i,
                     size_t j, const at::Tensor& xin, const RowAdapters& rows) {
  if (rows.uniform_slot >= 0 || rows.rows_per_slot <= 0 || y.dim() != 3 ||
      xin.dim() != 3 || xin.size(0) % rows.rows_per_slot != 0 ||
      y.stride(0) != y.size(1) * y.stride(1)) {
    return false;
  }
  const double scale = sites[i]->common_scale;
  for (size_t k = i; k < j; ++k) {
    if (std::isnan(sites[k]->common_scale) || sites[k]->common_scale != scale) {
      return false;
    }
  }
  const int64_t slots = xin.size(0) / rows.rows_per_slot;
  const at::Tensor a_run =
      SideBySideA(sites[i]->a, static_cast<int64_t>(j - i));  // [S, R, in]
  std::vector<LoraRunSite> run;
  for (size_t k = i; k < j; ++k) {
    run.push_back({sites[k]->b.narrow(0, rows.slot_offset, slots), cols[k]});
  }
  const at::Tensor x = xin.reshape({slots, -1, xin.size(2)});
  return LoraRunDeltas(RunView(y, slots), x,
                       a_run.narrow(0, rows.slot_offset, slots), at::Tensor(),
                       run, scale);
}

// y += the per-row LoRA delta of `sb` for input `xin`, in place. y: fp32
// [B, T, out], possibly a column slice of a wider output (fused GEMMs): the
// GEMMs with accumulate write through its leading dimension, no copy.
// xin: fp32 [B, T, in]. The arithmetic is that of adding the delta to a
// separate output, y + scale * (x A^T) B^T.
void AddLoraDelta(at::Tensor y, const at::Tensor& xin, const SiteBank& sb,
                  const RowAdapters& rows, bool narrow) {
  if (RowGemvDeltas(y, {0}, {&sb}, 0, 1, xin, rows)) return;
  if (GemmLayout(rows, sb)) {
    if (narrow && RunKernelDeltas(y, {0}, {&sb}, 0, 1, xin, rows)) return;
    UpProjectAdd(y, DownProject(xin, sb.a, rows, narrow), sb, rows, narrow);
    return;
  }
  const int64_t in = xin.size(-1);
  at::Tensor a = sb.a.index_select(0, rows.slots);          // [B, r, in]
  at::Tensor b = sb.b.index_select(0, rows.slots);          // [B, out, r]
  at::Tensor scale = sb.scale.index_select(0, rows.slots);  // [B, 1, 1]
  if (!rows.all_rows) scale = scale * rows.mask;
  at::Tensor delta =
      at::bmm(at::bmm(xin.reshape({xin.size(0), -1, in}), a.transpose(1, 2)),
              b.transpose(1, 2));
  y.add_(delta.view(y.sizes()) * scale.view({-1, 1, 1}));
}

bool AdjacentA(const SiteBank& prev, const SiteBank& next) {
  return AdjacentFactors(prev.a, next.a);
}

// The up-projections of sites[i, j) for one slot (rows.uniform_slot) as ONE
// batched GEMM over the sites, where their layout allows it: B factors
// side by side in memory (ObjectiveRunner lays composed factors out so),
// output column slices of one width at a fixed step (q and v of a fused
// q|k|v; the cross-attention values of every decoder block in the k|v
// chunk), one common scaling. xa [B, T, (j - i) r] from the shared
// down-projection. Why: each up-projection is a tiny GEMM whose time is
// mostly its launch (a flan-t5-large objective evaluation ran 144 of them).
// fp32 only (the default path; oneDNN on the CPU rejects a bf16 batched GEMM
// with this strided output). False, having changed nothing, where the
// layout does not allow it.
bool UpProjectBatched(const at::Tensor& y, const std::vector<int64_t>& cols,
                      const std::vector<const SiteBank*>& sites, size_t i,
                      size_t j, const at::Tensor& xa, const RowAdapters& rows) {
  static const bool off = EnvFlag("LORAHUB_NO_BATCHED_UP");  // A/B
  const int64_t count = static_cast<int64_t>(j - i);
  const at::Tensor& b0 = sites[i]->b;  // [S, out, r]
  const int64_t slot = rows.uniform_slot;
  if (off || slot < 0 || count < 2 || y.dim() != 3 || xa.dim() != 3 ||
      b0.dim() != 3 || std::isnan(sites[i]->common_scale) ||
      y.scalar_type() != at::kFloat || b0.scalar_type() != at::kFloat ||
      xa.scalar_type() != at::kFloat ||
      y.stride(2) != 1 || y.stride(0) != y.size(1) * y.stride(1) ||
      !xa.is_contiguous() || b0.stride(2) != 1) {
    return false;
  }
  const int64_t out = b0.size(1), r = b0.size(2);
  const int64_t col_step = cols[i + 1] - cols[i];
  // Element offset of site k's B from site i's (same storage: is_alias_of).
  const auto offset = [&](const at::Tensor& b) {
    return b.storage_offset() - b0.storage_offset();
  };
  const int64_t b_step = offset(sites[i + 1]->b);
  if (col_step < out || b_step <= 0 || xa.size(2) != count * r) return false;
  for (size_t k = i + 1; k < j; ++k) {
    const at::Tensor& b = sites[k]->b;
    const int64_t n = static_cast<int64_t>(k - i);
    if (b.sizes() != b0.sizes() || b.strides() != b0.strides() ||
        b.scalar_type() != at::kFloat || !b.is_alias_of(b0) ||
        offset(b) != n * b_step ||
        cols[k] - cols[i] != n * col_step ||
        sites[k]->common_scale != sites[i]->common_scale) {
      return false;
    }
  }
  const int64_t M = y.size(0) * y.size(1);
  at::Tensor ys = y.as_strided({count, M, out}, {col_step, y.stride(1), 1},
                               y.storage_offset() + cols[i]);
  const at::Tensor xs =
      xa.as_strided({count, M, r}, {r, count * r, 1}, xa.storage_offset());
  const at::Tensor bt =  // B^T of each site for this slot: [count, r, out]
      b0.as_strided({count, r, out}, {b_step, 1, b0.stride(1)},
                    b0.storage_offset() + slot * b0.stride(0));
  ys.baddbmm_(xs, bt, /*beta=*/1, /*alpha=*/sites[i]->common_scale);
  return true;
}

// The LoRA deltas of several sites that read the same input `xin`, each
// added into its column slice of y (cols[i], width of its output). Sites
// whose A factors lie side by side (AdjacentA) share ONE down-projection
// GEMM in a GemmLayout; the others run alone. Only adapted sites are given.
// `narrow`: as DownProject's.
void AddLoraDeltas(const at::Tensor& y, const std::vector<int64_t>& cols,
                   const std::vector<const SiteBank*>& sites,
                   const at::Tensor& xin, const RowAdapters& rows,
                   bool narrow);

// Row `b` of packed rows (EncodePacked) as a batch of its own, unpacked: its
// slot and mask, its run's slot where the rows came in runs.
RowAdapters PackedRow(const RowAdapters& rows, int64_t b) {
  RowAdapters one = rows;
  one.packed = nullptr;
  one.packed_runs = nullptr;
  one.slots = rows.slots.narrow(0, b, 1);
  one.mask = rows.mask.narrow(0, b, 1);
  if (rows.rows_per_slot > 0) {
    one.slot_offset = rows.slot_offset + b / rows.rows_per_slot;
    one.rows_per_slot = 1;
  }
  return one;
}

// AddLoraDeltas for packed rows (y [1, N, columns], xin [1, N, in]) with
// per-row adapters. Runs of rows per slot (one row or more; packed_runs
// gives each slot's tokens where a run has several rows) with a common
// scaling, for a reduced-precision model (`narrow`, as RunKernelDeltas),
// take the packed run kernels (fused_ops.h LoraPackedRunDeltas), a group
// of sites with adjacent A factors at once. The rest goes row by row
// through the unpacked paths: the same deltas, at a launch or more per row
// (the CPU, other layouts).
void PackedLoraDeltas(const at::Tensor& y, const std::vector<int64_t>& cols,
                      const std::vector<const SiteBank*>& sites,
                      const at::Tensor& xin, const RowAdapters& rows,
                      bool narrow) {
  const PackedRows& packed = *rows.packed;
  const int64_t B = static_cast<int64_t>(packed.host_starts.size()) - 1;
  const PackedRows* runs = rows.rows_per_slot == 1 ? &packed
                           : rows.rows_per_slot > 1 ? rows.packed_runs
                                                    : nullptr;
  const int64_t slots =
      runs != nullptr ? static_cast<int64_t>(runs->host_starts.size()) - 1 : 0;
  // Sites [i, j) through the packed run kernels, or false (nothing done).
  const auto run_kernels = [&](size_t i, size_t j) {
    const double scale = sites[i]->common_scale;
    bool common = !std::isnan(scale);
    for (size_t k = i; k < j; ++k) {
      common = common && sites[k]->common_scale == scale;
    }
    if (!common) return false;
    std::vector<LoraRunSite> run;
    for (size_t k = i; k < j; ++k) {
      run.push_back({sites[k]->b.narrow(0, rows.slot_offset, slots), cols[k]});
    }
    const at::Tensor a_run =
        SideBySideA(sites[i]->a, static_cast<int64_t>(j - i))
            .narrow(0, rows.slot_offset, slots);
    return LoraPackedRunDeltas(y, xin, a_run, run, scale, runs->starts,
                               runs->max_length);
  };
  size_t i = 0;
  while (narrow && runs != nullptr && i < sites.size()) {
    size_t j = i + 1;
    while (j < sites.size() && j - i < kLoraRunMaxSites &&
           AdjacentA(*sites[j - 1], *sites[j])) {
      ++j;
    }
    if (run_kernels(i, j)) {
      i = j;
      continue;
    }
    // A group whose ranks together the shrink does not take (it takes 8,
    // 16 or 32): one site at a time.
    if (j - i == 1 || !run_kernels(i, i + 1)) break;
    ++i;
  }
  if (i == sites.size()) return;
  const std::vector<const SiteBank*> rest(sites.begin() + i, sites.end());
  const std::vector<int64_t> rest_cols(cols.begin() + i, cols.end());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t first = packed.host_starts[b];
    const int64_t len = packed.host_starts[b + 1] - first;
    if (len <= 0) continue;
    AddLoraDeltas(y.narrow(1, first, len), rest_cols, rest,
                  xin.narrow(1, first, len), PackedRow(rows, b), narrow);
  }
}

void AddLoraDeltas(const at::Tensor& y, const std::vector<int64_t>& cols,
                   const std::vector<const SiteBank*>& sites,
                   const at::Tensor& xin, const RowAdapters& rows,
                   bool narrow) {
  if (rows.packed != nullptr && rows.uniform_slot < 0) {
    PackedLoraDeltas(y, cols, sites, xin, rows, narrow);
    return;
  }
  size_t i = 0;
  while (i < sites.size()) {
    size_t j = i + 1;
    bool gemm = GemmLayout(rows, *sites[i]);
    while (j < sites.size() && AdjacentA(*sites[j - 1], *sites[j])) {
      gemm = gemm && GemmLayout(rows, *sites[j]);
      ++j;
    }
    if (RowGemvDeltas(y, cols, sites, i, j, xin, rows)) {
      i = j;
      continue;
    }
    if (j - i < 2 || !gemm) {
      for (size_t k = i; k < j; ++k) {
        AddLoraDelta(y.narrow(-1, cols[k], sites[k]->b.size(1)), xin,
                     *sites[k], rows, narrow);
      }
      i = j;
      continue;
    }
    if (narrow && RunKernelDeltas(y, cols, sites, i, j, xin, rows)) {
      i = j;
      continue;
    }
    const int64_t r = sites[i]->a.size(1);
    const at::Tensor a_run =
        SideBySideA(sites[i]->a, static_cast<int64_t>(j - i));
    const at::Tensor xa = DownProject(xin, a_run, rows, narrow);
    if (UpProjectBatched(y, cols, sites, i, j, xa, rows)) {
      i = j;
      continue;
    }
    for (size_t k = i; k < j; ++k) {
      UpProjectAdd(y.narrow(-1, cols[k], sites[k]->b.size(1)),
                   xa.narrow(-1, static_cast<int64_t>(k - i) * r, r),
                   *sites[k], rows, narrow);
    }
    i = j;
  }
}

// The adapted ones among `members` (rows of `fused`): their sites, their
// column offsets in `fused` and their indices in `members`.
struct AdaptedMembers {
  std::vector<const SiteBank*> sites;
  std::vector<int64_t> cols;
  std::vector<size_t> which;
};
AdaptedMembers AdaptedOf(const at::Tensor& fused,
                         const std::vector<const Linear*>& members,
                         const RowAdapters& rows) {
  AdaptedMembers out;
  for (size_t k = 0; k < members.size(); ++k) {
    if (!Adapted(rows, members[k]->site)) continue;
    out.sites.push_back(&rows.bank->sites[members[k]->site]);
    out.cols.push_back(FusedRowOffset(fused, members[k]->weight));
    out.which.push_back(k);
  }
  return out;
}

// One GEMM against a fused weight whose row blocks are `members`' weights
// (FusedQkv etc. checked), then each adapted member's LoRA delta added into
// its column slice of the output (Project is its one-member case): the
// compute dtype when no member is adapted, else fp32 (all columns).
//
// float_out: the caller widens the output to fp32 anyway (fp32 attention
// reads it): then it is the GEMM's fp32 accumulator (MatmulFloat) also
// without a delta, so q, k and v are never rounded to the compute dtype,
// fused or not, adapted or not.
at::Tensor ProjectFused(const at::Tensor& x, const at::Tensor& fused,
                        const std::vector<const Linear*>& members,
                        const RowAdapters& rows, const at::Tensor& x_full,
                        bool float_out) {
  const at::Tensor xm = MatmulInput(x, fused);
  const AdaptedMembers adapted = AdaptedOf(fused, members, rows);
  const std::vector<const SiteBank*>& sites = adapted.sites;
  const std::vector<int64_t>& cols = adapted.cols;
  if (sites.empty()) {
    return float_out ? MatmulFloat(xm, fused) : at::matmul(xm, fused.t());
  }
  bool low = true;
  for (const SiteBank* sb : sites) {
    low = low && LowPrecisionDelta(*sb, fused.scalar_type());
  }
  if (low) {
    at::Tensor y = at::matmul(xm, fused.t());
    AddLoraDeltas(y, cols, sites, xm, rows, /*narrow=*/false);
    return y;
  }
  at::Tensor y = MatmulFloat(xm, fused);  // the fp32 delta goes into fp32
  const bool reduced = xm.scalar_type() != at::kFloat;
  const Tf32LoraScope tf32(reduced && y.is_cuda());
  AddLoraDeltas(y, cols, sites, LoraInput(x, x_full), rows,
                /*narrow=*/reduced);
  return y;
}

}  // namespace

// y = x W^T (+ per-row LoRA). x: [B, T, in]. Without LoRA at this site the
// result is the matmul's (compute dtype); with LoRA it is the base output
// plus the fp32 delta, in fp32 (PEFT adds in fp32 too, then rounds; here the
// consumers take the fp32 sum as it is). The delta is computed in fp32 from
// `x_full` when given (x before its rounding to the compute dtype; T5's
// attention scores are unscaled, so composed adapters with large weights
// make q and k large and sensitive to it), else from x.
at::Tensor Project(const at::Tensor& x, const Linear& linear,
                   const RowAdapters& rows, const at::Tensor& x_full) {
  return ProjectFused(x, linear.weight, {&linear}, rows, x_full,
                      /*float_out=*/false);
}

// Project(...).to(attn) for the q, k or v of an attention: with fp32
// attention, the GEMM's fp32 accumulator also without a delta (ProjectFused's
// float_out), so q, k and v are never rounded to the compute dtype, fused or
// not, adapted or not.
at::Tensor ProjectForAttention(const at::Tensor& x, const Linear& linear,
                               const RowAdapters& rows,
                               const at::Tensor& x_full, at::ScalarType attn) {
  return ProjectFused(x, linear.weight, {&linear}, rows, x_full,
                      /*float_out=*/attn == at::kFloat)
      .to(attn);
}

at::ScalarType AttentionDtype(const T5Weights& w) {
  return w.dtype == at::kBFloat16 && AttentionBf16() ? at::kBFloat16
                                                     : at::kFloat;
}

// q, k or v of one attention: [B, heads, T, d_kv] in `attn`.
at::Tensor Heads(const Normed& x, const Linear& linear, const RowAdapters& rows,
                 const config::T5Config& c, at::ScalarType attn) {
  return SplitHeads(ProjectForAttention(x.mm, linear, rows, x.full, attn),
                    c.num_heads, c.d_kv);
}

std::array<at::Tensor, 3> SelfAttentionHeads(const Normed& x,
                                             const AttentionWeights& a,
                                             const RowAdapters& rows,
                                             const config::T5Config& c,
                                             at::ScalarType attn) {
  if (!FusedQkv(a)) {
    return {Heads(x, a.q, rows, c, attn), Heads(x, a.k, rows, c, attn),
            Heads(x, a.v, rows, c, attn)};
  }
  // One GEMM for all three (for fp32 attention with an fp32 output); q, k,
  // v are strided views of it.
  const at::Tensor y =
      ProjectFused(x.mm, a.qkv, {&a.q, &a.k, &a.v}, rows, x.full,
                   /*float_out=*/attn == at::kFloat)
          .to(attn);
  const int64_t inner = a.q.weight.size(0);
  return {SplitHeads(y.narrow(-1, 0, inner), c.num_heads, c.d_kv),
          SplitHeads(y.narrow(-1, inner, inner), c.num_heads, c.d_kv),
          SplitHeads(y.narrow(-1, 2 * inner, inner), c.num_heads, c.d_kv)};
}

CrossKeyValues::CrossKeyValues(const T5Weights& w, const EncoderOutput& enc,
                               const RowAdapters& rows, int64_t max_bytes,
                               at::ScalarType attn)
    : w_(w), x_(EncoderInput(enc)), packed_(enc.packed.get()), rows_(rows),
      attn_(attn) {
  const int64_t L = static_cast<int64_t>(w.decoder.size());
  fused_ = FusedCrossKv(w);
  if (!fused_ || L == 0) {
    per_chunk_ = 1;
    return;
  }
  const int64_t inner = w.decoder[0].cross_attn.k.weight.size(0);
  const int64_t tokens = x_.mm.numel() / x_.mm.size(-1);
  const int64_t per_block = std::max<int64_t>(1, tokens * 2 * inner * 4);
  per_chunk_ = std::clamp<int64_t>(max_bytes / per_block, 1, L);
}

void CrossKeyValues::Compute(int64_t block) {
  const int64_t L = static_cast<int64_t>(w_.decoder.size());
  first_ = block / per_chunk_ * per_chunk_;
  count_ = std::min(per_chunk_, L - first_);
  const int64_t inner = w_.decoder[0].cross_attn.k.weight.size(0);
  const at::Tensor weight =
      w_.cross_kv.narrow(0, first_ * 2 * inner, count_ * 2 * inner);
  std::vector<const Linear*> members;
  for (int64_t j = 0; j < count_; ++j) {
    const AttentionWeights& a = w_.decoder[first_ + j].cross_attn;
    members.push_back(&a.k);
    members.push_back(&a.v);
  }
  // The keys and values in the scores' dtype (fp32: the GEMM's accumulator,
  // as ProjectForAttention).
  chunk_ = ProjectFused(x_.mm, weight, members, rows_, x_.full,
                        /*float_out=*/attn_ == at::kFloat)
               .to(attn_);
}

std::pair<at::Tensor, at::Tensor> CrossKeyValues::Block(int64_t i) {
  const config::T5Config& c = w_.config;
  const AttentionWeights& a = w_.decoder[i].cross_attn;
  if (!fused_) {
    return {Heads(x_, a.k, rows_, c, attn_), Heads(x_, a.v, rows_, c, attn_)};
  }
  if (!chunk_.defined() || i < first_ || i >= first_ + count_) Compute(i);
  const int64_t inner = a.k.weight.size(0);
  const int64_t j = i - first_;
  return {SplitHeads(chunk_.narrow(-1, 2 * j * inner, inner), c.num_heads,
                     c.d_kv),
          SplitHeads(chunk_.narrow(-1, (2 * j + 1) * inner, inner),
                     c.num_heads, c.d_kv)};
}

void CrossKeyValues::CopyTo(const at::Tensor& dst) {
  const config::T5Config& c = w_.config;
  const int64_t L = static_cast<int64_t>(w_.decoder.size());
  if (!fused_) {
    for (int64_t i = 0; i < L; ++i) {
      auto kv = Block(i);
      dst[0][i].copy_(kv.first);
      dst[1][i].copy_(kv.second);
    }
    return;
  }
  if (GemmInto(dst) || GemmIntoWithValueDeltas(dst)) return;
  for (int64_t i = 0; i < L; i += per_chunk_) {
    Compute(i);
    // [B, S, count, 2, H, d] -> [2, count, B, H, S, d]: one copy per chunk.
    const at::Tensor src =
        chunk_
            .view({chunk_.size(0), chunk_.size(1), count_, 2, c.num_heads,
                   c.d_kv})
            .permute({3, 2, 0, 4, 1, 5});
    dst.narrow(1, first_, count_).copy_(src);
  }
}

namespace {

// dst ([2, L, B, H, S, d] of `weight`'s dtype) as CrossKvBuffer lays it out:
// a contiguous [B, S, L, 2, H, d], rows [B * S] of every block's keys then
// values, the row order of a GEMM of the encoder input xm [B, S, in] against
// the fused `weight`; undefined where dst is not such a buffer.
at::Tensor CrossKvRows(const at::Tensor& dst, const at::Tensor& xm,
                       const at::Tensor& weight) {
  if (dst.dim() != 6 || dst.scalar_type() != weight.scalar_type() ||
      xm.dim() != 3) {
    return at::Tensor();
  }
  at::Tensor storage = dst.permute({2, 4, 1, 0, 3, 5});
  if (!storage.is_contiguous() || storage.size(0) != xm.size(0) ||
      storage.size(1) != xm.size(1) ||
      storage.size(2) * storage.size(3) * storage.size(4) * storage.size(5) !=
          weight.size(0)) {
    return at::Tensor();
  }
  return storage;
}

}  // namespace

// Without a LoRA delta the keys and values are the GEMM's output rounded to
// dst's dtype, which a GEMM writing that dtype does itself (from its fp32
// accumulator); a delta is added in fp32 before the rounding (Compute).
bool CrossKeyValues::GemmInto(const at::Tensor& dst) {
  for (const BlockWeights& b : w_.decoder) {
    if (Adapted(rows_, b.cross_attn.k.site) ||
        Adapted(rows_, b.cross_attn.v.site)) {
      return false;
    }
  }
  const at::Tensor& weight = w_.cross_kv;
  const at::Tensor xm = MatmulInput(x_.mm, weight);
  const at::Tensor storage = CrossKvRows(dst, xm, weight);
  if (!storage.defined()) return false;
  at::Tensor out = storage.view({-1, weight.size(0)});
  at::mm_out(out, xm.reshape({-1, xm.size(-1)}), weight.t());
  return true;
}

namespace {

// The run kernels' sites for the values of decoder blocks [first, first +
// count) (sites: ValueDeltaSites'): each block's B factors for `slots`
// slots from slot_offset on, its value columns in a row of [L, 2, inner].
std::vector<LoraRunSite> ValueRunSites(
    const std::vector<const SiteBank*>& sites, int64_t first, int64_t count,
    int64_t slot_offset, int64_t slots, int64_t inner) {
  std::vector<LoraRunSite> run;
  for (int64_t i = first; i < first + count; ++i) {
    run.push_back({sites[i]->b.narrow(0, slot_offset, slots),
                   (2 * i + 1) * inner});
  }
  return run;
}

}  // namespace

// Every decoder block's v adapted (its bank sites in block order, into
// *sites, empty on entry) with one scaling and A factors side by side, and
// no k adapted.
bool CrossKeyValues::ValueDeltaSites(
    std::vector<const SiteBank*>* sites) const {
  for (const BlockWeights& b : w_.decoder) {
    const AttentionWeights& a = b.cross_attn;
    if (Adapted(rows_, a.k.site) || !Adapted(rows_, a.v.site)) return false;
    const SiteBank* sb = &rows_.bank->sites[a.v.site];
    if (!GemmLayout(rows_, *sb) ||
        (!sites->empty() && (!AdjacentA(*sites->back(), *sb) ||
                             sb->common_scale != (*sites)[0]->common_scale))) {
      return false;
    }
    sites->push_back(sb);
  }
  return !sites->empty();
}

// GemmInto and GemmIntoWithValueDeltas over the N packed tokens instead of
// the B x S padded rows: the keys and values land in the first N token
// rows of dst's [B * S] (row b's at starts[b] ..), the value deltas by the
// packed run kernels (their sums rounded into dst as there). Why: a
// 64-prompt batch pads to its bucketed key length (StaticDecoderPool), so
// the padded GEMM spent most of its rows on padding (flan-t5-large, the
// benchmark's 64 prompts padded to 128 keys, H200: 1,039 -> 271 us for the
// base model; a per-row prefill's kernels 6.87 -> 5.67 ms).
bool CrossKeyValues::CopyPackedTo(const at::Tensor& dst) {
  static const bool off = EnvFlag("LORAHUB_NO_PACKED_CROSS_KV");  // A/B
  const auto L = static_cast<int64_t>(w_.decoder.size());
  if (off || packed_ == nullptr || !fused_ || L == 0 || dst.dim() != 6) {
    return false;
  }
  const at::Tensor& weight = w_.cross_kv;
  const PackedEncoding& p = *packed_;
  const at::Tensor xm = MatmulInput(p.hidden, weight);  // [1, N, in]
  // dst's storage as CrossKvBuffer lays it out: [B, S, L, 2, H, d].
  const at::Tensor storage = dst.permute({2, 4, 1, 0, 3, 5});
  const int64_t B = storage.size(0), S = storage.size(1);
  const int64_t columns = weight.size(0);
  if (xm.dim() != 3 || xm.size(0) != 1 || !storage.is_contiguous() ||
      dst.scalar_type() != weight.scalar_type() ||
      p.rows.starts.numel() != B + 1 || p.rows.max_length > S ||
      xm.size(1) > B * S || storage.size(2) != L || storage.size(3) != 2 ||
      storage.size(4) * storage.size(5) * 2 * L != columns ||
      xm.size(2) != weight.size(1)) {
    return false;
  }
  const int64_t N = xm.size(1), in = xm.size(2), inner = columns / (2 * L);
  const at::Tensor rows = storage.view({B * S, columns}).narrow(0, 0, N);
  bool adapted = false;
  for (const BlockWeights& b : w_.decoder) {
    adapted = adapted || Adapted(rows_, b.cross_attn.k.site) ||
              Adapted(rows_, b.cross_attn.v.site);
  }
  if (!adapted) {
    at::Tensor out = rows;  // mm_out takes a handle
    at::mm_out(out, xm.view({N, in}), weight.t());
    return true;
  }
  // One prompt per slot, so that each row's tokens are its slot's run.
  std::vector<const SiteBank*> sites;
  if (rows_.bank == nullptr || rows_.uniform_slot >= 0 ||
      rows_.rows_per_slot != 1 || weight.scalar_type() == at::kFloat ||
      !weight.is_cuda() || !weight.is_contiguous() ||
      !ValueDeltaSites(&sites)) {
    return false;
  }
  // Sites per run call, the most of them whose ranks the shrink takes
  // together (8, 16 or 32), planned before anything is written.
  const int64_t r = sites[0]->a.size(1);
  std::vector<int64_t> groups;
  for (int64_t left = L; left > 0;) {
    int64_t g = std::min(left, static_cast<int64_t>(kLoraRunMaxSites));
    while (g > 0 && g * r != 8 && g * r != 16 && g * r != 32) --g;
    if (g == 0) return false;
    groups.push_back(g);
    left -= g;
  }
  const at::Tensor x = xm.expand({L, N, in});
  const at::Tensor w = weight.view({L, 2, inner, in});
  const auto halves = [&](const at::Tensor& rows_of_blocks, int64_t kv) {
    return rows_of_blocks.view({N, L, 2, inner}).select(2, kv).transpose(0, 1);
  };
  at::Tensor scratch =  // fp32 values, dst's row layout (key halves unused)
      at::empty({N, columns}, xm.options().dtype(at::kFloat));
  if (!BmmFloatInto(x, w.select(1, 1).transpose(1, 2), halves(scratch, 1))) {
    return false;
  }
  at::Tensor keys = halves(rows, 0);
  at::bmm_out(keys, x, w.select(1, 0).transpose(1, 2));
  const at::Tensor x_lora = LoraInput(p.hidden, p.hidden_full);
  const at::Tensor y = scratch.view({1, N, columns});
  const at::Tensor y_round = rows.view({1, N, columns});
  const double scale = sites[0]->common_scale;
  // Every block's x A^T in one shrink (their A factors side by side), then
  // the expands kLoraRunMaxSites blocks at a time. Why: the shrink per group
  // read the same x 12 times (flan-t5-large, 2 blocks a group).
  // LORAHUB_CROSS_SHRINK_PER_GROUP=1: a shrink per group, as before (A/B;
  // the same values).
  static const bool per_group = EnvFlag("LORAHUB_CROSS_SHRINK_PER_GROUP");
  const at::Tensor xa =
      per_group ? at::Tensor()
                : LoraPackedRunShrink(
                      x_lora,
                      SideBySideA(sites[0]->a, L).narrow(0, rows_.slot_offset, B),
                      p.rows.starts, p.rows.max_length);
  if (xa.defined()) {
    constexpr auto kGroup = static_cast<int64_t>(kLoraRunMaxSites);
    for (int64_t first = 0; first < L; first += kGroup) {
      const int64_t count = std::min(kGroup, L - first);
      // Not taken: the caller writes dst whole (CopyTo).
      if (!LoraPackedRunExpand(
              y, xa.narrow(2, first * r, count * r),
              ValueRunSites(sites, first, count, rows_.slot_offset, B, inner),
              scale, p.rows.starts, p.rows.max_length, y_round)) {
        return false;
      }
    }
    return true;
  }
  int64_t first = 0;
  for (const int64_t count : groups) {
    const at::Tensor a =
        SideBySideA(sites[first]->a, count).narrow(0, rows_.slot_offset, B);
    // Not taken (all or nothing): the caller writes dst whole (CopyTo).
    if (!LoraPackedRunDeltas(
            y, x_lora, a,
            ValueRunSites(sites, first, count, rows_.slot_offset, B, inner),
            scale, p.rows.starts, p.rows.max_length, y_round)) {
      return false;
    }
    first += count;
  }
  return true;
}

// The general path (Compute, CopyTo) moved about 4.2 GB for the per-row
// prefill of 64 prompts of 96 tokens on flan-t5-large: the fp32 GEMM of
// every block's keys and values (1.2 GB written), the values' deltas (read
// and written in fp32), then the rounding copy of the whole chunk. Here:
// the keys as GemmInto writes them (one batched GEMM over the blocks, bf16
// into dst), the values by an fp32 batched GEMM into a scratch of dst's
// layout, and the run expand kernel adds each block's deltas and rounds the
// sums into dst (about 1.8 GB). The same arithmetic: fp32 GEMM, fp32 delta,
// one rounding. Needs runs of rows per slot, every block's v adapted (one
// scaling, A factors side by side: one down-projection for all blocks) and
// no k adapted; false, dst untouched, elsewhere (LORAHUB_CROSS_V_COPY=1
// too: the A/B against the general path).
bool CrossKeyValues::GemmIntoWithValueDeltas(const at::Tensor& dst) {
  static const bool off = EnvFlag("LORAHUB_CROSS_V_COPY");
  const at::Tensor& weight = w_.cross_kv;
  const auto L = static_cast<int64_t>(w_.decoder.size());
  if (off || !fused_ || L == 0 || rows_.bank == nullptr ||
      rows_.uniform_slot >= 0 || rows_.rows_per_slot <= 0 ||
      weight.scalar_type() == at::kFloat || !weight.is_cuda()) {
    return false;
  }
  std::vector<const SiteBank*> sites;
  if (!ValueDeltaSites(&sites)) return false;
  const int64_t inner = w_.decoder[0].cross_attn.k.weight.size(0);
  const at::Tensor xm = MatmulInput(x_.mm, weight);  // [B, S, in]
  // Rows [B * S] of [L, 2, inner].
  const at::Tensor storage = CrossKvRows(dst, xm, weight);
  if (!storage.defined() || storage.size(2) != L || storage.size(3) != 2 ||
      !weight.is_contiguous() || weight.size(0) != 2 * L * inner ||
      weight.size(1) != xm.size(2)) {
    return false;
  }
  const int64_t B = xm.size(0), S = xm.size(1), M = B * S, in = xm.size(2);
  const at::Tensor x = xm.reshape({1, M, in}).expand({L, M, in});
  const at::Tensor w = weight.view({L, 2, inner, in});
  // Block l's keys (values): columns [(2l) inner, (2l + 1) inner) (the next
  // inner) of each row: [L, M, inner] views with row stride 2 L inner.
  const auto halves = [&](const at::Tensor& rows_of_blocks, int64_t kv) {
    return rows_of_blocks.view({M, L, 2, inner}).select(2, kv).transpose(0, 1);
  };
  at::Tensor scratch =  // fp32 values, dst's layout (the key halves unused)
      at::empty({B, S, 2 * L * inner}, xm.options().dtype(at::kFloat));
  if (!BmmFloatInto(x, w.select(1, 1).transpose(1, 2), halves(scratch, 1))) {
    return false;
  }
  at::Tensor keys = halves(storage, 0);
  at::bmm_out(keys, x, w.select(1, 0).transpose(1, 2));
  // Every block's x A^T in one batched GEMM (as AddLoraDeltas), then the
  // expands in groups of kLoraRunMaxSites sites.
  const int64_t r = sites[0]->a.size(1);
  const at::Tensor xa = DownProject(LoraInput(x_.mm, x_.full),
                                    SideBySideA(sites[0]->a, L), rows_,
                                    /*narrow=*/true);
  const int64_t slots = xa.size(0);
  const at::Tensor values = RunView(scratch, slots);
  const at::Tensor rounded = RunView(storage.view({B, S, 2 * L * inner}), slots);
  constexpr auto kGroup = static_cast<int64_t>(kLoraRunMaxSites);
  for (int64_t first = 0; first < L; first += kGroup) {
    const int64_t count = std::min(kGroup, L - first);
    if (LoraRunDeltas(
            values, at::Tensor(), at::Tensor(),
            xa.narrow(2, first * r, count * r),
            ValueRunSites(sites, first, count, rows_.slot_offset, slots, inner),
            sites[0]->common_scale, rounded)) {
      continue;
    }
    // Not taken (all or nothing): the same sums on cuBLAS, then rounded.
    for (int64_t i = first; i < first + count; ++i) {
      const at::Tensor y = scratch.narrow(2, (2 * i + 1) * inner, inner);
      UpProjectAdd(y, xa.narrow(2, i * r, r), *sites[i], rows_, /*narrow=*/true);
      storage.select(2, i).select(2, 1).copy_(
          y.view({B, S, storage.size(4), storage.size(5)}));
    }
  }
  return true;
}

at::Tensor CrossKvBuffer(const T5Weights& w, int64_t batch, int64_t keys,
                         const at::TensorOptions& options) {
  static const bool block_major = EnvFlag("LORAHUB_CROSS_KV_COPY");  // A/B
  const config::T5Config& c = w.config;
  const auto L = static_cast<int64_t>(w.decoder.size());
  if (block_major) {
    return at::empty({2, L, batch, c.num_heads, keys, c.d_kv}, options);
  }
  return at::empty({batch, keys, L, 2, c.num_heads, c.d_kv}, options)
      .permute({3, 2, 0, 4, 1, 5});
}

namespace {

// Unadapted o reads only the rounded context: the attention rounds it (the
// short-query kernel writes it so, heads last: then no copy in
// ProjectContext).
at::ScalarType ContextDtype(const at::Tensor& q, const Linear& o,
                            const RowAdapters& rows) {
  return Adapted(rows, o.site) ? q.scalar_type() : o.weight.scalar_type();
}

// The projection of a sublayer's output into the residual stream (attention
// o, feed-forward wo), for Residual::Add: SplitKProject's partials where it
// takes an unadapted projection (at most 64 rows: decode steps, the
// objective's decoder, short prompts' encoder), else Project's output.
at::Tensor ProjectToResidual(const at::Tensor& x, const Linear& linear,
                             const RowAdapters& rows) {
  if (!Adapted(rows, linear.site)) {
    at::Tensor parts =
        SplitKProject(MatmulInput(x, linear.weight), linear.weight);
    if (parts.defined()) return parts;
  }
  return Project(x, linear, rows);
}

// The output projection of an attention's context ctx [B, H, T, d] (in
// ContextDtype), for Residual::Add (ProjectToResidual).
at::Tensor ProjectContext(const at::Tensor& ctx, const Linear& o,
                          const RowAdapters& rows) {
  const bool adapted = Adapted(rows, o.site);
  const at::Tensor heads_last = ctx.transpose(1, 2);  // [B, T, H, d_kv]
  const std::vector<int64_t> shape = {ctx.size(0), ctx.size(2), -1};
  // The matmul input: the head merge and the rounding in one copy.
  at::Tensor mm = heads_last
                      .to(o.weight.scalar_type(), /*non_blocking=*/false,
                          /*copy=*/false, at::MemoryFormat::Contiguous)
                      .reshape(shape);  // a copy only when .to() was a no-op
  if (!adapted || mm.scalar_type() == at::kFloat) {
    return ProjectToResidual(mm, o, rows);
  }
  return Project(mm, o, rows, heads_last.reshape(shape));  // fp32 LoRA input
}

}  // namespace

// Scores q k^T + bias, softmax, weighted values in fp32 (q, k, v and bias
// are fp32): T5 does not scale its scores by 1/sqrt(d_kv), so they are large
// and rounding them to bf16 alone moves the softmax visibly. The context is
// rounded once, as the input of the output projection. With bf16 attention
// (AttentionDtype) q, k, v and the context are bf16; the fused kernels
// still form the scores and the softmax in fp32.
at::Tensor AttendAndProject(const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& bias,
                            const Linear& o, const RowAdapters& rows) {
  return ProjectContext(Attention(q, k, v, bias, ContextDtype(q, o, rows)), o,
                        rows);
}

at::Tensor AttendPackedAndProject(const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& bias,
                                  const PackedRows& packed, const Linear& o,
                                  const RowAdapters& rows) {
  return ProjectContext(PackedAttention(q, k, v, bias, packed.starts,
                                        packed.host_starts,
                                        ContextDtype(q, o, rows)),
                        o, rows);
}

// As transformers: the activation runs in the dtype of the projections'
// outputs (fp32 where a LoRA delta was added); the result is rounded once as
// the input of wo.
at::Tensor FeedForward(const Normed& x, const T5Weights& w,
                       const FeedForwardWeights& ff, const RowAdapters& rows) {
  // A delta reads the fp32 norm output (a norm without it would round the
  // delta's input: FeedForwardNorm).
  TORCH_CHECK(x.full.defined() || !FeedForwardAdapted(ff, rows),
              "feed-forward LoRA delta without the norm's fp32 output");
  at::Tensor h;
  if (w.config.is_gated_act && FusedWi01(ff)) {
    // One GEMM for wi_0 and wi_1. With a LoRA delta on either, both halves
    // are fp32 (in fp32 mode: the same arithmetic as the separate GEMMs).
    const at::Tensor y =
        ProjectFused(x.mm, ff.wi_01, {&ff.wi_0, &ff.wi_1}, rows, x.full,
                     /*float_out=*/false);
    const int64_t d_ff = ff.wi_0.weight.size(0);
    h = GatedActivation(y.narrow(-1, 0, d_ff), y.narrow(-1, d_ff, d_ff),
                        w.config.dense_act_fn);
  } else if (w.config.is_gated_act) {
    h = GatedActivation(Project(x.mm, ff.wi_0, rows, x.full),
                        Project(x.mm, ff.wi_1, rows, x.full),
                        w.config.dense_act_fn);
  } else {
    h = Activation(Project(x.mm, ff.wi, rows, x.full), w.config.dense_act_fn);
  }
  return ProjectToResidual(h, ff.wo, rows);
}

// The residual stream starts (and stays) in fp32, also for fp16 compute,
// where transformers clamps it to the fp16 range instead.
at::Tensor Embed(const T5Weights& w, const at::Tensor& ids) {
  return at::embedding(w.shared, ids).to(at::kFloat);
}

int64_t LengthBucket(int64_t n) {
  int64_t b = 16;
  while (b < n) b *= 2;
  return b;
}

namespace {

bool SyncUploads() {
  static const bool sync = EnvFlag("LORAHUB_SYNC_UPLOADS");
  return sync;
}

}  // namespace

at::Tensor HostStaging(at::IntArrayRef sizes, at::ScalarType dtype,
                       c10::Device device) {
  return at::empty(sizes, at::TensorOptions().dtype(dtype).pinned_memory(
                              device.is_cuda() && !SyncUploads()));
}

at::Tensor Upload(const at::Tensor& host, c10::Device device) {
  return host.to(device, /*non_blocking=*/!SyncUploads());
}

// [1, H, q, k] bias for query positions offset..offset+q-1, keys 0..k-1.
at::Tensor PositionBias(const T5Weights& w, const at::Tensor& table, int64_t q,
                        int64_t k, bool bidirectional, int64_t offset) {
  auto opts = at::TensorOptions().dtype(at::kLong).device(table.device());
  at::Tensor ctx = at::arange(offset, offset + q, opts).unsqueeze(1);
  at::Tensor mem = at::arange(0, k, opts).unsqueeze(0);
  at::Tensor buckets = RelativePositionBucket(
      mem - ctx, bidirectional, w.config.relative_attention_num_buckets,
      w.config.relative_attention_max_distance);
  return at::embedding(table, buckets).permute({2, 0, 1}).unsqueeze(0);
}

// Biases and masks are fp32 (scores are fp32) with transformers' mask value
// of the compute dtype, finfo(dtype).min.
at::Tensor CausalBias(const T5Weights& w, int64_t t, c10::Device device) {
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor pos = at::arange(t, opts);
  at::Tensor future = pos.unsqueeze(0) > pos.unsqueeze(1);  // key > query
  auto fopts = at::TensorOptions().dtype(at::kFloat).device(device);
  return at::where(future, at::scalar_tensor(MinValue(w.dtype), fopts),
                   at::scalar_tensor(0.0, fopts))
      .view({1, 1, t, t});
}

// The encoder output as the input of cross-attention k and v.
Normed EncoderInput(const EncoderOutput& e) {
  return Normed{e.hidden, e.hidden_full.defined() ? e.hidden_full : e.hidden};
}

namespace {

// The fp32 residual stream of a forward pass (Encode, DecodeFull, one
// decoder block step): a sublayer output is held back and added by the next
// norm (fused_ops.h AddRmsNorm: one kernel on CUDA for the add and the
// norm). The same arithmetic as `h = h + out; RmsNorm(h)`.
class Residual {
 public:
  Residual(const T5Weights& w, at::Tensor h) : w_(w), h_(std::move(h)) {}
  Residual(const T5Weights& w, ResidualStream s)
      : w_(w), h_(std::move(s.h)), pending_(std::move(s.pending)) {}
  // The stream as it is, any pending output still pending.
  ResidualStream Release() {
    return ResidualStream{std::move(h_), std::move(pending_)};
  }
  // Sublayer output to add (before the next Norm).
  void Add(at::Tensor out) {
    if (pending_.defined()) Flush();
    pending_ = std::move(out);
  }
  // The stream with any pending output added.
  at::Tensor Value() {
    if (pending_.defined()) Flush();
    return h_;
  }
  // The stream (with any pending output added), normed by `weight`. With
  // `shrink_a` (StepShrinkFactors) the row kernels' shrink of the result
  // too, where one kernel computes both (fused_ops.h AddRmsNormShrink).
  Normed Norm(const at::Tensor& weight,
              const at::Tensor& shrink_a = at::Tensor(),
              const at::Tensor& slots = at::Tensor()) {
    return AddAndNorm(weight, shrink_a, slots, /*keep_full=*/true);
  }
  // Norm(weight) without the fp32 `full` where the compute dtype is not
  // fp32 (Normed::full undefined; fused_ops.h AddRmsNorm's keep_full): for
  // a sublayer whose projections take no per-row LoRA delta, which read
  // only the rounded output.
  Normed NormRoundedOnly(const at::Tensor& weight) {
    return AddAndNorm(weight, at::Tensor(), at::Tensor(), /*keep_full=*/false);
  }

 private:
  Normed AddAndNorm(const at::Tensor& weight, const at::Tensor& shrink_a,
                    const at::Tensor& slots, bool keep_full) {
    const double eps = w_.config.layer_norm_epsilon;
    AddNormOutput r;
    at::Tensor xa;
    // Without a pending output (the first block's norm) the same kernel
    // norms h_ alone.
    const bool shrunk =
        shrink_a.defined() && AddRmsNormShrink(h_, pending_, weight, eps,
                                               w_.dtype, shrink_a, slots, &r,
                                               &xa);
    if (!shrunk) {
      if (!pending_.defined()) return RmsNorm(h_, weight, eps, w_.dtype);
      r = AddRmsNorm(h_, pending_, weight, eps, w_.dtype, keep_full);
    }
    if (pending_.defined()) h_ = std::move(r.sum);
    pending_ = at::Tensor();
    Normed n{std::move(r.norm.rounded), std::move(r.norm.full)};
    if (shrunk) n.shrink = RowShrink{shrink_a, n.full, std::move(xa)};
    return n;
  }
  void Flush() {
    h_ = h_ + (IsSplitKOutput(pending_, h_) ? SplitKSum(pending_, w_.dtype)
                                             : pending_);
    pending_ = at::Tensor();
  }
  const T5Weights& w_;
  at::Tensor h_;
  at::Tensor pending_;
};

// The norm before a feed-forward sublayer: its fp32 `full` only where the
// sublayer takes a per-row LoRA delta (FeedForwardAdapted; FeedForward
// reads nothing else of it).
Normed FeedForwardNorm(Residual* h, const at::Tensor& weight,
                       const FeedForwardWeights& ff, const RowAdapters& rows) {
  return FeedForwardAdapted(ff, rows) ? h->Norm(weight)
                                      : h->NormRoundedOnly(weight);
}

}  // namespace

namespace {

// True when a decode step's attention on `members`' projection (against
// `fused`) can take the step path (DecodeStepAttention) on `device`: CUDA,
// fp32 attention, the kernel on, and every adapted member's delta fp32 from
// the bank's per-row kernel copies (lora.h AttachRowKernelCopies).
bool StepSitesApply(const T5Weights& w, const c10::Device& device,
                    const std::vector<const Linear*>& members,
                    const at::Tensor& fused, const RowAdapters& rows) {
  if (!device.is_cuda() || !DecodeStepAttentionEnabled() ||
      AttentionDtype(w) != at::kFloat) {
    return false;
  }
  for (const Linear* m : members) {
    if (!Adapted(rows, m->site)) continue;
    const SiteBank& sb = rows.bank->sites[m->site];
    if (!rows.slots.defined() || !sb.a_low.defined() || !sb.b_low.defined() ||
        LowPrecisionDelta(sb, fused.scalar_type())) {
      return false;
    }
  }
  return true;
}

// StepSitesApply for the input x: one query per row.
bool StepPathApplies(const T5Weights& w, const Normed& x,
                     const std::vector<const Linear*>& members,
                     const at::Tensor& fused, const RowAdapters& rows) {
  return x.mm.dim() == 3 && x.mm.size(1) == 1 &&
         StepSitesApply(w, x.mm.device(), members, fused, rows);
}

// The A factors of the step path's one shrink for `sites` (their per-row
// kernel copies side by side: [S, count * r, in]); undefined where they do
// not lie so (then each site's delta runs on its own).
at::Tensor ShrinkRun(const std::vector<const SiteBank*>& sites) {
  if (sites.empty()) return at::Tensor();
  for (size_t k = 1; k < sites.size(); ++k) {
    if (!AdjacentFactors(sites[k - 1]->a_low, sites[k]->a_low)) {
      return at::Tensor();
    }
  }
  return SideBySideA(sites[0]->a_low, static_cast<int64_t>(sites.size()));
}

// The factors for the norm before a decode step's attention to shrink with
// (Residual::Norm), where the step path will take that attention: the
// ShrinkRun of its adapted members; else undefined.
at::Tensor StepShrinkFactors(const T5Weights& w,
                             const std::vector<const Linear*>& members,
                             const at::Tensor& fused,
                             const RowAdapters& rows) {
  if (rows.bank == nullptr || !rows.slots.defined() ||
      !StepSitesApply(w, rows.slots.device(), members, fused, rows)) {
    return at::Tensor();
  }
  return ShrinkRun(AdaptedOf(fused, members, rows).sites);
}

// True when t and u are views of the same elements (same address, shape,
// strides and dtype).
bool SameView(const at::Tensor& t, const at::Tensor& u) {
  return t.defined() && u.defined() && t.data_ptr() == u.data_ptr() &&
         t.sizes() == u.sizes() && t.strides() == u.strides() &&
         t.scalar_type() == u.scalar_type();
}

// A decode step's projection for the attention kernel (DecodeStepInputs):
// the output, or partial 0 of SplitKProject's and where the others lie.
struct StepOutput {
  at::Tensor y;  // [B, 1, N] fp32
  int64_t parts = 1;
  int64_t part_stride = 0;
};

// LORAHUB_NO_STEP_SPLITK=1 keeps the step projections whole (A/B). Read
// once.
bool StepSplitKOff() {
  static const bool off = EnvFlag("LORAHUB_NO_STEP_SPLITK");
  return off;
}

// A decode step's projection x W^T against `fused` (members' row blocks),
// fp32, with the per-row LoRA of the adapted members shrunk but not
// expanded: (*expands)[k] is member k's expand for the attention kernel (xa
// undefined: member k is not adapted, or its delta was added here because
// the shrink kernel did not take it). Where no delta is added here, the
// GEMM runs split over K in 2 parts (SplitKProject) and the attention
// kernel sums them as it loads q (and the new key and value). Why: H200,
// graph-replayed, 64 rows, weights from HBM: q|k|v 5.60 -> 5.31 us, the
// cross-attention's q 5.04 -> 4.23 (deploy/gpu/splitk_gemm_bench.py,
// twenty-sixth session); 4 parts: 5.73 and 4.08, but the step kernels then
// took 0.6 us more each (fused_kernels.cu LoadFloatParts). `split`: false
// keeps it whole (a self-attention over a 16-bit cache, whose step kernel
// takes no partials). StepPathApplies first.
StepOutput StepProjection(const Normed& x, const at::Tensor& fused,
                          const std::vector<const Linear*>& members,
                          const RowAdapters& rows, bool split,
                          std::vector<RowLoraExpand>* expands) {
  expands->assign(members.size(), RowLoraExpand());
  const at::Tensor xm = MatmulInput(x.mm, fused);
  const AdaptedMembers adapted = AdaptedOf(fused, members, rows);
  const std::vector<const SiteBank*>& sites = adapted.sites;
  if (!sites.empty()) {
    const at::Tensor xin = LoraInput(x.mm, x.full);  // [B, 1, in]
    // One shrink for all (their A factors side by side, as AddLoraDeltas),
    // unless the norm computed it already (Residual::Norm).
    const at::Tensor a = ShrinkRun(sites);
    at::Tensor xa;
    if (SameView(x.shrink.a, a) && SameView(x.shrink.x, xin)) {
      xa = x.shrink.xa;
    } else if (a.defined()) {
      xa = LoraRowShrink(xin.select(1, 0), a, rows.slots);
    }
    if (!xa.defined()) {
      at::Tensor y = MatmulFloat(xm, fused);
      AddLoraDeltas(y, adapted.cols, sites, xin, rows,
                    /*narrow=*/x.mm.scalar_type() != at::kFloat);
      return {y};
    }
    const int64_t r = sites[0]->a_low.size(1);
    for (size_t k = 0; k < sites.size(); ++k) {
      (*expands)[adapted.which[k]] =
          RowLoraExpand{xa, static_cast<int64_t>(k) * r, sites[k]->b_low,
                        sites[k]->scale};
    }
  }
  if (split && !StepSplitKOff()) {
    const at::Tensor parts = SplitKProject(xm, fused, kMaxStepParts);
    if (parts.defined()) return {parts[0], parts.size(0), parts.stride(0)};
  }
  return {MatmulFloat(xm, fused)};
}

void SetRowsOf(const RowAdapters& rows, DecodeStepInputs* step) {
  if (rows.bank == nullptr) return;
  step->slots = rows.slots;
  if (!rows.all_rows) step->mask = rows.mask;
}

// True when a self-attention's q|k|v can take the step path's layout: one
// fused GEMM, k not adapted (the step kernel expands q and v only).
bool SelfStepLayout(const AttentionWeights& a, const RowAdapters& rows) {
  return FusedQkv(a) && !Adapted(rows, a.k.site);
}

// A decode step's self-attention with its output projection, through
// DecodeStepAttention: q|k|v as one GEMM; the per-row LoRA expands of q and
// v and the store of the new key and value into `cache` done by the
// attention kernel. Undefined, having run nothing, where the step path does
// not apply (then the caller's general path runs).
at::Tensor SelfAttentionStep(const T5Weights& w, const AttentionWeights& a,
                             const Normed& x, const RowAdapters& rows,
                             const StepCache& cache, const at::Tensor& bias) {
  const std::vector<const Linear*> members = {&a.q, &a.k, &a.v};
  if (!SelfStepLayout(a, rows) ||
      !StepPathApplies(w, x, members, a.qkv, rows)) {
    return at::Tensor();
  }
  std::vector<RowLoraExpand> lora;
  const StepOutput out =
      StepProjection(x, a.qkv, members, rows,
                     /*split=*/DecodeStepSumsSelfParts(cache.k, bias), &lora);
  const at::Tensor& y = out.y;
  const config::T5Config& c = w.config;
  const int64_t inner = a.q.weight.size(0);
  DecodeStepInputs step;
  step.parts = out.parts;
  step.part_stride = out.part_stride;
  step.q = SplitHeads(y.narrow(-1, 0, inner), c.num_heads, c.d_kv);
  step.k_new = SplitHeads(y.narrow(-1, inner, inner), c.num_heads, c.d_kv);
  step.v_new =
      SplitHeads(y.narrow(-1, 2 * inner, inner), c.num_heads, c.d_kv);
  step.k = cache.k;
  step.v = cache.v;
  step.t = cache.t;
  step.bias = bias;
  if (lora[0].xa.defined()) step.q_lora = &lora[0];
  if (lora[2].xa.defined()) step.v_lora = &lora[2];
  SetRowsOf(rows, &step);
  return ProjectContext(
      DecodeStepAttention(step, ContextDtype(step.q, a.o, rows)), a.o, rows);
}

// SelfAttentionStep for a cross-attention (no store; the keys and values
// of the encoder rows, laid out as `key_rows` says).
at::Tensor CrossAttentionStep(const T5Weights& w, const AttentionWeights& a,
                              const Normed& x, const RowAdapters& rows,
                              const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& bias,
                              const CrossKeyRows& key_rows) {
  const std::vector<const Linear*> members = {&a.q};
  if (!StepPathApplies(w, x, members, a.q.weight, rows)) return at::Tensor();
  std::vector<RowLoraExpand> lora;
  const StepOutput out =
      StepProjection(x, a.q.weight, members, rows, /*split=*/true, &lora);
  DecodeStepInputs step;
  step.parts = out.parts;
  step.part_stride = out.part_stride;
  step.q = SplitHeads(out.y, w.config.num_heads, w.config.d_kv);
  step.k = k;
  step.v = v;
  step.bias = bias;
  step.key_starts = key_rows.starts;
  step.key_lens = key_rows.lens;
  if (lora[0].xa.defined()) step.q_lora = &lora[0];
  SetRowsOf(rows, &step);
  return ProjectContext(
      DecodeStepAttention(step, ContextDtype(step.q, a.o, rows)), a.o, rows);
}

}  // namespace

ResidualStream DecoderBlockStep(const T5Weights& w, const BlockWeights& b,
                                ResidualStream in, const RowAdapters& rows,
                                const StoreKeyValue& store,
                                const at::Tensor& self_bias,
                                const at::Tensor& cross_k,
                                const at::Tensor& cross_v,
                                const at::Tensor& cross_bias,
                                const CrossKeyRows& cross_rows,
                                const StepCache* cache) {
  const config::T5Config& c = w.config;
  Residual h(w, std::move(in));
  // Where the step path takes an attention, the norm before it computes the
  // shrink of its per-row LoRA as well.
  const std::vector<const Linear*> qkv_members = {
      &b.self_attn.q, &b.self_attn.k, &b.self_attn.v};
  Normed n = h.Norm(
      b.self_norm,
      cache != nullptr && SelfStepLayout(b.self_attn, rows)
          ? StepShrinkFactors(w, qkv_members, b.self_attn.qkv, rows)
          : at::Tensor(),
      rows.slots);
  at::Tensor out;
  if (cache != nullptr) {
    out = SelfAttentionStep(w, b.self_attn, n, rows, *cache, self_bias);
  }
  if (!out.defined()) {
    std::array<at::Tensor, 3> qkv =
        SelfAttentionHeads(n, b.self_attn, rows, c);
    std::pair<at::Tensor, at::Tensor> kv = store(qkv[1], qkv[2]);
    out = AttendAndProject(qkv[0], kv.first, kv.second, self_bias,
                           b.self_attn.o, rows);
  }
  h.Add(std::move(out));
  n = h.Norm(b.cross_norm,
             StepShrinkFactors(w, {&b.cross_attn.q}, b.cross_attn.q.weight,
                               rows),
             rows.slots);
  out = CrossAttentionStep(w, b.cross_attn, n, rows, cross_k, cross_v,
                           cross_bias, cross_rows);
  if (!out.defined()) {
    const at::Tensor& starts = cross_rows.starts;
    out = AttendAndProject(
        Heads(n, b.cross_attn.q, rows, c),
        starts.defined() ? GatherKeyRows(cross_k, starts) : cross_k,
        starts.defined() ? GatherKeyRows(cross_v, starts) : cross_v,
        cross_bias, b.cross_attn.o, rows);
  }
  h.Add(std::move(out));
  n = FeedForwardNorm(&h, b.ff_norm, b.ff, rows);
  h.Add(FeedForward(n, w, b.ff, rows));
  return h.Release();
}

at::Tensor DecoderLogits(const T5Weights& w, const ResidualStream& stream) {
  return DecoderHeadLogits(w, stream).to(at::kFloat);
}

namespace {

// The final norm's output for LmHeadInput: its rounded output where nothing
// scales it first (the same bits as rounding the fp32 output, without that
// output or a conversion kernel: 1.1 us of a 64-row decode step on an H200).
at::Tensor DecoderHeadNorm(const T5Weights& w, const ResidualStream& stream) {
  Residual h(w, stream);
  return w.scale_decoder_outputs ? h.Norm(w.decoder_final_norm).full
                                 : h.NormRoundedOnly(w.decoder_final_norm).mm;
}

}  // namespace

at::Tensor DecoderHeadLogits(const T5Weights& w, const ResidualStream& stream) {
  return LmHeadLogits(w, DecoderHeadNorm(w, stream));
}

void DecoderHeadLogitsInto(const T5Weights& w, const ResidualStream& stream,
                           at::Tensor& out) {
  const at::Tensor x = LmHeadInput(w, DecoderHeadNorm(w, stream));
  at::mm_out(out, x.reshape({-1, x.size(-1)}), w.lm_head.t());
}

}  // namespace internal

namespace {

using internal::AttendAndProject;
using internal::AttendPackedAndProject;
using internal::AttentionDtype;
using internal::CausalBias;
using internal::CrossKeyValues;
using internal::DecoderBlockStep;
using internal::DecoderLogits;
using internal::Embed;
using internal::EncoderInput;
using internal::FeedForward;
using internal::Heads;
using internal::HostStaging;
using internal::LmHead;
using internal::LmHeadLogits;
using internal::MinValue;
using internal::Normed;
using internal::PositionBias;
using internal::ProjectContext;
using internal::QuerySideCross;
using internal::Residual;
using internal::ResidualStream;
using internal::RmsNorm;
using internal::SelfAttentionHeads;
using internal::SharedPositionBias;
using internal::Upload;

at::Tensor MaskBias(const T5Weights& w, const at::Tensor& mask) {
  return ((1.0 - mask.to(at::kFloat)) * MinValue(w.dtype))
      .view({mask.size(0), 1, 1, mask.size(1)});
}

// In bf16 attention the bias is rounded once per forward (PyTorch's fused
// attention wants it in q's dtype): the position bias comes from a bf16
// table (exact), the masked entries stay about finfo(bf16).min.
at::Tensor EncoderSelfBias(const T5Weights& w, const at::Tensor& mask_bias) {
  const int64_t S = mask_bias.size(-1);
  return (SharedPositionBias(w, w.encoder_bias_table, S, S, true, at::kFloat) +
          mask_bias)
      .to(AttentionDtype(w));
}

at::Tensor DecoderSelfBias(const T5Weights& w, int64_t T) {
  return SharedPositionBias(w, w.decoder_bias_table, T, T, false, at::kFloat) +
         CausalBias(w, T, w.device);
}

// The encoder's blocks and final norm over the token ids `ids` (any shape,
// [B, S] or packed [1, N]); `attend(q, k, v, o)` is a block's
// self-attention with its output projection (AttendAndProject, or
// AttendPackedAndProject for packed rows).
template <typename Attend>
Normed EncoderStack(const T5Weights& w, const at::Tensor& ids,
                    const RowAdapters& rows, const Attend& attend) {
  const config::T5Config& c = w.config;
  const at::ScalarType attn = AttentionDtype(w);
  Residual h(w, Embed(w, ids));
  for (const BlockWeights& b : w.encoder) {
    Normed n = h.Norm(b.self_norm);
    std::array<at::Tensor, 3> qkv =
        SelfAttentionHeads(n, b.self_attn, rows, c, attn);
    h.Add(attend(qkv[0], qkv[1], qkv[2], b.self_attn.o));
    n = FeedForwardNorm(&h, b.ff_norm, b.ff, rows);
    h.Add(FeedForward(n, w, b.ff, rows));
  }
  return h.Norm(w.encoder_final_norm);
}

EncoderOutput EncodeImpl(const T5Weights& w, const at::Tensor& ids,
                         const at::Tensor& mask, const RowAdapters& rows,
                         const PassBiases* biases) {
  EncoderOutput out;
  out.mask_bias = biases != nullptr ? biases->mask_bias : MaskBias(w, mask);
  const at::Tensor bias = biases != nullptr ? biases->encoder_self
                                            : EncoderSelfBias(w, out.mask_bias);
  const Normed n = EncoderStack(
      w, ids, rows,
      [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
          const Linear& o) { return AttendAndProject(q, k, v, bias, o, rows); });
  out.hidden = n.mm;
  if (w.dtype != at::kFloat) out.hidden_full = n.full;
  return out;
}

EncoderOutput EncodePackedImpl(const T5Weights& w, const PackedInput& in,
                               const RowAdapters& rows) {
  const PackedRows& packed = in.rows;
  const int64_t B = static_cast<int64_t>(packed.host_starts.size()) - 1;
  const int64_t L = packed.max_length;
  const int64_t N = in.ids.size(0);
  RowAdapters packed_rows = rows;
  packed_rows.packed = &packed;
  // Runs of R > 1 rows per slot: every R-th row's offset starts a slot's
  // tokens (a device copy, so that a captured pass replays it).
  PackedRows runs;
  const int64_t R = rows.rows_per_slot;
  if (rows.bank != nullptr && rows.uniform_slot < 0 && R > 1 && B % R == 0) {
    runs.starts = packed.starts.slice(0, 0, B + 1, R).contiguous();
    for (int64_t i = 0; i <= B; i += R) {
      runs.host_starts.push_back(packed.host_starts[i]);
      if (i > 0) {
        runs.max_length = std::max(
            runs.max_length, packed.host_starts[i] - packed.host_starts[i - R]);
      }
    }
    packed_rows.packed_runs = &runs;
  }
  // The position bias alone: a row attends only to its own tokens, so no
  // mask (EncoderSelfBias's values at the unmasked positions).
  const at::Tensor bias = SharedPositionBias(w, w.encoder_bias_table, L, L,
                                             true, AttentionDtype(w));
  const Normed n = EncoderStack(
      w, in.ids.view({1, N}), packed_rows,
      [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
          const Linear& o) {
        return AttendPackedAndProject(q, k, v, bias, packed, o, packed_rows);
      });
  // Back to the padded batch: the tokens at their positions, zero elsewhere.
  const auto unpack = [&](const at::Tensor& x) {
    return at::zeros({B * L, x.size(-1)}, x.options())
        .index_copy_(0, in.padded_index, x.view({N, x.size(-1)}))
        .view({B, L, x.size(-1)});
  };
  EncoderOutput out;
  out.mask_bias = MaskBias(w, in.mask);
  out.hidden = unpack(n.mm);
  if (w.dtype != at::kFloat) out.hidden_full = unpack(n.full);
  auto packed_out = std::make_shared<PackedEncoding>();
  packed_out->hidden = n.mm;
  if (w.dtype != at::kFloat) packed_out->hidden_full = n.full;
  packed_out->rows = packed;
  out.packed = std::move(packed_out);
  return out;
}

// The teacher-forced decoder's final hidden state, fp32 [B, T, d_model]
// (normed; the LM head's input).
at::Tensor DecoderHidden(const T5Weights& w, const at::Tensor& ids,
                         const EncoderOutput& enc, const RowAdapters& rows,
                         const PassBiases* biases) {
  const config::T5Config& c = w.config;
  const at::Tensor self_bias = biases != nullptr
                                   ? biases->decoder_self
                                   : DecoderSelfBias(w, ids.size(1));
  const at::ScalarType attn = AttentionDtype(w);
  Residual h(w, Embed(w, ids));
  CrossKeyValues cross(w, enc, rows, CrossKeyValues::kDefaultMaxBytes, attn);
  const std::unique_ptr<QuerySideCross> query_side =
      QuerySideCross::Create(w, enc, rows, ids.size(1), biases);
  for (size_t i = 0; i < w.decoder.size(); ++i) {
    const BlockWeights& b = w.decoder[i];
    Normed n = h.Norm(b.self_norm);
    std::array<at::Tensor, 3> qkv =
        SelfAttentionHeads(n, b.self_attn, rows, c, attn);
    h.Add(AttendAndProject(qkv[0], qkv[1], qkv[2], self_bias, b.self_attn.o,
                           rows));
    n = h.Norm(b.cross_norm);
    at::Tensor q = Heads(n, b.cross_attn.q, rows, c, attn);
    if (query_side != nullptr) {
      h.Add(ProjectContext(query_side->Context(static_cast<int64_t>(i), q),
                           b.cross_attn.o, rows));
    } else {
      std::pair<at::Tensor, at::Tensor> kv =
          cross.Block(static_cast<int64_t>(i));
      h.Add(AttendAndProject(q, kv.first, kv.second, enc.mask_bias,
                             b.cross_attn.o, rows));
    }
    n = FeedForwardNorm(&h, b.ff_norm, b.ff, rows);
    h.Add(FeedForward(n, w, b.ff, rows));
  }
  return h.Norm(w.decoder_final_norm).full;
}

// Per-row sums of the tokens' negative log-likelihoods of `labels` under
// LmHeadLogits: TokenNll on the compute-dtype logits where it runs, else
// the ATen ops on the fp32 logits (LmHead's), the same formula.
at::Tensor RowNllSums(const T5Weights& w, const at::Tensor& hidden,
                      const at::Tensor& labels) {
  const at::Tensor logits = LmHeadLogits(w, hidden);
  at::Tensor nll;
  if (!TokenNll(logits, labels, &nll)) {
    const at::Tensor logp = at::log_softmax(logits.to(at::kFloat), -1);
    const at::Tensor target = labels.clamp_min(0).unsqueeze(-1);
    nll = -logp.gather(-1, target).squeeze(-1);
    nll = nll.masked_fill(labels == kIgnoredLabel, 0.0);
  }
  return nll.sum(1);
}

absl::Status CheckIds(const at::Tensor& ids, const char* what) {
  if (ids.scalar_type() != at::kLong) {
    return absl::InvalidArgumentError(absl::StrCat(what, " must be int64"));
  }
  return absl::OkStatus();
}

}  // namespace

at::Tensor RelativePositionBucket(const at::Tensor& relative_position,
                                  bool bidirectional, int num_buckets,
                                  int max_distance) {
  at::Tensor bucket = at::zeros_like(relative_position);
  at::Tensor n;
  if (bidirectional) {
    num_buckets /= 2;
    bucket = bucket + (relative_position > 0).to(at::kLong) * num_buckets;
    n = relative_position.abs();
  } else {
    n = -at::minimum(relative_position, at::zeros_like(relative_position));
  }
  const int64_t max_exact = num_buckets / 2;
  at::Tensor is_small = n < max_exact;
  at::Tensor large =
      (at::log(n.to(at::kFloat) / static_cast<double>(max_exact)) /
       std::log(static_cast<double>(max_distance) / max_exact) *
       static_cast<double>(num_buckets - max_exact))
          .to(at::kLong) +
      max_exact;
  large = at::minimum(large, at::full_like(large, num_buckets - 1));
  return bucket + at::where(is_small, n, large);
}

at::Tensor ShiftRight(const at::Tensor& labels, int64_t start_id,
                      int64_t pad_id) {
  at::Tensor out = at::empty_like(labels);
  out.narrow(1, 1, labels.size(1) - 1)
      .copy_(labels.narrow(1, 0, labels.size(1) - 1));
  out.select(1, 0).fill_(start_id);
  return out.masked_fill(out == kIgnoredLabel, pad_id);
}

absl::StatusOr<PassBiases> ComputePassBiases(const T5Weights& w,
                                             const at::Tensor& attention_mask,
                                             int64_t decoder_length) {
  if (attention_mask.dim() != 2 || attention_mask.size(1) == 0 ||
      decoder_length <= 0) {
    return absl::InvalidArgumentError(
        "pass biases: attention_mask must be [B, S] with S > 0 and the "
        "decoder length > 0");
  }
  try {
    PassBiases b;
    b.mask_bias = MaskBias(w, attention_mask);
    b.encoder_self = EncoderSelfBias(w, b.mask_bias);
    b.decoder_self = DecoderSelfBias(w, decoder_length);
    return b;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("pass biases: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<EncoderOutput> Encode(const T5Weights& w,
                                     const at::Tensor& input_ids,
                                     const at::Tensor& attention_mask,
                                     const RowAdapters& rows,
                                     const PassBiases* biases) {
  absl::Status s = CheckIds(input_ids, "input_ids");
  if (!s.ok()) return s;
  if (input_ids.dim() != 2 || attention_mask.sizes() != input_ids.sizes() ||
      input_ids.size(1) == 0) {
    return absl::InvalidArgumentError(
        "input_ids and attention_mask must be [B, S] with S > 0");
  }
  if (biases != nullptr &&
      (!biases->mask_bias.defined() || !biases->encoder_self.defined() ||
       biases->mask_bias.dim() != 4 || biases->encoder_self.dim() != 4 ||
       biases->mask_bias.size(0) != input_ids.size(0) ||
       biases->mask_bias.size(-1) != input_ids.size(1) ||
       biases->encoder_self.size(-1) != input_ids.size(1))) {
    return absl::InvalidArgumentError(
        "encoder: the pass biases are not those of this batch's mask");
  }
  try {
    return EncodeImpl(w, input_ids, attention_mask, rows, biases);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("encoder: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<PackedInput> PackRows(
    const std::vector<std::vector<int64_t>>& inputs, c10::Device device) {
  if (inputs.empty()) return absl::InvalidArgumentError("no rows to pack");
  PackedInput p;
  std::vector<int64_t>& starts = p.rows.host_starts;
  starts.push_back(0);
  for (size_t b = 0; b < inputs.size(); ++b) {
    if (inputs[b].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("row ", b, " is empty"));
    }
    starts.push_back(starts.back() + static_cast<int64_t>(inputs[b].size()));
    p.rows.max_length =
        std::max(p.rows.max_length, static_cast<int64_t>(inputs[b].size()));
  }
  const int64_t N = starts.back();
  if (N > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("more than 2^31 tokens to pack");
  }
  const int64_t B = static_cast<int64_t>(inputs.size());
  const int64_t L = p.rows.max_length;
  try {
    at::Tensor ids = HostStaging({N}, at::kLong, device);
    at::Tensor index = HostStaging({N}, at::kLong, device);
    at::Tensor mask = HostStaging({B, L}, at::kLong, device).zero_();
    at::Tensor starts32 = HostStaging({B + 1}, at::kInt, device);
    int64_t* id = ids.data_ptr<int64_t>();
    int64_t* ix = index.data_ptr<int64_t>();
    int64_t* mk = mask.data_ptr<int64_t>();
    int32_t* st = starts32.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b) {
      st[b] = static_cast<int32_t>(starts[b]);
      const std::vector<int64_t>& row = inputs[b];
      for (size_t t = 0; t < row.size(); ++t) {
        id[starts[b] + t] = row[t];
        ix[starts[b] + t] = b * L + static_cast<int64_t>(t);
        mk[b * L + static_cast<int64_t>(t)] = 1;
      }
    }
    st[B] = static_cast<int32_t>(N);
    p.ids = Upload(ids, device);
    p.padded_index = Upload(index, device);
    p.mask = Upload(mask, device);
    p.rows.starts = Upload(starts32, device);
    return p;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("packing rows: ", e.what_without_backtrace()));
  }
}

bool PackedEncodePays(const T5Weights& w,
                      const std::vector<std::vector<int64_t>>& inputs,
                      const RowAdapters& rows, double min_padding) {
  static const bool off = EnvFlag("LORAHUB_NO_PACKED_PREFILL");
  const bool whole_deltas =
      rows.bank == nullptr || rows.uniform_slot >= 0 ||
      (rows.rows_per_slot >= 1 && w.dtype != at::kFloat);
  if (off || !w.device.is_cuda() || !FusedKernelsEnabled() || !whole_deltas ||
      inputs.size() < 2) {
    return false;
  }
  int64_t tokens = 0, longest = 0;
  for (const std::vector<int64_t>& row : inputs) {
    tokens += static_cast<int64_t>(row.size());
    longest = std::max(longest, static_cast<int64_t>(row.size()));
  }
  const auto B = static_cast<int64_t>(inputs.size());
  return longest > kSmallQueryMax && longest <= kPackedAttentionMaxRow &&
         static_cast<double>(tokens) <=
             (1.0 - min_padding) * static_cast<double>(B * longest);
}

absl::StatusOr<EncoderOutput> EncodePacked(const T5Weights& w,
                                           const PackedInput& input,
                                           const RowAdapters& rows) {
  const PackedRows& packed = input.rows;
  const auto B = static_cast<int64_t>(packed.host_starts.size()) - 1;
  if (B < 1 || !input.ids.defined() || input.ids.dim() != 1 ||
      !packed.starts.defined() || packed.starts.numel() != B + 1 ||
      packed.host_starts.back() != input.ids.size(0) ||
      !input.padded_index.defined() ||
      input.padded_index.numel() != input.ids.size(0) ||
      !input.mask.defined() ||
      input.mask.sizes() != at::IntArrayRef({B, packed.max_length}) ||
      (rows.bank != nullptr && rows.slots.size(0) != B)) {
    return absl::InvalidArgumentError(
        "packed encoder: the input is not one PackRows made");
  }
  absl::Status s = CheckIds(input.ids, "input_ids");
  if (!s.ok()) return s;
  try {
    return EncodePackedImpl(w, input, rows);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("packed encoder: ", e.what_without_backtrace()));
  }
}

// DecodeFull's and DecodeFullNll's argument checks.
absl::Status CheckDecodeFullArgs(const at::Tensor& decoder_ids,
                                 const EncoderOutput& encoder,
                                 const PassBiases* biases) {
  absl::Status s = CheckIds(decoder_ids, "decoder_ids");
  if (!s.ok()) return s;
  if (decoder_ids.dim() != 2 || decoder_ids.size(1) == 0 ||
      decoder_ids.size(0) != encoder.hidden.size(0)) {
    return absl::InvalidArgumentError("decoder_ids must be [B, T] with T > 0");
  }
  if (biases != nullptr && (!biases->decoder_self.defined() ||
                            biases->decoder_self.dim() != 4 ||
                            biases->decoder_self.size(2) != decoder_ids.size(1))) {
    return absl::InvalidArgumentError(
        "decoder: the pass biases are not those of this decoder length");
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> DecodeFull(const T5Weights& w,
                                      const at::Tensor& decoder_ids,
                                      const EncoderOutput& encoder,
                                      const RowAdapters& rows,
                                      const PassBiases* biases) {
  absl::Status s = CheckDecodeFullArgs(decoder_ids, encoder, biases);
  if (!s.ok()) return s;
  try {
    return LmHead(w, DecoderHidden(w, decoder_ids, encoder, rows, biases));
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("decoder: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<at::Tensor> DecodeFullNll(const T5Weights& w,
                                         const at::Tensor& decoder_ids,
                                         const EncoderOutput& encoder,
                                         const RowAdapters& rows,
                                         const at::Tensor& labels,
                                         const PassBiases* biases) {
  absl::Status s = CheckDecodeFullArgs(decoder_ids, encoder, biases);
  if (!s.ok()) return s;
  if (!labels.defined() || labels.scalar_type() != at::kLong ||
      labels.sizes() != decoder_ids.sizes() ||
      labels.device() != decoder_ids.device()) {
    return absl::InvalidArgumentError(
        "labels must be int64 of decoder_ids' shape and device");
  }
  try {
    return RowNllSums(
        w, DecoderHidden(w, decoder_ids, encoder, rows, biases), labels);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("decoder: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<DecoderCache> InitDecoderCache(const T5Weights& w,
                                              const EncoderOutput& encoder,
                                              const RowAdapters& rows,
                                              int64_t capacity) {
  if (capacity <= 0) return absl::InvalidArgumentError("capacity must be > 0");
  try {
    const config::T5Config& c = w.config;
    const int64_t B = encoder.hidden.size(0);
    DecoderCache cache;
    cache.capacity = capacity;
    cache.cross_bias = encoder.mask_bias;
    cache.self_bias =
        PositionBias(w, w.decoder_bias_table, capacity, capacity, false, 0)
            .to(at::kFloat);
    // Self- and cross-attention keys and values are bf16 for a bf16 model
    // on the kernels (fused_ops.h DecodeSelfKvDtype, DecodeCrossKvDtype).
    const at::ScalarType kv_dtype = DecodeSelfKvDtype(w.dtype, w.device);
    const at::ScalarType cross_dtype = DecodeCrossKvDtype(w.dtype, w.device);
    auto opts = at::TensorOptions().dtype(kv_dtype).device(w.device);
    CrossKeyValues cross(w, encoder, rows);
    for (size_t i = 0; i < w.decoder.size(); ++i) {
      cache.self_k.push_back(
          at::zeros({B, c.num_heads, capacity, c.d_kv}, opts));
      cache.self_v.push_back(
          at::zeros({B, c.num_heads, capacity, c.d_kv}, opts));
      std::pair<at::Tensor, at::Tensor> kv =
          cross.Block(static_cast<int64_t>(i));
      // Contiguous once here rather than a copy per step: the single-query
      // attention folds rows and heads into one batch dimension, which the
      // fused k|v GEMM's strided views do not allow.
      cache.cross_k.push_back(kv.first.to(cross_dtype).contiguous());
      cache.cross_v.push_back(kv.second.to(cross_dtype).contiguous());
    }
    return cache;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("decoder cache: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<at::Tensor> DecodeStep(const T5Weights& w, DecoderCache& cache,
                                      const at::Tensor& ids,
                                      const RowAdapters& rows) {
  if (cache.length >= cache.capacity) {
    return absl::OutOfRangeError("decoder cache is full");
  }
  absl::Status s = CheckIds(ids, "ids");
  if (!s.ok()) return s;
  try {
    const int64_t t = cache.length;
    // Query row t; keys 0..t (the causal mask is implicit: no later keys).
    at::Tensor bias = cache.self_bias.narrow(2, t, 1).narrow(3, 0, t + 1);
    ResidualStream h{Embed(w, ids.view({-1, 1})), at::Tensor()};
    for (size_t i = 0; i < w.decoder.size(); ++i) {
      at::Tensor& self_k = cache.self_k[i];
      at::Tensor& self_v = cache.self_v[i];
      auto store = [&](const at::Tensor& k, const at::Tensor& v) {
        self_k.narrow(2, t, 1).copy_(k);
        self_v.narrow(2, t, 1).copy_(v);
        return std::make_pair(self_k.narrow(2, 0, t + 1),
                              self_v.narrow(2, 0, t + 1));
      };
      h = DecoderBlockStep(w, w.decoder[i], std::move(h), rows, store, bias,
                           cache.cross_k[i], cache.cross_v[i],
                           cache.cross_bias, /*cross_rows=*/{},
                           /*cache=*/nullptr);
    }
    cache.length = t + 1;
    return DecoderLogits(w, h).squeeze(1);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("decoder step: ", e.what_without_backtrace()));
  }
}

absl::Status ReorderCache(DecoderCache& cache, const at::Tensor& index,
                          bool cross) {
  try {
    for (size_t i = 0; i < cache.self_k.size(); ++i) {
      cache.self_k[i] = cache.self_k[i].index_select(0, index);
      cache.self_v[i] = cache.self_v[i].index_select(0, index);
      if (cross) {
        cache.cross_k[i] = cache.cross_k[i].index_select(0, index);
        cache.cross_v[i] = cache.cross_v[i].index_select(0, index);
      }
    }
    if (cross) cache.cross_bias = cache.cross_bias.index_select(0, index);
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("reorder cache: ", e.what_without_backtrace()));
  }
}

}  // namespace lorahub::model
