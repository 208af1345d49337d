// An AdapterBank of fixed capacity whose slots keep their adapter while the
// rows that use it come and go: the serving engine's running batch.
//
// Why: the engine rebuilt the bank of all distinct adapters of the batch
// (MakeAdapterBank) whenever a row joined or left, copying every resident
// adapter's factors again (flan-t5-large, r = 16 on q and v: 19 MB and
// about 300 copy kernels per adapter, per rebuild) although only one row
// had changed. Here Acquire copies an adapter into a slot only when it is
// not resident, and Release leaves the factors in place, so an adapter that
// returns before its slot is reused costs no copy at all. Slots are stable:
// the per-row decode kernels (fused_ops.h LoraRowDeltas) take any layout.
//
// Memory: for every site any acquired adapter adapts, [capacity, r, in] +
// [capacity, out, r] fp32 factors (r: the largest rank seen at the site;
// a larger one later reallocates that site; a decoder block's
// self-attention q and v are allocated together, their A factors side by
// side in each slot, as composed banks hold them), plus their bf16 copies for
// the decode kernels on a bf16 model (RowKernelFactorDtype) and, on CUDA,
// int8 copies for the decode steps (RowKernelInt8). Slots an
// adapter does not use at a site hold zeros there.
// Thread-safety: none; one owner (the engine's GPU thread).
#ifndef LORAHUB_CORE_MODEL_SLOT_BANK_H_
#define LORAHUB_CORE_MODEL_SLOT_BANK_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/fused_ops.h"
#include "core/model/lora.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

class SlotBank {
 public:
  // `base` must outlive the bank; capacity >= 1 slots.
  SlotBank(const T5Weights& base, int64_t capacity);

  // The slot holding `adapter`, copied in if it is not resident (into a
  // free slot, the least recently released first); one more user.
  // ResourceExhausted when every slot has users; InvalidArgument for a
  // null adapter or a site the base has not; Internal for LibTorch errors
  // (nothing changed then).
  absl::StatusOr<int64_t> Acquire(
      const std::shared_ptr<const LoraAdapter>& adapter);
  // Acquire for a composition not yet computed: the slot holding
  // `mix.key`, else a free slot into which the mix's sum is computed
  // straight from its modules' buffers, the same bits as Acquire of
  // ComposeLoraHubModules(mix.modules, mix.weights). On CUDA one launch
  // through a plan the slot keeps (LoadPlan's reasons), plus the int8
  // quantization: no composed copy, no views of one. A site whose rank is
  // below the bank's (zero-padded) takes the composition and Acquire's copy.
  // The slot keeps no reference to the mix. Errors as Acquire's, and
  // InvalidArgument for a malformed mix (more than kMaxSliceSumTerms
  // modules among them).
  absl::StatusOr<int64_t> AcquireMix(const ModuleMix& mix);
  // One user less of `slot` (ignored for a slot without users).
  void Release(int64_t slot);

  // The bank for MakeRowAdapters: num_slots == capacity; only the sites
  // some slot with users adapts are defined (a site that only released
  // adapters used costs nothing). Its tensors keep their addresses except
  // when Acquire grows a site's rank.
  const AdapterBank& bank() const { return active_; }
  // Every site any adapter was ever loaded for, in all slots (a slot's
  // factors hold zeros at the sites its adapter does not adapt): a bank
  // whose tensors keep their addresses while no site is added or widened,
  // for a decoder that captured them (static_decoder.h CreateSlots). Rows
  // of released slots must be masked out.
  const AdapterBank& resident() const { return bank_; }
  int64_t capacity() const { return static_cast<int64_t>(slots_.size()); }
  int64_t users(int64_t slot) const { return slots_[slot].users; }
  // Adapters and mixes copied in so far (tests, metrics).
  int64_t copies() const { return copies_; }
  // Of those, the copies that reused their slot's last plan (tests).
  int64_t planned_copies() const { return planned_copies_; }
  // Of copies(), the mixes computed into a slot (tests).
  int64_t mix_loads() const { return mix_loads_; }
  // Moves whenever a site of resident() is allocated or widened (its
  // tensors then move): a graph that read resident() is stale after.
  int64_t layout() const { return layout_; }
  // Runs (on the calling thread) before a site's tensors are allocated or
  // widened, which frees the old ones. The serving engine loads slots on a
  // side stream (cuda_graph.h SideStream) while its own stream may still
  // have steps queued that read them: it waits for the device there.
  void set_before_reallocation(std::function<void()> f) {
    before_reallocation_ = std::move(f);
  }

 private:
  // The weighted sums (copies and fills) of the slot's last load, made
  // again only when an adapter adapts other sites or other ranks, or the
  // bank's layout changed. Why: making them (flan-t5-large: 720, each with
  // views of the slot's factors) took ~1 ms of the engine thread per load
  // on an H200 host; a composition of the same modules adapts the same
  // sites, so the next load only swaps the sources (and scales) in: 1,152
  // loads took 0.27-0.32 s against 1.16-1.27 s (twentieth session, calls
  // 3-4). Memory: the views stay, ~0.3 MB of host memory per slot.
  struct LoadPlan {
    int64_t layout = -1;      // layout_ when made; -1: none
    std::vector<int> sites;   // the adapter's sites, in its order
    std::vector<WeightedSum> sums;
    bool low = false;         // each site's a and b copied twice (a_low, b_low)
  };
  // AcquireMix's slice sums into the slot for modules of one layout (its
  // sites, ranks and scalings), made again when the modules' layout or the
  // bank's changes.
  struct MixPlan {
    int64_t layout = -1;  // layout_ when made; -1: none
    std::vector<int> sites;
    std::vector<int64_t> ranks;
    std::vector<double> scaling;
    SliceSumPlan sums;
  };
  struct Slot {
    std::weak_ptr<const LoraAdapter> adapter;  // resident, if not expired
    std::string mix_key;                       // or this mix, if not empty
    std::vector<int> sites;                    // the sites it adapts
    int64_t users = 0;
    uint64_t released_at = 0;  // Release order, for the choice of a slot
    LoadPlan plan;
    MixPlan mix_plan;
    // The slot's quantization of every site with int8 copies, planned once
    // per layout (views of the slot's blocks, the job table on the device).
    int64_t int8_layout = -1;
    Int8QuantizationPlan int8_plan;
  };

  // InvalidArgument naming `what` ("adapter", "module") if a site of
  // `adapter` is not the base's.
  absl::Status CheckSites(const LoraAdapter& adapter, const char* what) const;
  // One more user of `slot` (its sites counted at the first); returns it.
  int64_t Use(size_t slot);
  // The free slot to load next (never-used first, then the least recently
  // released), no longer holding its adapter or mix; or ResourceExhausted.
  absl::StatusOr<int64_t> TakeFreeSlot();
  // Copies `adapter` into `slot` (zeros where it adapts nothing), then its
  // int8 step factors (Quantize). May throw c10::Error.
  void Load(int64_t slot, const LoraAdapter& adapter);
  // AcquireMix's load of `mix` into `slot` (Load of its composition where
  // the slot cannot take it through a MixPlan).
  absl::Status LoadMix(int64_t slot, const ModuleMix& mix);
  // The slot's MixPlan made fresh for modules like `first`; false (no plan)
  // where a site's rank is below the bank's.
  bool PlanMix(int64_t slot, const LoraAdapter& first);
  // True if the slot's MixPlan was made for modules like `first`.
  bool MixPlanFits(int64_t slot, const LoraAdapter& first) const;
  void LoadFactors(int64_t slot, const LoraAdapter& adapter);
  // The int8 copies of `slot`'s factors at every site that has them, from
  // its fp32 factors (after they are written: the same stream).
  void Quantize(int64_t slot);
  // Load through the slot's plan; false (nothing done) where it does not
  // fit `adapter`.
  bool LoadPlanned(int64_t slot, const LoraAdapter& adapter);
  // A factor WeightedSums copies whole: on the bank's device, contiguous,
  // fp32 or bf16.
  bool Summable(const at::Tensor& t) const;
  // The sites allocated together with `site`, in site order: a block's
  // self-attention q and v (encoder and decoder), two neighbouring decoder
  // blocks' cross-attention v, else `site` alone.
  std::vector<int> SitesAllocatedWith(int site) const;
  // Allocates or widens site `site` (and those allocated with it) to rank
  // `r`. May throw c10::Error.
  void Reserve(int site, int64_t r);
  // Counts `slot`'s sites as adapted by one more (delta 1) or one fewer
  // (-1) slot with users, and puts into active_ (or out of it) the sites
  // whose count leaves or reaches 0. Why not a rebuild of active_: that
  // copied every site's tensors at each acquire and release (~50 us of the
  // engine thread for flan-t5-large's sites).
  void CountSites(const Slot& slot, int delta);

  const T5Weights& base_;
  // The decode kernels' copies of the factors (a_low, b_low) in this dtype;
  // none for kFloat (fused_ops.h RowKernelFactorDtype).
  const at::ScalarType low_dtype_;
  // Whether sites keep int8 copies for the decode steps (fused_ops.h
  // RowKernelInt8).
  const bool int8_;
  AdapterBank bank_;    // every site any adapter was loaded for
  AdapterBank active_;  // bank_'s sites that slots with users adapt
  std::vector<int> site_users_;  // per site: slots with users adapting it
  std::vector<Slot> slots_;
  uint64_t clock_ = 0;
  int64_t copies_ = 0;
  int64_t planned_copies_ = 0;
  int64_t mix_loads_ = 0;
  std::function<void()> before_reallocation_;
  int64_t layout_ = 0;  // moved by every allocation or widening of a site
};

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_SLOT_BANK_H_
