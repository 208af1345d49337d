#include "core/model/objective_runner.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/model/cuda_graph.h"
#include "core/model/fused_ops.h"
#include "core/model/query_side_cross.h"
#include "core/model/t5_forward.h"

namespace lorahub::model {
namespace {

// A graph failure is reported once per process (every runner then says why
// in graph_status()).
void LogFallbackOnce(const std::string& why) {
  static std::atomic<bool> logged{false};
  if (!logged.exchange(true)) {
    std::fprintf(stderr,
                 "lorahub: CUDA graph unavailable (%s); objective runs eagerly\n",
                 why.c_str());
  }
}

// The pass of rows `ex_idx` (examples, rows as given) packed without its
// padding (ObjectiveRunner::packed_chunks says when), or nullptr. Only passes
// of several candidates: one candidate's pass is bound by latency, not by its
// rows, and packing only adds kernels to it. `length`: the padded pass's,
// which the decoder reads the encoder output at.
std::unique_ptr<PackedInput> PackedPass(const T5Weights& weights,
                                        const std::vector<Example>& examples,
                                        const std::vector<int64_t>& ex_idx,
                                        const RowAdapters& rows, int64_t length) {
  static const bool off = EnvFlag("LORAHUB_NO_PACKED_OBJECTIVE");  // A/B
  const int64_t per_candidate = rows.rows_per_slot;
  if (off || per_candidate <= 0 || static_cast<int64_t>(ex_idx.size()) <= per_candidate) {
    return nullptr;
  }
  std::vector<std::vector<int64_t>> inputs;
  for (int64_t i : ex_idx) inputs.push_back(examples[i].input_ids);
  if (!PackedEncodePays(weights, inputs, rows, ObjectiveRunner::kPackedMinPadding)) return nullptr;
  auto packed = PackRows(inputs, weights.device);
  if (!packed.ok() || packed->rows.max_length != length) return nullptr;
  return std::make_unique<PackedInput>(*std::move(packed));
}

}  // namespace

bool ObjectiveRunnerOptions::LoraBf16FromEnv() {
  static const bool on = EnvFlag("LORAHUB_LORA_BF16");
  return on;
}

bool ObjectiveRunnerOptions::MergeSingleFromEnv() {
  static const bool off = EnvFlag("LORAHUB_NO_MERGED_OBJECTIVE");
  return !off;
}

bool ObjectiveRunnerOptions::MergeBesideFromEnv() {
  static const bool off = EnvFlag("LORAHUB_NO_MERGE_BESIDE");
  return !off;
}

bool ObjectiveRunnerOptions::PipelinedMergeFromEnv() {
  static const bool on = EnvFlag("LORAHUB_PIPELINED_MERGE");
  return on;
}

int ObjectiveRunnerOptions::BesideMergeBlocksFromEnv() {
  static const int blocks = static_cast<int>(EnvCount("LORAHUB_BESIDE_MERGE_BLOCKS", 0));
  return blocks;
}

ObjectiveRunner::~ObjectiveRunner() = default;

absl::StatusOr<std::unique_ptr<ObjectiveRunner>> ObjectiveRunner::Create(
    const T5Weights& weights, const ModuleStack& stack,
    const std::vector<Example>& examples, int64_t num_candidates,
    const ObjectiveRunnerOptions& options) {
  absl::Status s = ValidateExamples(examples, weights.config.vocab_size);
  if (!s.ok()) return s;
  if (num_candidates < 1 || num_candidates > (1 << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("candidates per call must be in [1, 1048576], got ",
                     num_candidates));
  }
  if (stack.num_modules < 1 || stack.sites.empty()) {
    return absl::InvalidArgumentError("objective runner: no modules to compose");
  }
  if (options.beside_merge_blocks < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "objective runner: beside_merge_blocks must not be negative, got ",
        options.beside_merge_blocks));
  }
  std::unique_ptr<ObjectiveRunner> run(new ObjectiveRunner());
  run->weights_ = &weights;
  run->num_modules_ = stack.num_modules;
  run->capacity_ = num_candidates;
  run->num_examples_ = static_cast<int64_t>(examples.size());
  run->score_ = options.score;
  run->bf16_lora_ = options.bf16_lora && weights.dtype == at::kBFloat16;
  for (const Example& e : examples) {
    run->label_counts_.push_back(static_cast<int64_t>(e.label_ids.size()));
  }
  const int64_t C = num_candidates;
  const int64_t n = run->num_examples_;
  const int64_t N = stack.num_modules;
  const c10::Device device = weights.device;
  try {
    auto fp32 = at::TensorOptions().dtype(at::kFloat).device(device);
    for (size_t i = 0; i < stack.sites.size(); ++i) {
      const at::Tensor& a = stack.a[i];  // [N, r, in]
      const at::Tensor& b = stack.b[i];  // [N, out, r]
      if (a.dim() != 3 || b.dim() != 3 || a.size(0) != N || b.size(0) != N) {
        return absl::InvalidArgumentError("objective runner: malformed stack");
      }
    }
    run->scales_.resize(stack.num_base_sites);
    run->scale_values_.resize(stack.num_base_sites);
    // The stack's groups already have the layout the forward pass wants (every A, then every
    // B; the decoder's cross k/v last, so the composed A of sites that read the same input
    // lie side by side and share one down-projection GEMM): share them, except that
    // bf16_lora folds each site's scaling into its B (the delta's GEMMs then run with alpha
    // 1, and the composed bf16 B is B * scaling rounded once), which needs a copy.
    for (const ModuleStack::Group& sg : stack.groups) {
      Group g;
      g.r = sg.r;
      g.in = sg.in;
      g.out = sg.out;
      g.factors = sg.factors.to(fp32, /*non_blocking=*/false, /*copy=*/run->bf16_lora_);
      const int64_t k = static_cast<int64_t>(sg.entries.size());
      const int64_t a_len = g.r * g.in;
      const int64_t b_len = g.out * g.r;
      for (int64_t j = 0; j < k; ++j) {
        const size_t i = sg.entries[j];
        g.sites.push_back(stack.sites[i]);
        double scale = stack.scaling[i];
        if (run->bf16_lora_) {
          g.factors.narrow(1, k * a_len + j * b_len, b_len).mul_(scale);
          scale = 1.0;
        }
        run->scales_[stack.sites[i]] = at::full({C, 1, 1}, scale, fp32);
        run->scale_values_[stack.sites[i]] = scale;
      }
      g.composed = at::zeros({C, g.factors.size(1)}, fp32);
      run->groups_.push_back(std::move(g));
    }
    if (options.merge_single && C == 1 && weights.dtype == at::kBFloat16 && !run->bf16_lora_) {
      absl::Status merging = run->PrepareMerge(options);
      if (!merging.ok()) return merging;
    }
    run->bank_.num_slots = static_cast<int>(C);
    run->bank_.sites.resize(stack.num_base_sites);

    // Static inputs of every row chunk, as ScoreCandidates builds them.
    at::Tensor ids, mask, labels, label_mask;
    PadExamples(examples, false, weights.config.pad_token_id, ids, mask);
    PadExamples(examples, true, weights.config.pad_token_id, labels, label_mask);
    labels = labels.masked_fill(label_mask == 0, kIgnoredLabel);
    const int64_t total = C * n;
    const int64_t max_rows = RowsPerPass(options.score, examples, weights.device.is_cuda());
    static const bool per_pass_biases = EnvFlag("LORAHUB_NO_PASS_BIASES");  // A/B
    static const bool per_pass_twice = EnvFlag("LORAHUB_PER_PASS_CROSS_TWICE");  // A/B
    // The query-side cross weights, one copy for every chunk: per-row passes
    // read the base weights, which stay as they are (a merge rewrites the
    // merged weights in place). The first chunk is the largest.
    PassBiases fixed_weights;
    if (!per_pass_biases && !per_pass_twice && run->merged_weights_ == nullptr) {
      internal::PrepareQuerySideWeights(weights, std::min(max_rows, total) * labels.size(1),
                                        &fixed_weights);
    }
    for (int64_t start = 0; start < total; start += max_rows) {
      const int64_t rows_here = std::min(max_rows, total - start);
      std::vector<int64_t> ex_idx(rows_here), slots(rows_here);
      for (int64_t r = 0; r < rows_here; ++r) {
        ex_idx[r] = (start + r) % n;
        slots[r] = (start + r) / n;
      }
      Chunk chunk;
      if (run->merged_weights_ == nullptr) {  // else they carry the adapter
        auto rows = MakeRowAdapters(weights, &run->bank_, slots);
        if (!rows.ok()) return rows.status();
        chunk.rows = *std::move(rows);
      }
      at::Tensor index = at::tensor(ex_idx, at::kLong);
      chunk.ids = ids.index_select(0, index).to(device);
      chunk.mask = mask.index_select(0, index).to(device);
      chunk.labels = labels.index_select(0, index).to(device);
      chunk.decoder_ids = ShiftRight(chunk.labels, weights.config.decoder_start_token_id,
                                     weights.config.pad_token_id);
      chunk.packed = PackedPass(weights, examples, ex_idx, chunk.rows, chunk.ids.size(1));
      if (!per_pass_biases) {
        auto biases = ComputePassBiases(weights, chunk.mask, chunk.decoder_ids.size(1));
        if (!biases.ok()) return biases.status();
        chunk.biases = std::make_unique<PassBiases>(*std::move(biases));
        chunk.biases->cross_keys_twice = fixed_weights.cross_keys_twice;
        chunk.biases->cross_values_twice = fixed_weights.cross_values_twice;
      }
      run->chunks_.push_back(std::move(chunk));
    }

    // Weights staging: pinned host memory makes the per-call copy a plain DMA.
    if (device.is_cpu()) {
      run->w_host_ = at::zeros({C, N}, at::kFloat);
      run->w_dev_ = run->w_host_;
    } else {
      try {
        run->w_host_ = at::zeros({C, N}, at::TensorOptions().dtype(at::kFloat).pinned_memory(true));
      } catch (const c10::Error&) {
        run->w_host_ = at::zeros({C, N}, at::kFloat);
      }
      run->w_dev_ = at::zeros({C, N}, fp32);
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("objective runner: ", e.what_without_backtrace()));
  }

  if (!device.is_cuda()) {
    run->graph_status_ = "not a CUDA device";
  } else if (!options.cuda_graph) {
    run->graph_status_ = "disabled";
  } else {
    ObjectiveRunner* self = run.get();
    const ScopedCaptureTally tally;
    auto graph = CaptureCudaGraph(
        device, [self]() { return self->Evaluate(); }, /*warmup=*/2,
        [self]() {
          self->sums_ = at::Tensor();
          for (SiteBank& sb : self->bank_.sites) sb.a = sb.b = sb.scale = at::Tensor();
        });
    if (graph.ok()) {
      run->graph_ = *std::move(graph);
      absl::Status same = run->CheckGraphAgainstEager();
      if (!same.ok()) {
        run->graph_.reset();
        run->graph_status_ = std::string(same.message());
        LogFallbackOnce(run->graph_status_);
      }
    } else {
      run->graph_status_ = std::string(graph.status().message());
      LogFallbackOnce(run->graph_status_);
      // An eager run must work, or the runner is unusable.
      absl::Status eager = run->Evaluate();
      if (!eager.ok()) return eager;
    }
  }
  return run;
}

absl::Status ObjectiveRunner::CheckGraphAgainstEager() {
  try {
    // Weights with every candidate and module different (a graph that ignored its input
    // buffer, or mixed up candidates, would show).
    float* w = w_host_.data_ptr<float>();
    for (int64_t i = 0; i < w_host_.numel(); ++i) {
      w[i] = 0.05f * static_cast<float>((i * 7) % 23) - 0.5f;
    }
    w_dev_.copy_(w_host_);
    const at::Tensor graph_out = sums_;  // the captured output buffer
    absl::Status s = graph_->Replay();
    if (!s.ok()) return s;
    const at::Tensor from_graph = graph_out.to(at::kCPU).clone();
    s = Evaluate();  // rebinds sums_ and the bank views; the graph keeps its own
    const at::Tensor eager = s.ok() ? sums_.to(at::kCPU) : at::Tensor();
    sums_ = graph_out;
    if (!s.ok()) return s;
    if (!at::allclose(from_graph, eager, /*rtol=*/1e-3, /*atol=*/1e-5)) {
      return absl::InternalError(absl::StrCat(
          "CUDA graph result differs from eager (max abs diff ",
          (from_graph - eager).abs().max().item<double>(), ")"));
    }
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("CUDA graph check: ", e.what_without_backtrace()));
  }
}

int64_t ObjectiveRunner::packed_chunks() const {
  int64_t n = 0;
  for (const Chunk& c : chunks_) n += c.packed != nullptr ? 1 : 0;
  return n;
}

absl::Status ObjectiveRunner::PrepareMerge(const ObjectiveRunnerOptions& options) {
  std::set<int> sites;
  for (const Group& g : groups_) sites.insert(g.sites.begin(), g.sites.end());
  auto copy = CopyAdaptedWeights(*weights_, sites);
  if (!copy.ok()) return copy.status();
  merged_weights_ = std::make_unique<T5Weights>(*std::move(copy));
  if (options.merge_beside_encoder) {
    branch_ = MakeStreamBranch(weights_->device, /*high_priority=*/true);
  }
  const int layers = static_cast<int>(weights_->config.num_layers);
  if (branch_ != nullptr && options.pipelined_merge) {
    merge_branch_ = MakeStreamBranch(weights_->device, /*high_priority=*/false, layers);
  }
  const int64_t encoder_sites = static_cast<int64_t>(layers) * kSitesPerBlock;
  // Only where ComposeFromBf16 runs: elsewhere the copy would never be read.
  const bool bf16_pool = weights_->device.is_cuda() && FusedKernelsEnabled() &&
                         !EnvFlag("LORAHUB_COMPOSE_FP32");
  std::vector<LowRankUpdate> updates, decoder_updates;
  // pipelined: the sites of each encoder block's stage, then the decoder's
  // (without a branch, a CPU's or where none could be made, the stages run
  // one after another before the encoder).
  const bool pipelined = options.pipelined_merge;
  std::vector<std::vector<std::pair<Group*, int64_t>>> stage_sites(pipelined ? layers + 1 : 0);
  for (Group& g : groups_) {
    if (bf16_pool) g.factors_bf16 = g.factors.to(at::kBFloat16);
    const at::Tensor composed = g.composed[0];  // the one candidate
    for (int64_t j = 0; j < static_cast<int64_t>(g.sites.size()); ++j) {
      const int site = g.sites[j];
      if (pipelined) {
        stage_sites[std::min(site / kSitesPerBlock, layers)].emplace_back(&g, j);
        continue;
      }
      (branch_ != nullptr && site >= encoder_sites ? decoder_updates : updates)
          .push_back(SiteUpdate(g, j, composed.narrow(0, g.a_offset(j), g.a_len()),
                                composed.narrow(0, g.b_offset(j), g.b_len())));
    }
  }
  if (pipelined) {
    // The stages compose their own sites from the bf16 pool; without it the
    // groups compose up front (Compose) and the stages only merge.
    for (const auto& stage : stage_sites) {
      merge_stages_.push_back(MakeMergeStage(stage, bf16_pool, options.beside_merge_blocks));
    }
    if (bf16_pool) {
      for (Group& g : groups_) g.factors_bf16 = at::Tensor();  // the stages hold theirs
    }
    return absl::OkStatus();
  }
  merge_ = std::make_unique<LowRankMerge>(std::move(updates));
  if (!decoder_updates.empty()) {
    decoder_merge_ =
        std::make_unique<LowRankMerge>(std::move(decoder_updates), options.beside_merge_blocks);
  }
  return absl::OkStatus();
}

LowRankUpdate ObjectiveRunner::SiteUpdate(const Group& g, int64_t j, const at::Tensor& a,
                                          const at::Tensor& b) const {
  const int site = g.sites[j];
  LowRankUpdate u;
  u.w = SiteLinear(*weights_, site)->weight;
  u.out = SiteLinear(*merged_weights_, site)->weight;
  u.a = a.view({g.r, g.in});
  u.b = b.view({g.out, g.r});
  u.scale = static_cast<float>(scale_values_[site]);
  return u;
}

ObjectiveRunner::MergeStage ObjectiveRunner::MakeMergeStage(
    const std::vector<std::pair<Group*, int64_t>>& sites, bool own_composition,
    int max_blocks) const {
  MergeStage stage;
  if (own_composition && !sites.empty()) {
    // The stage's columns of the pool: each site's A, then its B.
    std::vector<at::Tensor> columns;
    for (const auto& [g, j] : sites) {
      columns.push_back(g->factors_bf16.narrow(1, g->a_offset(j), g->a_len()));
      columns.push_back(g->factors_bf16.narrow(1, g->b_offset(j), g->b_len()));
    }
    stage.factors = at::cat(columns, 1).contiguous();
    stage.composed = at::zeros({1, stage.factors.size(1)},
                               at::TensorOptions().dtype(at::kFloat).device(weights_->device));
  }
  std::vector<LowRankUpdate> updates;
  int64_t offset = 0;  // in stage.composed
  for (const auto& [g, j] : sites) {
    if (stage.composed.defined()) {
      const at::Tensor composed = stage.composed[0];
      updates.push_back(SiteUpdate(*g, j, composed.narrow(0, offset, g->a_len()),
                                   composed.narrow(0, offset + g->a_len(), g->b_len())));
      offset += g->a_len() + g->b_len();
    } else {
      const at::Tensor composed = g->composed[0];
      updates.push_back(SiteUpdate(*g, j, composed.narrow(0, g->a_offset(j), g->a_len()),
                                   composed.narrow(0, g->b_offset(j), g->b_len())));
    }
  }
  stage.merge = std::make_unique<LowRankMerge>(std::move(updates), max_blocks);
  return stage;
}

void ObjectiveRunner::Compose() {
  // pipelined_merge with the bf16 pool: the merge stages compose.
  if (std::any_of(merge_stages_.begin(), merge_stages_.end(),
                  [](const MergeStage& stage) { return stage.factors.defined(); })) {
    return;
  }
  for (const Group& g : groups_) {
    // [C, N] x [N, k * X] -> [C, k * X]: all candidates, all sites of the group.
    at::Tensor out = g.composed;  // a handle: mm_out writes its storage
    // One candidate: the merged objective's bf16 pool, or cuBLAS's gemv,
    // near HBM's rate already. A population: ComposeRows (cuBLAS took a
    // SIMT GEMM for K = N modules, bound by the fp32 factors it writes).
    const bool fused = capacity_ > 1 ? ComposeRows(w_dev_, g.factors, out)
                                     : g.factors_bf16.defined() &&
                                           ComposeFromBf16(w_dev_, g.factors_bf16, out);
    if (!fused) at::mm_out(out, w_dev_, g.factors);
    if (merged_weights_ != nullptr) continue;  // the merges read g.composed
    // Composed in fp32, rounded once for all sites of the group.
    at::Tensor composed = bf16_lora_ ? g.composed.to(at::kBFloat16) : g.composed;
    const int64_t C = capacity_;
    for (int64_t j = 0; j < static_cast<int64_t>(g.sites.size()); ++j) {
      SiteBank& sb = bank_.sites[g.sites[j]];
      sb.a = composed.narrow(1, g.a_offset(j), g.a_len()).view({C, g.r, g.in});
      sb.b = composed.narrow(1, g.b_offset(j), g.b_len()).view({C, g.out, g.r});
      sb.scale = scales_[g.sites[j]];
      sb.common_scale = scale_values_[g.sites[j]];
    }
  }
}

absl::Status ObjectiveRunner::Evaluate() {
  try {
    Compose();
    if (merge_ != nullptr) merge_->Run();
    // merge_beside_encoder: the first pass's encoder on branch_, the
    // decoder's merge beside it (pipelined: every merge, on merge_branch_),
    // joined before anything else reads the merged weights (or on the way
    // out of an error).
    struct Joined {
      std::vector<StreamBranch*> branches;
      ~Joined() {
        for (StreamBranch* branch : branches) {
          branch->Close();
          branch->Join();
        }
      }
    } joined;
    if (merge_branch_ != nullptr) joined.branches.push_back(merge_branch_.get());
    RunMergeStages();
    // The encoder waits at each block for that block's merge only.
    std::function<void(int64_t)> wait_for_block;
    if (merge_branch_ != nullptr) {
      wait_for_block = [this](int64_t block) {
        merge_branch_->WaitForMark(static_cast<int>(block));
      };
    }
    const T5Weights& weights = merged_weights_ != nullptr ? *merged_weights_ : *weights_;
    std::vector<at::Tensor> parts;
    parts.reserve(chunks_.size());
    for (const Chunk& chunk : chunks_) {
      const bool beside =
          (decoder_merge_ != nullptr || merge_branch_ != nullptr) && parts.empty();
      if (beside) {
        branch_->Open();
        joined.branches.push_back(branch_.get());
      }
      absl::StatusOr<EncoderOutput> enc;
      if (chunk.packed != nullptr) {
        // EncodePacked takes no hook: every block's merge first.
        if (beside && wait_for_block) wait_for_block(weights.config.num_layers - 1);
        enc = EncodePacked(weights, *chunk.packed, chunk.rows);
      } else {
        enc = Encode(weights, chunk.ids, chunk.mask, chunk.rows, chunk.biases.get(),
                     beside ? wait_for_block : nullptr);
      }
      if (!enc.ok()) return enc.status();
      if (beside) {
        branch_->Close();
        if (merge_branch_ == nullptr) decoder_merge_->Run();
        for (const at::Tensor* t : {&enc->hidden, &enc->mask_bias, &enc->hidden_full}) {
          branch_->RecordUse(*t);
        }
        for (StreamBranch* branch : joined.branches) branch->Join();
        joined.branches.clear();
      }
      // Per-row summed token cross-entropy, as ScoreCandidates computes it.
      auto sums = DecodeFullNll(weights, chunk.decoder_ids, *enc, chunk.rows,
                                chunk.labels, chunk.biases.get());
      if (!sums.ok()) return sums.status();
      parts.push_back(sums->to(at::kDouble));
    }
    sums_ = parts.size() == 1 ? parts[0] : at::cat(parts);
    return absl::OkStatus();
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("objective runner: ", e.what_without_backtrace()));
  }
}

void ObjectiveRunner::RunMergeStages() {
  if (merge_stages_.empty()) return;
  if (merge_branch_ != nullptr) merge_branch_->Open();
  const int layers = static_cast<int>(weights_->config.num_layers);
  for (size_t i = 0; i < merge_stages_.size(); ++i) {
    MergeStage& stage = merge_stages_[i];
    if (stage.factors.defined() && !ComposeFromBf16(w_dev_, stage.factors, stage.composed)) {
      at::mm_out(stage.composed, w_dev_, stage.factors.to(at::kFloat));
    }
    stage.merge->Run();
    const int block = static_cast<int>(i);
    if (merge_branch_ != nullptr && block < layers) merge_branch_->Mark(block);
  }
  if (merge_branch_ != nullptr) merge_branch_->Close();
}

absl::StatusOr<std::vector<double>> ObjectiveRunner::Losses(
    const std::vector<double>& weights, int64_t count) {
  const int64_t N = num_modules_;
  if (count < 1 || count > capacity_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "objective runner: ", count, " candidates for a capacity of ", capacity_));
  }
  if (static_cast<int64_t>(weights.size()) != count * N) {
    return absl::InvalidArgumentError(absl::StrCat(
        "objective runner: ", weights.size(), " weights for ", count,
        " candidates of ", N, " modules"));
  }
  at::Tensor host;
  try {
    float* w = w_host_.data_ptr<float>();
    for (int64_t i = 0; i < capacity_ * N; ++i) {
      w[i] = i < count * N ? static_cast<float>(weights[i]) : 0.f;
    }
    if (!w_dev_.is_same(w_host_)) w_dev_.copy_(w_host_, /*non_blocking=*/true);
    bool replayed = false;
    if (graph_ != nullptr) {
      absl::Status s = graph_->Replay();
      if (s.ok()) {
        replayed = true;
      } else {  // eager from now on
        graph_.reset();
        graph_status_ = std::string(s.message());
        LogFallbackOnce(graph_status_);
      }
    }
    if (!replayed) {
      absl::Status s = Evaluate();
      if (!s.ok()) return s;
    }
    // The one device -> host transfer (and the call's only synchronisation).
    host = sums_.is_cpu() ? sums_ : sums_.to(at::kCPU);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("objective runner: ", e.what_without_backtrace()));
  }
  const int64_t n = num_examples_;
  const double* sa = host.data_ptr<double>();
  const int64_t bs =
      score_.batch_size <= 0 ? n : std::min<int64_t>(n, score_.batch_size);
  std::vector<double> losses(count, 0.0);
  for (int64_t c = 0; c < count; ++c) {
    double total_loss = 0;
    for (int64_t g = 0; g < n; g += bs) {
      double sum = 0;
      int64_t tokens = 0;
      for (int64_t e = g; e < std::min(n, g + bs); ++e) {
        sum += sa[c * n + e];
        tokens += label_counts_[e];
      }
      total_loss += sum / static_cast<double>(tokens);
    }
    losses[c] = total_loss / static_cast<double>(n);
  }
  return losses;
}

}  // namespace lorahub::model
