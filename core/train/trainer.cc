#include "core/train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <random>

#include <ATen/ATen.h>
#include <torch/optim/adamw.h>
#include <torch/utils.h>

#include "absl/strings/str_cat.h"
#include "core/model/t5_forward.h"

namespace lorahub::train {

absl::StatusOr<Schedule> ParseSchedule(const std::string& text) {
  if (text == "linear") return Schedule::kLinear;
  if (text == "cosine") return Schedule::kCosine;
  if (text == "constant") return Schedule::kConstant;
  return absl::InvalidArgumentError(absl::StrCat(
      "bad schedule '", text, "' (want linear, cosine or constant)"));
}

absl::Status ValidateTrainOptions(const TrainOptions& o) {
  if (o.epochs < 1) return absl::InvalidArgumentError("epochs must be >= 1");
  if (o.max_steps < 0) {
    return absl::InvalidArgumentError("max-steps must be >= 0");
  }
  if (o.batch_size < 1) {
    return absl::InvalidArgumentError("batch-size must be >= 1");
  }
  if (!(o.lr > 0) || !std::isfinite(o.lr)) {
    return absl::InvalidArgumentError("lr must be a positive number");
  }
  if (!(o.weight_decay >= 0) || !std::isfinite(o.weight_decay)) {
    return absl::InvalidArgumentError("weight-decay must be >= 0");
  }
  if (!(o.warmup_ratio >= 0 && o.warmup_ratio < 1)) {
    return absl::InvalidArgumentError("warmup-ratio must be in [0, 1)");
  }
  if (!(o.max_grad_norm >= 0) || !std::isfinite(o.max_grad_norm)) {
    return absl::InvalidArgumentError("max-grad-norm must be >= 0");
  }
  return absl::OkStatus();
}

int64_t TotalSteps(const TrainOptions& o, int64_t num_examples) {
  const int64_t per_epoch = (num_examples + o.batch_size - 1) / o.batch_size;
  int64_t total = per_epoch * o.epochs;
  if (o.max_steps > 0) total = std::min(total, o.max_steps);
  return total;
}

double LearningRate(const TrainOptions& o, int64_t step, int64_t total) {
  const int64_t warmup =
      static_cast<int64_t>(std::floor(o.warmup_ratio * static_cast<double>(total)));
  if (step < warmup) {
    return o.lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  }
  const double span = static_cast<double>(std::max<int64_t>(1, total - warmup));
  const double done = static_cast<double>(step - warmup);
  switch (o.schedule) {
    case Schedule::kConstant:
      return o.lr;
    case Schedule::kCosine:
      return o.lr * 0.5 * (1.0 + std::cos(M_PI * done / span));
    case Schedule::kLinear:
    default:
      return o.lr * std::max(0.0, (span - done) / span);
  }
}

absl::Status ValidateExamples(const std::vector<model::Example>& examples,
                              int64_t vocab_size) {
  if (examples.empty()) return absl::InvalidArgumentError("no examples");
  for (size_t i = 0; i < examples.size(); ++i) {
    const model::Example& e = examples[i];
    if (e.input_ids.empty() || e.label_ids.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("example ", i + 1, ": empty input or output"));
    }
    for (const auto* ids : {&e.input_ids, &e.label_ids}) {
      for (int64_t id : *ids) {
        if (id < 0 || id >= vocab_size) {
          return absl::InvalidArgumentError(absl::StrCat(
              "example ", i + 1, ": token id ", id, " outside [0, ",
              vocab_size, ")"));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Batch> MakeBatch(const std::vector<model::Example>& examples,
                                const std::vector<int64_t>& indices,
                                int64_t pad_token_id, c10::Device device) {
  if (indices.empty()) return absl::InvalidArgumentError("empty batch");
  size_t S = 0, T = 0;
  for (int64_t i : indices) {
    if (i < 0 || i >= static_cast<int64_t>(examples.size())) {
      return absl::InvalidArgumentError("batch index out of range");
    }
    S = std::max(S, examples[i].input_ids.size());
    T = std::max(T, examples[i].label_ids.size());
  }
  if (S == 0 || T == 0) {
    return absl::InvalidArgumentError("batch with an empty input or output");
  }
  const int64_t B = static_cast<int64_t>(indices.size());
  try {
    auto opts = at::TensorOptions().dtype(at::kLong);
    at::Tensor ids = at::full({B, static_cast<int64_t>(S)}, pad_token_id, opts);
    at::Tensor mask = at::zeros({B, static_cast<int64_t>(S)}, opts);
    at::Tensor labels = at::full({B, static_cast<int64_t>(T)}, -100, opts);
    auto ids_a = ids.accessor<int64_t, 2>();
    auto mask_a = mask.accessor<int64_t, 2>();
    auto labels_a = labels.accessor<int64_t, 2>();
    for (int64_t r = 0; r < B; ++r) {
      const model::Example& e = examples[indices[r]];
      for (size_t j = 0; j < e.input_ids.size(); ++j) {
        ids_a[r][j] = e.input_ids[j];
        mask_a[r][j] = 1;
      }
      for (size_t j = 0; j < e.label_ids.size(); ++j) {
        labels_a[r][j] = e.label_ids[j];
      }
    }
    Batch batch;
    batch.input_ids = ids.to(device);
    batch.attention_mask = mask.to(device);
    batch.labels = labels.to(device);
    batch.decoder_ids = model::ShiftRight(batch.labels, pad_token_id,
                                          pad_token_id);
    return batch;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("building a batch: ", e.what_without_backtrace()));
  }
}

namespace {

// torch.nn.utils.clip_grad_norm_ (L2, eps 1e-6), without torch/nn headers.
void ClipGradNorm(const std::vector<at::Tensor>& params, double max_norm) {
  std::vector<at::Tensor> norms;
  for (const at::Tensor& p : params) {
    if (p.grad().defined()) norms.push_back(p.grad().detach().norm(2));
  }
  if (norms.empty()) return;
  const double total = at::stack(norms).norm(2).item<double>();
  const double coef = max_norm / (total + 1e-6);
  if (coef >= 1.0) return;
  for (const at::Tensor& p : params) {
    if (p.grad().defined()) p.grad().detach().mul_(coef);
  }
}

// Fisher-Yates with our own bounded draw, so the order is the same with any
// standard library.
void Shuffle(std::vector<int64_t>& order, std::mt19937_64& rng) {
  for (size_t i = order.size(); i > 1; --i) {
    const uint64_t j = rng() % i;
    std::swap(order[i - 1], order[j]);
  }
}

absl::StatusOr<TrainResult> RunTrainingImpl(
    const std::vector<at::Tensor>& params,
    const std::vector<model::Example>& examples, const BatchLossFn& loss_fn,
    const TrainOptions& options, const ProgressFn& progress,
    const std::vector<at::Tensor>& no_decay) {
  torch::manual_seed(options.seed);
  std::mt19937_64 rng(options.seed);
  const int64_t n = static_cast<int64_t>(examples.size());
  const int64_t total = TotalSteps(options, n);
  const int64_t per_epoch = (n + options.batch_size - 1) / options.batch_size;
  auto adamw = [&](double decay) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(options.lr)
            .betas({0.9, 0.999})
            .eps(1e-8)
            .weight_decay(decay));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(params, adamw(options.weight_decay));
  if (!no_decay.empty()) groups.emplace_back(no_decay, adamw(0.0));
  torch::optim::AdamW optimizer(groups, *adamw(options.weight_decay));
  std::vector<at::Tensor> all = params;
  all.insert(all.end(), no_decay.begin(), no_decay.end());
  const auto start = std::chrono::steady_clock::now();
  TrainResult result;
  std::vector<int64_t> order(n);
  int64_t step = 0;
  for (int epoch = 1; step < total; ++epoch) {
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    Shuffle(order, rng);
    for (int64_t first = 0; first < n && step < total;
         first += options.batch_size) {
      std::vector<int64_t> indices(
          order.begin() + first,
          order.begin() + std::min(n, first + options.batch_size));
      auto batch = MakeBatch(examples, indices, options.pad_token_id,
                             options.device);
      if (!batch.ok()) return batch.status();
      const double lr = LearningRate(options, step, total);
      for (auto& group : optimizer.param_groups()) {
        static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
      }
      optimizer.zero_grad();
      auto loss = loss_fn(*batch);
      if (!loss.ok()) return loss.status();
      const double value = loss->item<double>();
      if (!std::isfinite(value)) {
        return absl::InternalError(absl::StrCat(
            "loss is not finite at step ", step + 1, " (lower --lr?)"));
      }
      loss->backward();
      if (options.max_grad_norm > 0) {
        ClipGradNorm(all, options.max_grad_norm);
      }
      optimizer.step();
      ++step;
      result.step_losses.push_back(value);
      if (progress) {
        StepInfo info;
        info.step = step;
        info.total_steps = total;
        info.epoch = epoch;
        info.loss = value;
        info.lr = lr;
        info.elapsed_seconds = std::chrono::duration<double>(
                                   std::chrono::steady_clock::now() - start)
                                   .count();
        if (!progress(info)) {
          return absl::CancelledError(
              absl::StrCat("training cancelled at step ", step));
        }
      }
    }
  }
  result.steps = step;
  result.seconds = std::chrono::duration<double>(
                       std::chrono::steady_clock::now() - start)
                       .count();
  double sum = 0;
  for (double l : result.step_losses) sum += l;
  result.train_loss = step > 0 ? sum / static_cast<double>(step) : 0;
  const int64_t tail = std::min<int64_t>(step, std::max<int64_t>(1, per_epoch));
  double tail_sum = 0;
  for (int64_t i = step - tail; i < step; ++i) tail_sum += result.step_losses[i];
  result.final_loss = tail > 0 ? tail_sum / static_cast<double>(tail) : 0;
  return result;
}

}  // namespace

absl::StatusOr<TrainResult> RunTraining(
    const std::vector<at::Tensor>& params,
    const std::vector<model::Example>& examples, const BatchLossFn& loss_fn,
    const TrainOptions& options, const ProgressFn& progress,
    const std::vector<at::Tensor>& no_decay) {
  absl::Status s = ValidateTrainOptions(options);
  if (!s.ok()) return s;
  if (examples.empty()) return absl::InvalidArgumentError("no examples");
  if (params.empty()) return absl::InvalidArgumentError("nothing to train");
  try {
    return RunTrainingImpl(params, examples, loss_fn, options, progress,
                           no_decay);
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("training: ", e.what_without_backtrace()));
  }
}

}  // namespace lorahub::train
