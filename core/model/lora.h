// LoRA adapters over T5Weights: loading and validating PEFT adapters, the
// per-row adapter bank used by the forward pass, merged weights, and the
// LoraHub composition primitive.
//
// Maths (PEFT): y = x W^T + scaling * (x A^T) B^T with A [r, in], B [out, r];
// scaling = alpha / r, or alpha / sqrt(r) with use_rslora. As in PEFT, the
// LoRA factors stay fp32 and the delta is computed in fp32 and added to the
// base output before rounding to the compute dtype.
// Thread-safety: all types are immutable values after construction.
#ifndef LORAHUB_CORE_MODEL_LORA_H_
#define LORAHUB_CORE_MODEL_LORA_H_

#include <ATen/core/Tensor.h>

#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config/lora_config.h"
#include "core/io/host_tensor.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

// One adapted linear layer.
struct LoraSite {
  int site = -1;
  at::Tensor a;  // [r, in], fp32 (as PEFT keeps it), on the model's device
  at::Tensor b;  // [out, r]
  double scaling = 1.0;
};

// One PEFT adapter, validated against a base model. Sites sorted by index.
struct LoraAdapter {
  std::string name;
  std::vector<LoraSite> sites;
};

// Builds an adapter from its config and state dict (keys
// `base_model.model.<module>.lora_{A,B}.weight`). InvalidArgument naming the
// key for: a key of another form, a module the base has not, a module the
// config does not target, a shape that disagrees with the base layer, a rank
// that disagrees with r/rank_pattern, or a lone lora_A/lora_B.
absl::StatusOr<LoraAdapter> BuildLoraAdapter(const T5Weights& base,
                                             const config::LoraConfig& config,
                                             const io::TensorMap& tensors,
                                             const std::string& source);

// Stacks of per-row adapters. Slot s of site i is a[i][s], b[i][s],
// scale[i][s]; slots without an adapter at a site hold zeros (a different rank
// is zero-padded to the largest one, which does not change B A).
struct SiteBank {
  at::Tensor a;  // [S, r, in]; undefined if no slot adapts this site
  at::Tensor b;  // [S, out, r]
  at::Tensor
      scale;  // [S, 1, 1]; a, b, scale are fp32 whatever the compute dtype
  // Optional low-precision copies of a and b (AttachRowKernelCopies: same
  // sizes, strides and offsets): what the per-row decode kernels read
  // (fused_ops.h LoraRowDeltas), their arithmetic fp32 as for a and b.
  // Every other path reads a and b.
  at::Tensor a_low;
  at::Tensor b_low;
  // Optional int8 copies of a and b for the decode steps' norm+shrink and
  // step attention only (AttachStepInt8Copies, SlotBank; fused_ops.h
  // RowKernelInt8): each slot's block of a and of b scaled by its own
  // absolute maximum over 127, and scale_int8 [S, 1, 1] fp32 = scale *
  // both blocks' scales, by which their product is multiplied. a_int8 and
  // b_int8 have the sizes, strides and offsets of a and b.
  at::Tensor a_int8;
  at::Tensor b_int8;
  at::Tensor scale_int8;
  // The value of every entry of `scale` when they are all equal (composed
  // banks: the first module's scaling), else NaN. Lets the forward pass fold
  // the scaling into one GEMM instead of a separate multiply.
  double common_scale = std::numeric_limits<double>::quiet_NaN();
};
struct AdapterBank {
  int num_slots = 0;
  std::vector<SiteBank> sites;  // indexed by site; size == base.num_sites
};

// Puts `adapters` into slots 0..n-1 (nullptr entries give empty slots).
absl::StatusOr<AdapterBank> MakeAdapterBank(
    const T5Weights& base, const std::vector<const LoraAdapter*>& adapters);

// Rows laid end to end without padding (t5_forward.h EncodePacked): the
// pass's activations are [1, tokens, ...] and row i's tokens are
// host_starts[i] .. host_starts[i + 1] - 1.
struct PackedRows {
  at::Tensor starts;                 // int32 [B + 1] on the model device
  // The same offsets, on the host; empty where the rows are known on the
  // device only (a captured pass replayed over other rows,
  // static_packed_encoder.h): then only the CUDA kernels, which read
  // `starts`, take them, and any path that would read offsets on the host
  // fails instead.
  std::vector<int64_t> host_starts;
  int64_t max_length = 0;  // the longest row (or a bound of it)
};

// Which adapter slot each batch row uses; -1 = none. Built once per forward
// (or per generation) and shared by all layers.
struct RowAdapters {
  const AdapterBank* bank = nullptr;  // nullptr: no adapters at all
  at::Tensor slots;       // [B] int64 on the model device, clamped to >= 0
  at::Tensor mask;        // [B, 1, 1] fp32: 1 where the row has a slot
  bool all_rows = false;  // every row has a slot: the mask is skipped
  // >= 0 when every row uses this one slot: plain matmuls, no gather.
  int64_t uniform_slot = -1;
  // > 0 when the rows come in consecutive runs of this length, one run per
  // slot, for slots slot_offset, slot_offset + 1, ... (the objective's
  // candidate-major rows, one distinct adapter per row): batched GEMMs over
  // slots, no gather.
  int64_t rows_per_slot = 0;
  int64_t slot_offset = 0;
  // Set by EncodePacked for its own pass only (not owned): the rows are
  // packed (PackedRows), and the LoRA deltas follow their token ranges.
  const PackedRows* packed = nullptr;
  // With packed rows in runs (rows_per_slot > 1), set there too: each
  // slot's token range, the rows of its run together. May be set for
  // rows_per_slot == 1 too, where `packed` has rows past the runs (a
  // static packed encoder's padding row); otherwise those runs are
  // `packed`'s rows.
  const PackedRows* packed_runs = nullptr;
};

// `slots` are host values, one per row. InvalidArgument if a slot is out of
// range. An empty bank or all -1 yields bank == nullptr (zero extra cost).
absl::StatusOr<RowAdapters> MakeRowAdapters(const T5Weights& base,
                                            const AdapterBank* bank,
                                            const std::vector<int64_t>& slots);
// Rows reindexed (beam search, expanding prompts): row i takes old row
// index[i]. `index` is an int64 tensor on the device.
RowAdapters SelectRows(const RowAdapters& rows, const at::Tensor& index);

// A copy of `base` in which the weight of every site in `sites` has storage
// of its own: a fused tensor (t5_weights.h) with such a member is copied
// whole and its members become views of the copy, so writes through them
// reach the fused GEMMs; every other tensor shares storage with `base`.
// InvalidArgument for a site the model has no linear layer at.
absl::StatusOr<T5Weights> CopyAdaptedWeights(const T5Weights& base,
                                             const std::set<int>& sites);

// A copy of `base` in which every adapted site's weight is
// W + scaling * B A (computed in fp32, then cast). Unadapted tensors share
// storage with `base`.
absl::StatusOr<T5Weights> MergeAdapter(const T5Weights& base,
                                       const LoraAdapter& adapter);

// N modules with identical sites and ranks, stacked on the device (fp32).
struct ModuleStack {
  // The adapted sites of one (r, in, out) shape: the N modules' factors of
  // all of them in ONE [N, k * (r*in + out*r)] tensor, every site's A (in
  // `entries` order: site order, the decoder's cross k/v last) then every
  // site's B, so that composing any w is one GEMM per group.
  struct Group {
    int64_t r = 0, in = 0, out = 0;
    std::vector<size_t> entries;  // indices into `sites`
    at::Tensor factors;
  };
  int num_modules = 0;
  std::vector<int> sites;       // adapted site indices
  std::vector<at::Tensor> a;    // per entry of `sites`: [N, r, in], a view of a group's factors
  std::vector<at::Tensor> b;    // [N, out, r], likewise
  std::vector<double> scaling;  // from the first module (LoraHub rule)
  std::vector<Group> groups;
  int num_base_sites = 0;
  int num_encoder_layers = 0;  // of the base (IsCrossKeyValueSite)
};

// InvalidArgument if the modules differ in sites or ranks (naming the module
// and site) or if `modules` is empty.
absl::StatusOr<ModuleStack> StackModules(
    const T5Weights& base, const std::vector<const LoraAdapter*>& modules);

// LoraHub composition for C candidate weight vectors at once: for candidate
// c, A_c = sum_i W[c,i] A_i and B_c = sum_i W[c,i] B_i per site (not the sum
// of deltas), scaling of the first module. `weights` is [C, N] (any float
// dtype, any device). The result has C slots usable as per-row adapters.
// One GEMM per shape group of the stack ([C, N] x the group's factors): the
// composed A factors of sites of one shape are views of one tensor, side by
// side in site order with the decoder's cross k/v last (the forward pass then
// shares one down-projection GEMM between neighbours that read the same
// input, t5_forward.cc).
using ComposedAdapters = AdapterBank;
absl::StatusOr<ComposedAdapters> ComposeLoraHub(const ModuleStack& stack,
                                                const at::Tensor& weights);

// Gives every defined site of `bank` a_low / b_low: its factors in `dtype`
// with the same sizes, strides and storage offsets (one conversion per
// underlying storage, so factors that lie side by side stay so), for the
// per-row decode kernels. Why: at batch 64 with 64 different adapters
// those kernels read every row's factors at every step (flan-t5-large, r =
// 16 on q and v: 8 MB per shrink or expand in fp32) and are bound by those
// reads; bf16 halves them (tenth session). kFloat drops them. Internal
// for LibTorch errors. Not for banks whose a/b change later unless the
// owner updates the copies too (SlotBank does).
absl::Status AttachRowKernelCopies(AdapterBank* bank, at::ScalarType dtype);

// Gives every defined site of `bank` a_int8, b_int8 and scale_int8 (each
// converted storage whole, as AttachRowKernelCopies does, so that factors
// side by side stay so; every slot's blocks quantized on their own:
// fused_ops.h QuantizeFactorsInt8). Each slot's block of a site's a and b
// must be contiguous (the layouts of ComposeLoraHub and MakeAdapterBank).
// InvalidArgument otherwise; Internal for LibTorch errors. Not for banks
// whose a/b change later unless the owner updates the copies too (SlotBank
// does).
absl::Status AttachStepInt8Copies(AdapterBank* bank);

// t[slot] (a bank tensor [S, ...]) as one as_strided view. Why: select
// took 2-6 us per call on a CPU, as_strided 0.3; a serving slot load takes
// five per site (flan-t5-large: 720).
at::Tensor SlotView(const at::Tensor& t, int64_t slot);

struct Int8Quantization;  // fused_ops.h
// The quantization of `slot`'s blocks of a site with int8 copies (fused_ops.h
// QuantizeFactorsInt8): views of its a, b, a_int8, b_int8, scale and
// scale_int8, all defined, each slot's blocks contiguous.
Int8Quantization SlotInt8Quantization(const SiteBank& sb, int64_t slot);

// The composed adapter of one weight vector as a LoraAdapter (for merging).
absl::StatusOr<LoraAdapter> ComposeOne(const ModuleStack& stack,
                                       const std::vector<double>& weights);

// What StackModules and ComposeLoraHubModules require of `modules`: at
// least one, all with the first one's sites in its order and ranks.
// InvalidArgument naming the first difference.
absl::Status CheckStackable(const T5Weights& base,
                            const std::vector<const LoraAdapter*>& modules);

// The LoraHub composition of `modules` (the same sites in the same order and
// ranks, as StackModules requires; scaling of the first) at `weights`, one
// per module: A = sum_i w_i A_i and B = sum_i w_i B_i per site, in fp32, in
// module order, each product and sum rounded (the reference's arithmetic),
// into one new buffer on the first module's device. Unlike StackModules +
// ComposeOne it copies no module: one fused_ops.h WeightedSums call, with
// one sum of whole buffers when each module lies in one buffer in the
// output's layout (the module cache's), else one sum per factor (the
// serving engine composes on its thread per request).
// InvalidArgument for mismatched modules or weights; Internal for LibTorch
// errors.
absl::StatusOr<LoraAdapter> ComposeLoraHubModules(
    const T5Weights& base, const std::vector<const LoraAdapter*>& modules,
    const std::vector<double>& weights);

// All factors of `adapter` as one 1-D tensor, when they lie back to back in
// one buffer from its start, in site order, a before b, in one dtype (how
// the module cache keeps a module); undefined otherwise. Host work only.
at::Tensor FlatFactors(const LoraAdapter& adapter);

// A LoraHub composition not yet computed: what ComposeLoraHubModules would
// make of `modules` at `weights`, for SlotBank::AcquireMix to compute
// straight into a serving slot (no composed copy, no views of it). Every
// module lies in one buffer (`flats`, FlatFactors) and CheckStackable
// holds. `key` names the content (two mixes of one key are one adapter);
// the module pointers keep the modules (and pin them in the module cache)
// while the mix is held.
struct ModuleMix {
  std::string key;
  std::vector<std::shared_ptr<const LoraAdapter>> modules;
  std::vector<at::Tensor> flats;
  std::vector<double> weights;
};

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_LORA_H_
