// What a pooled CUDA graph reads besides its own buffers, as a pool key
// (StaticDecoderPool, StaticEncoderPool): a captured graph reads tensors
// where they lay when it was captured, so it fits a later call only when
// the call's tensors are the same ones, at the same addresses with the same
// sizes, and its per-site scale values are the same bits.
//
// Thread-safety: none (a value type; the pools guard theirs).
#ifndef LORAHUB_CORE_MODEL_GRAPH_READS_H_
#define LORAHUB_CORE_MODEL_GRAPH_READS_H_

#include <ATen/core/Tensor.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <vector>

namespace lorahub::model {

struct AdapterBank;
struct AttentionWeights;
struct FeedForwardWeights;
struct T5Weights;

class GraphReads {
 public:
  // A tensor by data address, rank and sizes; an undefined one as a marker
  // of its own. Keeps a weak reference to its storage (Alive).
  void Add(const at::Tensor& t);
  // A block's weights, each tensor as Add: q, k, v, o and the fused q|k|v;
  // wi, wi_0, wi_1, wo and the fused wi_0|wi_1.
  void AddAttention(const AttentionWeights& a);
  void AddFeedForward(const FeedForwardWeights& f);
  // What an encoder pass reads of `w`: the embedding, the position bias
  // table, every encoder block's norms and weights, the final norm.
  void AddEncoder(const T5Weights& w);
  // Every site of `bank`: its common scale, a, b and per-slot scales.
  void AddBank(const AdapterBank& bank);
  // AddBank's reads of the sites an encoder pass of `w` reads (the encoder
  // blocks' sites, t5_weights.h kSitesPerBlock): a graph of the encoder
  // fits banks whose decoder sites differ.
  void AddEncoderBank(const T5Weights& w, const AdapterBank& bank);
  // Sizes alone, for what is copied into the graph's buffers.
  void AddSizes(at::IntArrayRef sizes);
  // Compared bit for bit: NaN (no common scaling) equals NaN.
  void AddScale(double scale);
  // False once any added tensor's storage was freed: its address may now
  // belong to another tensor.
  bool Alive() const;
  bool operator==(const GraphReads& other) const;

 private:
  void AddSites(const AdapterBank& bank, size_t end);  // sites [0, end)

  std::vector<int64_t> words_;   // addresses, ranks and sizes, in order
  std::vector<uint64_t> scales_;  // the scales' bits
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> alive_;
};

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_GRAPH_READS_H_
