// fused_ops.h without CUDA kernels (Bazel here, CMake without a CUDA
// LibTorch or nvcc): every call takes the ATen fallback.
#include "core/model/fused_ops_backend.h"

namespace lorahub::model::fused_backend {

bool Compiled() { return false; }

bool StreamCapturing(c10::Device) { return false; }

bool RmsNorm(const at::Tensor&, const at::Tensor&, double, at::ScalarType,
             NormOutput*) {
  return false;
}

bool AddRmsNorm(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                double, at::ScalarType, bool, AddNormOutput*) {
  return false;
}

bool GatedGeluTanh(const at::Tensor&, const at::Tensor&, at::Tensor*) {
  return false;
}

bool SmallAttention(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, at::ScalarType,
                    kernels::AttentionVariant, at::Tensor*) {
  return false;
}

bool Attention(const at::Tensor&, const at::Tensor&, const at::Tensor&,
               const at::Tensor&, at::Tensor*) {
  return false;
}

bool PackedAttention(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, at::ScalarType,
                     at::Tensor*) {
  return false;
}

bool LoraRowDeltas(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const std::vector<LoraRowSite>&, const at::Tensor&,
                   const at::Tensor&) {
  return false;
}

bool AddRmsNormShrink(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      double, at::ScalarType, const at::Tensor&,
                      const at::Tensor&, AddNormOutput*, at::Tensor*) {
  return false;
}

at::Tensor LoraRowShrink(const at::Tensor&, const at::Tensor&,
                         const at::Tensor&) {
  return at::Tensor();
}

bool LoraRowExpand(const at::Tensor&, const at::Tensor&,
                   const std::vector<LoraRowSite>&, const at::Tensor&,
                   const at::Tensor&) {
  return false;
}

bool DecodeStepAttention(const DecodeStepInputs&, at::ScalarType, at::Tensor*) {
  return false;
}

bool StartDecoderStep(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      at::Tensor&, int64_t, DecoderStepStart*) {
  return false;
}

bool LoraRunDeltas(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, const std::vector<LoraRunSite>&, double,
                   const at::Tensor&, const LoraRunSlots*) {
  return false;
}

bool LoraPackedRunDeltas(const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const std::vector<LoraRunSite>&,
                         double, const at::Tensor&, int64_t,
                         const at::Tensor&, const LoraRunSlots*) {
  return false;
}

at::Tensor LoraPackedRunShrink(const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, int64_t) {
  return at::Tensor();
}

bool LoraPackedRunExpand(const at::Tensor&, const at::Tensor&,
                         const std::vector<LoraRunSite>&, double,
                         const at::Tensor&, int64_t, const at::Tensor&) {
  return false;
}

bool WeightedSums(const std::vector<WeightedSum>&) { return false; }
at::Tensor SliceSumTable(const std::vector<SliceSum>&) { return at::Tensor(); }
void RunSliceSums(const at::Tensor&, int, int64_t, const std::vector<at::Tensor>&,
                  const std::vector<float>&) {}
at::Tensor Int8QuantizationTable(const std::vector<Int8Quantization>&) { return at::Tensor(); }
void RunInt8Quantization(const at::Tensor&, int) {}
bool ComposeFromBf16(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return false; }
bool ComposeRows(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return false; }
at::Tensor LowRankMergeTable(const std::vector<LowRankUpdate>&, int64_t*, bool*) {
  return at::Tensor();
}
void RunLowRankMerge(const at::Tensor&, int, int64_t, bool, int) {
  TORCH_CHECK(false, "LowRankMerge: no CUDA kernels in this build");
}

bool NarrowGemm(const at::Tensor&, const at::Tensor&, at::Tensor*) {
  return false;
}

bool RunShrink(const at::Tensor&, const at::Tensor&, at::Tensor*) {
  return false;
}

bool TokenNll(const at::Tensor&, const at::Tensor&, at::Tensor*) {
  return false;
}

bool PersistentDecoder(const std::vector<PersistentDecoderLayerInputs>&,
                       const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, double, at::Tensor*) {
  return false;
}

bool GreedyTokens(const at::Tensor&, at::Tensor*, int64_t, int64_t,
                  at::Tensor*, const GreedyInto&, bool*) {
  return false;
}

bool BmmFloat(const at::Tensor&, const at::Tensor&, at::Tensor*) {
  return false;
}

bool BmmFloatInto(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  return false;
}

bool SplitBf16(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  return false;
}

bool SplitScoresSoftmax(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&) {
  return false;
}

bool HeadLoraDeltas(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, const at::Tensor&) {
  return false;
}

}  // namespace lorahub::model::fused_backend
