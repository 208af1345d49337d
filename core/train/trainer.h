// The training loop shared by LoRA and full-parameter training: seeded
// shuffling into padded batches, AdamW, a warmup + decay learning-rate
// schedule, gradient clipping, progress reporting and cancellation.
//
// Determinism: the example order comes from our own Fisher-Yates over
// std::mt19937_64(seed) (the standard distributions differ between
// standard libraries); dropout draws from LibTorch's default generator,
// which RunTraining seeds with torch::manual_seed(seed). On the CPU the
// same inputs and seed give the same loss curve.
//
// Thread-safety: RunTraining blocks the calling thread for the whole run
// and reseeds LibTorch's global generator; do not run two at once when
// reproducibility matters.
#ifndef LORAHUB_CORE_TRAIN_TRAINER_H_
#define LORAHUB_CORE_TRAIN_TRAINER_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "absl/status/statusor.h"
#include "core/model/scorer.h"
#include "core/train/train_forward.h"

namespace lorahub::train {

enum class Schedule { kLinear, kCosine, kConstant };

struct TrainOptions {
  int epochs = 3;              // passes over the data; >= 1
  int64_t max_steps = 0;       // > 0: stop after this many optimizer steps
  int batch_size = 32;         // examples per step; >= 1
  double lr = 1e-3;            // peak learning rate; > 0
  double weight_decay = 0.0;   // AdamW decoupled weight decay; >= 0
  double warmup_ratio = 0.06;  // fraction of the steps of linear warmup
  Schedule schedule = Schedule::kLinear;  // decay after warmup
  double max_grad_norm = 1.0;  // global L2 clip; 0 disables
  uint64_t seed = 0;           // shuffling and dropout
  c10::Device device = c10::Device(c10::kCPU);  // where batches are built
  int64_t pad_token_id = 0;
};

// Parses "linear" | "cosine" | "constant".
absl::StatusOr<Schedule> ParseSchedule(const std::string& text);

// InvalidArgument naming the option for out-of-range values.
absl::Status ValidateTrainOptions(const TrainOptions& options);

// The learning rate of optimizer step `step` (0-based) out of `total`:
// lr * (step + 1) / warmup during the warmup steps, then linear decay to
// lr / (total - warmup) at the last step, or cosine decay towards 0, or
// constant.
double LearningRate(const TrainOptions& options, int64_t step, int64_t total);

// Number of optimizer steps for `num_examples` examples.
int64_t TotalSteps(const TrainOptions& options, int64_t num_examples);

// Pads examples[indices] into a batch on `device` (see Batch).
absl::StatusOr<Batch> MakeBatch(const std::vector<model::Example>& examples,
                                const std::vector<int64_t>& indices,
                                int64_t pad_token_id, c10::Device device);

// InvalidArgument (naming the example number, 1-based) for an empty input
// or output, or an id outside [0, vocab_size); also for no examples.
absl::Status ValidateExamples(const std::vector<model::Example>& examples,
                              int64_t vocab_size);

struct StepInfo {
  int64_t step = 0;         // 1-based optimizer step just taken
  int64_t total_steps = 0;
  int epoch = 0;            // 1-based
  double loss = 0;          // this step's loss
  double lr = 0;            // learning rate used for this step
  double elapsed_seconds = 0;
};
// Called after every step on the training thread; returning false cancels
// the run (RunTraining then returns Cancelled).
using ProgressFn = std::function<bool(const StepInfo&)>;

struct TrainResult {
  std::vector<double> step_losses;  // one per optimizer step
  double train_loss = 0;   // mean of all step losses (transformers' train_loss)
  double final_loss = 0;   // mean over the last epoch's worth of steps
  int64_t steps = 0;
  double seconds = 0;
};

// Computes the loss of a batch (a differentiable scalar).
using BatchLossFn = std::function<absl::StatusOr<at::Tensor>(const Batch&)>;

// Trains `params` (leaf tensors with requires_grad) with AdamW to minimise
// `loss_fn` over `examples`. The parameters are updated in place.
// `no_decay` are further parameters exempt from weight decay (norm weights,
// as transformers' Trainer exempts them).
absl::StatusOr<TrainResult> RunTraining(
    const std::vector<at::Tensor>& params,
    const std::vector<model::Example>& examples, const BatchLossFn& loss_fn,
    const TrainOptions& options, const ProgressFn& progress,
    const std::vector<at::Tensor>& no_decay = {});

}  // namespace lorahub::train

#endif  // LORAHUB_CORE_TRAIN_TRAINER_H_
