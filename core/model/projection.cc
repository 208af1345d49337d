#include "core/model/projection.h"

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <vector>

#include "core/model/fused_ops.h"

namespace lorahub::model::internal {

at::Tensor MatmulInput(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() == weight.scalar_type() ? x
                                                 : x.to(weight.scalar_type());
}

at::Tensor SplitHeads(const at::Tensor& x, int64_t heads, int64_t d_kv) {
  return x.view({x.size(0), x.size(1), heads, d_kv}).transpose(1, 2);
}

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

bool FeedForwardAdapted(const FeedForwardWeights& ff,
                        const RowAdapters& rows) {
  return Adapted(rows, ff.wi.site) || Adapted(rows, ff.wi_0.site) ||
         Adapted(rows, ff.wi_1.site);
}

at::Tensor LoraInput(const at::Tensor& x, const at::Tensor& x_full) {
  return (x_full.defined() ? x_full : x).to(at::kFloat);
}

bool LowPrecisionDelta(const SiteBank& sb, at::ScalarType y) {
  return y != at::kFloat && sb.a.scalar_type() == y &&
         sb.b.scalar_type() == y;
}

bool SlotRunsEnabled() {
  static const bool off = EnvFlag("LORAHUB_NO_SLOT_RUNS");
  return !off;
}

bool GemmLayout(const RowAdapters& rows, const SiteBank& sb) {
  return rows.uniform_slot >= 0 ||
         (rows.rows_per_slot > 0 && !std::isnan(sb.common_scale));
}

at::Tensor RunView(const at::Tensor& y, int64_t slots) {
  const int64_t per_slot = y.size(0) / slots * y.size(1);
  return y.as_strided({slots, per_slot, y.size(2)},
                      {per_slot * y.stride(1), y.stride(1), y.stride(2)},
                      y.storage_offset());
}

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

bool AdjacentA(const SiteBank& prev, const SiteBank& next) {
  return AdjacentFactors(prev.a, next.a);
}

namespace {

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

// How the run kernels take rows that are not one slot's (uniform_slot):
// consecutive runs of rows_per_slot rows at slots slot_offset, +1, ...
// (GemmLayout) where every site has one scaling, else, for rows with slots
// of their own (per-row slots, or runs of one row: a SlotBank's newcomers,
// whose scalings are per slot), a run per row at its slot through a
// LoraRunSlots table over the whole bank, each site's own scalings. The
// caller sets `runs`, their count.
struct KernelRuns {
  bool apply = false;
  int64_t runs = 0;
  int64_t offset = 0;
  double scale = std::nan("");
  std::optional<LoraRunSlots> table;

  // The runs' factors of a bank tensor [S, ...].
  at::Tensor Of(const at::Tensor& factors) const {
    return table ? factors : factors.narrow(0, offset, runs);
  }
  LoraRunSite Site(const SiteBank& sb, int64_t col) const {
    return {Of(sb.b), col, table ? sb.scale.reshape({-1}) : at::Tensor()};
  }
  const LoraRunSlots* Table() const { return table ? &*table : nullptr; }
};

// KernelRuns for sites[i, j) of `rows`; apply false where neither applies.
KernelRuns KernelRunsOf(const std::vector<const SiteBank*>& sites, size_t i,
                        size_t j, const RowAdapters& rows) {
  KernelRuns k;
  if (rows.uniform_slot >= 0) return k;
  const double scale = sites[i]->common_scale;
  bool common = rows.rows_per_slot > 0 && !std::isnan(scale);
  for (size_t n = i; n < j; ++n) {
    common = common && sites[n]->common_scale == scale;
  }
  if (common) {
    k.apply = true;
    k.offset = rows.slot_offset;
    k.scale = scale;
  } else if (rows.rows_per_slot <= 1 && SlotRunsEnabled() &&
             rows.slots.defined()) {
    k.apply = true;
    k.table = LoraRunSlots{
        rows.slots, rows.all_rows ? at::Tensor() : rows.mask.reshape({-1})};
  }
  return k;
}

// Rows not of one slot: the deltas of sites[i, j) (their A factors side by
// side: AdjacentA) into their column slices of y by the run kernels
// (fused_ops.h LoraRunDeltas: the shrink, one expand for every site; per-row
// slots through a LoraRunSlots table), for callers whose `narrow` holds (a
// reduced-precision model). False, having changed nothing, where they do
// not run; the caller then runs the GEMMs or the per-row gather.
bool RunKernelDeltas(const at::Tensor& y, const std::vector<int64_t>& cols,
                     const std::vector<const SiteBank*>& sites, size_t i,
                     size_t j, const at::Tensor& xin, const RowAdapters& rows) {
  if (y.dim() != 3 || xin.dim() != 3 ||
      y.stride(0) != y.size(1) * y.stride(1)) {
    return false;
  }
  KernelRuns k = KernelRunsOf(sites, i, j, rows);
  const int64_t B = xin.size(0);
  if (!k.apply) return false;
  if (k.table) {
    if (rows.slots.size(0) != B) return false;
    k.runs = B;
  } else {
    if (B % rows.rows_per_slot != 0) return false;
    k.runs = B / rows.rows_per_slot;
  }
  const at::Tensor a_run =
      SideBySideA(sites[i]->a, static_cast<int64_t>(j - i));  // [S, R, in]
  std::vector<LoraRunSite> run;
  for (size_t n = i; n < j; ++n) run.push_back(k.Site(*sites[n], cols[n]));
  const at::Tensor x = xin.reshape({k.runs, -1, xin.size(2)});
  return LoraRunDeltas(RunView(y, k.runs), x, k.Of(a_run), at::Tensor(), run,
                       k.scale, at::Tensor(), k.Table());
}

// y += the per-row LoRA delta of `sb` for input `xin`, in place. y: fp32
// [B, T, out], possibly a column slice of a wider output (fused GEMMs): the
// GEMMs with accumulate write through its leading dimension, no copy.
// xin: fp32 [B, T, in]. The arithmetic is that of adding the delta to a
// separate output, y + scale * (x A^T) B^T.
void AddLoraDelta(at::Tensor y, const at::Tensor& xin, const SiteBank& sb,
                  const RowAdapters& rows, bool narrow) {
  if (RowGemvDeltas(y, {0}, {&sb}, 0, 1, xin, rows)) return;
  if (narrow && RunKernelDeltas(y, {0}, {&sb}, 0, 1, xin, rows)) return;
  if (GemmLayout(rows, sb)) {
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
// scaling, or rows with slots of their own (SlotRunsEnabled), for a
// reduced-precision model (`narrow`, as RunKernelDeltas), take the packed
// run kernels (fused_ops.h LoraPackedRunDeltas), a group
// of sites with adjacent A factors at once. The rest goes row by row
// through the unpacked paths: the same deltas, at a launch or more per row
// (the CPU, other layouts).
void PackedLoraDeltas(const at::Tensor& y, const std::vector<int64_t>& cols,
                      const std::vector<const SiteBank*>& sites,
                      const at::Tensor& xin, const RowAdapters& rows,
                      bool narrow) {
  const PackedRows& packed = *rows.packed;
  // Each run's tokens: the rows' own (a run per row: per-row slots, or one
  // row per slot), or packed_runs' where a run has several rows or
  // `packed` has rows past the runs (a static packed encoder's padding row).
  const PackedRows* runs = rows.packed_runs != nullptr ? rows.packed_runs
                           : rows.rows_per_slot <= 1   ? &packed
                                                       : nullptr;
  // Sites [i, j) through the packed run kernels, or false (nothing done).
  const auto run_kernels = [&](size_t i, size_t j) {
    KernelRuns k = KernelRunsOf(sites, i, j, rows);
    if (!k.apply) return false;
    k.runs = k.table ? rows.slots.size(0) : runs->starts.size(0) - 1;
    if (runs->starts.size(0) <= k.runs) return false;
    std::vector<LoraRunSite> run;
    for (size_t n = i; n < j; ++n) run.push_back(k.Site(*sites[n], cols[n]));
    const at::Tensor a_run =
        k.Of(SideBySideA(sites[i]->a, static_cast<int64_t>(j - i)));
    return LoraPackedRunDeltas(y, xin, a_run, run, k.scale,
                               runs->starts.narrow(0, 0, k.runs + 1),
                               runs->max_length, at::Tensor(), k.Table());
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
  // The adapters' rows (a static packed encoder's padding row has none).
  const int64_t B = rows.slots.size(0);
  TORCH_CHECK(static_cast<int64_t>(packed.host_starts.size()) > B,
              "packed LoRA deltas: rows known on the device only need the "
              "packed run kernels");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t first = packed.host_starts[b];
    const int64_t len = packed.host_starts[b + 1] - first;
    if (len <= 0) continue;
    AddLoraDeltas(y.narrow(1, first, len), rest_cols, rest,
                  xin.narrow(1, first, len), PackedRow(rows, b), narrow);
  }
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

}  // namespace

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
    if (RowGemvDeltas(y, cols, sites, i, j, xin, rows) ||
        (narrow && j - i > 1 &&
         RunKernelDeltas(y, cols, sites, i, j, xin, rows))) {
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

}  // namespace lorahub::model::internal
