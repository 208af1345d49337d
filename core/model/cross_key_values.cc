// CrossKeyValues and CrossKvBuffer (t5_layers.h): the decoder's
// cross-attention keys and values from an encoder output.
#include "core/model/t5_layers.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "core/model/fused_ops.h"
#include "core/model/projection.h"

namespace lorahub::model::internal {

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

}  // namespace lorahub::model::internal
