// A fast, fixed-shape evaluator of the LoraHub loss for C candidate weight
// vectors at a time: the numbers of ScoreCandidates(ComposeLoraHub(...)),
// with the per-call host work reduced to one small copy in and one out.
//
// Built once per (base weights, module stack, examples, C, options). At
// construction it puts on the device every tensor that does not depend on the
// weights: the padded ids / masks / labels / decoder inputs of every row
// (row c*n + e = candidate c, example e, the order of ScoreCandidates), the
// per-chunk row -> candidate slot tensors, and the LoRA factors of the
// modules regrouped by site shape ([N, sites * (r*in + out*r)]: all A
// factors, then all B), so that composing all C candidates for all sites is
// one matmul per shape group; each site's composed A and B are views of that
// result, and consecutive sites' A lie side by side (t5_forward.cc runs one
// down-projection GEMM for q and v of an attention, and one for the cross
// k/v of all decoder blocks, which come last in their group).
//
// A bf16 runner of one candidate (COBYLA's shape) merges instead
// (ObjectiveRunnerOptions::merge_single): every adapted weight gets a copy
// at construction, each evaluation writes W + scaling * B A into it (one
// kernel on CUDA), and the forward pass runs the plain model on the copies.
//
// On a CUDA device (and a build with cuda_graph_cuda.cc) the whole evaluation
// (compose, encoder, decoder, per-row token cross-entropy sums) is captured
// once as a CUDA graph, checked once against an eager run of the same ops,
// and replayed per call; if anything about the graph fails (capture, the
// check, a replay), the runner falls back to running the same ops eagerly,
// logs that once per process on stderr, and says why in graph_status(). On
// the CPU it always runs eagerly.
//
// Ownership: keeps a reference to `weights`, which must outlive the runner;
// copies what it needs of the stack and examples (and, merging, the adapted
// weights: 450 MB for flan-t5-large's q and v in bf16). Thread-safety: none; one
// Losses() call at a time. Not movable (the graph captured its own members).
#ifndef LORAHUB_CORE_MODEL_OBJECTIVE_RUNNER_H_
#define LORAHUB_CORE_MODEL_OBJECTIVE_RUNNER_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/lora.h"
#include "core/model/scorer.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"

namespace lorahub::model {

class CapturedGraph;
class LowRankMerge;
struct LowRankUpdate;
class StreamBranch;

struct ObjectiveRunnerOptions {
  // Reference batch grouping and rows per forward pass, as ScoreCandidates.
  ScoreOptions score;
  // Capture a CUDA graph on CUDA devices (falls back to eager on failure).
  bool cuda_graph = true;
  // bf16 models only (ignored otherwise): the composed factors are rounded
  // to bf16 once per evaluation (one cast per shape group, the scaling
  // folded into B at construction), and every LoRA delta runs as bf16 GEMMs
  // accumulated in place into the bf16 projection output (t5_forward.cc
  // LowPrecisionDelta): no fp32 GEMMs, no widening of adapted outputs.
  // Rounds, beyond the default fp32 delta: A and B*scaling (once each), the
  // delta's input (the bf16 matmul input instead of the fp32 norm output),
  // x A^T, and y + delta once more. Default: LORAHUB_LORA_BF16=1 in the
  // environment (experimental, for an A/B).
  bool bf16_lora = LoraBf16FromEnv();
  // bf16 models with one candidate per call (ignored otherwise, and under
  // bf16_lora): each evaluation merges the composed adapter into a copy of
  // the adapted weights (fused_ops.h LowRankMerge: W + scaling * B A in
  // fp32, rounded once to bf16) and runs the plain model on them, with no
  // LoRA GEMMs (146 of them per flan-t5-large evaluation). Rounds, beyond
  // the default path: each adapted weight once with its delta (where the
  // default path adds the fp32 delta to the fp32 projection output).
  // Default: on, unless LORAHUB_NO_MERGED_OBJECTIVE=1 (A/B).
  bool merge_single = MergeSingleFromEnv();
  // merge_single on CUDA: the decoder's sites merge beside the encoder,
  // which reads only the encoder's merged weights and runs on a branch of
  // high priority (cuda_graph.h StreamBranch); the decoder waits for both.
  // The same bits, in another order of kernels. Why: the merge is 233 us
  // of a 2.9 ms evaluation (H100), two thirds of it the decoder's sites.
  // On the evaluation's own stream beside the encoder, the merge's blocks,
  // queued first, held the encoder back until their last wave; at a lower
  // priority they fill what the encoder leaves, which is little (H100,
  // Kineto: 2,881 against 2,897 us). Default: on, unless
  // LORAHUB_NO_MERGE_BESIDE=1 (A/B).
  bool merge_beside_encoder = MergeBesideFromEnv();
  // merge_beside_encoder: the composition and the encoder's merge beside
  // the encoder too, a block's sites at a time on a low-priority branch,
  // each encoder block waiting for its own sites' only (then the decoder's
  // on that branch). The same bits. Why: the composition (69 us) and the
  // encoder's merge (80 us) held the encoder's first kernel back 164 us of
  // a 2,884 us evaluation (H100, seventy-ninth session's trace). Measured:
  // no gain (H100, eighty-third session: 2.918 against 2.883-2.892 ms, the
  // same answers). Default: off, unless LORAHUB_PIPELINED_MERGE=1 (A/B).
  bool pipelined_merge = PipelinedMergeFromEnv();
  // merge_beside_encoder: > 0, the merges beside the encoder run on at most
  // this many blocks of the device (fused_ops.h LowRankMerge's max_blocks;
  // the same bits); 0, a block a tile. Why: a block a tile (12,288 for
  // flan-t5-large's decoder sites) occupies every SM while it runs, so the
  // encoder's kernels may wait for its blocks to drain: the encoder took
  // 1,419 us beside it against 24 x 53.8 us a layer after it (H100,
  // seventy-ninth session's trace). Measured slower: a looping block holds
  // its SM for the whole merge, and the encoder's GEMMs lose those SMs
  // (H100, eighty-third session: 3.140-3.155 ms at 64, 2.953 at 132, against
  // 2.883-2.892). Default: 0, or LORAHUB_BESIDE_MERGE_BLOCKS=N (A/B).
  int beside_merge_blocks = BesideMergeBlocksFromEnv();

  static bool LoraBf16FromEnv();
  static bool MergeSingleFromEnv();
  static bool MergeBesideFromEnv();
  static bool PipelinedMergeFromEnv();
  static int BesideMergeBlocksFromEnv();
};

class ObjectiveRunner {
 public:
  // InvalidArgument on bad examples (as ScoreCandidates), num_candidates < 1,
  // or an empty stack. Internal on LibTorch errors (e.g. out of memory).
  static absl::StatusOr<std::unique_ptr<ObjectiveRunner>> Create(
      const T5Weights& weights, const ModuleStack& stack,
      const std::vector<Example>& examples, int64_t num_candidates,
      const ObjectiveRunnerOptions& options);

  ~ObjectiveRunner();
  ObjectiveRunner(const ObjectiveRunner&) = delete;
  ObjectiveRunner& operator=(const ObjectiveRunner&) = delete;

  // Losses of `count` candidates (1 <= count <= capacity()), their weights
  // row-major in `weights` (count * num_modules values, used as given: the
  // caller clips). A short batch is padded with zero weights and the padding
  // rows' losses dropped. Exactly ScoreCandidates' reference grouping.
  absl::StatusOr<std::vector<double>> Losses(const std::vector<double>& weights,
                                             int64_t count);

  int64_t capacity() const { return capacity_; }
  int num_modules() const { return num_modules_; }
  // Forward passes per Losses() call (row chunks of at most max_rows).
  int64_t chunks() const { return static_cast<int64_t>(chunks_.size()); }
  // How many of them encode their rows packed, without the padding: on
  // CUDA, passes of several candidates (a population; not one candidate,
  // merged or not) whose examples of 33 to 128 tokens pad
  // kPackedMinPadding or more of the batch (t5_forward.h PackedEncodePays).
  // Why: the encoder is about three quarters of a CMA-ES population's
  // kernel time, and it spent the padding's share of it on padding (H200,
  // the flan-t5-large fixture's 5 examples: population kernels 53.3 ->
  // 50.2 ms, CMA-ES +4-5%; one candidate's evaluation was 2-4% slower packed,
  // its GEMMs as long with fewer rows). LORAHUB_NO_PACKED_OBJECTIVE=1 (read
  // once): none (A/B).
  int64_t packed_chunks() const;
  // The fixed examples are packed once, so less padding pays than for
  // prompts (PackedEncodePays' default).
  static constexpr double kPackedMinPadding = 0.03;
  // True while calls replay a CUDA graph.
  bool graph_active() const { return graph_ != nullptr; }
  // Why no graph is used ("" while one is; "cpu device", "disabled", or the
  // capture error that made the runner fall back to eager).
  const std::string& graph_status() const { return graph_status_; }

 private:
  struct Chunk {
    at::Tensor ids, mask, labels, decoder_ids;  // [rows, *] on the device
    RowAdapters rows;                           // into bank_
    // The rows without their padding, where that pays (PackedEncodePays
    // with kPackedMinPadding): the encoder runs packed (EncodePacked).
    std::unique_ptr<PackedInput> packed;
    // Made once (t5_forward.h ComputePassBiases) instead of per pass:
    // undefined with LORAHUB_NO_PASS_BIASES=1 (A/B).
    std::unique_ptr<PassBiases> biases;
  };
  // pipelined_merge: some sites' composition and merge, queued on
  // merge_branch_. `factors` undefined: Compose() composes them with their
  // groups, and the stage only merges.
  struct MergeStage {
    at::Tensor factors;   // [N, n] bf16: the sites' A and B columns, in turn
    at::Tensor composed;  // [1, n] fp32: their composition, which `merge` reads
    std::unique_ptr<LowRankMerge> merge;
  };
  struct Group {  // sites whose composed factors have one shape
    std::vector<int> sites;  // base site indices
    int64_t r = 0, in = 0, out = 0;
    // [N, sites * (r*in + out*r)], fp32: A..., B... (bf16_lora: each B
    // times its site's scaling).
    at::Tensor factors;
    // Merging on CUDA: `factors` in bf16, which the composition reads
    // instead (ComposeFromBf16; LORAHUB_COMPOSE_FP32=1 keeps fp32, A/B).
    at::Tensor factors_bf16;
    // [C, sites * (r*in + out*r)], fp32: the composed factors, rewritten in
    // place by every evaluation (the merge's job table points into it).
    at::Tensor composed;
    // Elements of a site's A and B, and where site j's start in a row of
    // `factors` or `composed`.
    int64_t a_len() const { return r * in; }
    int64_t b_len() const { return out * r; }
    int64_t a_offset(int64_t j) const { return j * a_len(); }
    int64_t b_offset(int64_t j) const {
      return static_cast<int64_t>(sites.size()) * a_len() + j * b_len();
    }
  };

  ObjectiveRunner() = default;
  // w_dev_ -> each group's composed factors (one matmul per group), and
  // bank_'s views of them (unless merging).
  void Compose();
  // merge_single: merged_weights_, merge_ and (merge_beside_encoder)
  // decoder_merge_ and branch_, or (pipelined_merge) merge_stages_ and
  // merge_branch_ (after groups_ and scales_).
  absl::Status PrepareMerge(const ObjectiveRunnerOptions& options);
  // The merge of site j of `g` from the composed factors `a` [r*in] and `b`
  // [out*r] (fp32 views): merged_weights_'s copy = the base + scaling B A.
  LowRankUpdate SiteUpdate(const Group& g, int64_t j, const at::Tensor& a,
                           const at::Tensor& b) const;
  // The composition (where `own_composition`, else the groups') and the
  // merge of `sites` ((group, index in the group) pairs) as a MergeStage.
  MergeStage MakeMergeStage(const std::vector<std::pair<Group*, int64_t>>& sites,
                            bool own_composition, int max_blocks) const;
  // pipelined_merge: every stage's composition and merge, queued on
  // merge_branch_ (each encoder block's followed by its mark) or, without
  // it, here in turn. Throws c10::Error; the caller joins merge_branch_.
  void RunMergeStages();
  // Compose + forward + per-row sums into sums_ ([C*n] fp64). No host sync.
  absl::Status Evaluate();
  // One replay against one eager run on the same weights (at construction).
  absl::Status CheckGraphAgainstEager();

  const T5Weights* weights_ = nullptr;
  int num_modules_ = 0;
  int64_t capacity_ = 0;
  int64_t num_examples_ = 0;
  ScoreOptions score_;
  std::vector<int64_t> label_counts_;  // tokens per example
  std::vector<Group> groups_;
  bool bf16_lora_ = false;  // options.bf16_lora on a bf16 model
  std::vector<at::Tensor> scales_;  // per base site (undefined if unadapted)
  std::vector<double> scale_values_;  // the same, as host values
  AdapterBank bank_;
  // merge_single: the weights the forward pass runs on (the adapted sites'
  // own copies, rewritten by merge_ per evaluation), and the merge. Unset:
  // the forward runs on *weights_ with the bank's adapters.
  std::unique_ptr<T5Weights> merged_weights_;
  std::unique_ptr<LowRankMerge> merge_;
  // merge_beside_encoder: the decoder's sites (merge_ then holds the
  // encoder's), merged beside the encoder, which runs on branch_ (of high
  // priority).
  std::unique_ptr<LowRankMerge> decoder_merge_;
  std::unique_ptr<StreamBranch> branch_;
  // pipelined_merge: merge_ and decoder_merge_ unset; a stage an encoder
  // block (then mark `block` on merge_branch_), then the decoder's; the
  // encoder, on branch_, waits at each block for its mark. Without
  // merge_branch_ the stages run in turn before the encoder.
  std::vector<MergeStage> merge_stages_;
  std::unique_ptr<StreamBranch> merge_branch_;
  std::vector<Chunk> chunks_;
  at::Tensor w_host_;  // [C, N] fp32 staging (pinned on CUDA when possible)
  at::Tensor w_dev_;   // [C, N] fp32 on the device: the graph's input
  at::Tensor sums_;    // [C*n] fp64 on the device: the graph's output
  std::unique_ptr<CapturedGraph> graph_;
  std::string graph_status_;
};

}  // namespace lorahub::model

#endif  // LORAHUB_CORE_MODEL_OBJECTIVE_RUNNER_H_
