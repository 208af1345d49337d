#include "server/cli/train_flags.h"

#include "absl/strings/str_cat.h"
#include "core/model/t5_weights.h"
#include "core/util/status_macros.h"

namespace lorahub::cli {

std::set<std::string> TrainValuedFlags() {
  return {"epochs",       "lr",           "batch-size",    "seed",
          "device",       "warmup-ratio", "schedule",      "weight-decay",
          "max-grad-norm", "max-steps",   "max-input-tokens",
          "max-output-tokens"};
}

absl::StatusOr<train::TrainOptions> ParseTrainFlags(
    const Args& args, const train::TrainOptions& defaults) {
  train::TrainOptions o = defaults;
  LH_ASSIGN_OR_RETURN(long long epochs, args.GetInt("epochs", o.epochs));
  LH_ASSIGN_OR_RETURN(long long batch, args.GetInt("batch-size", o.batch_size));
  LH_ASSIGN_OR_RETURN(long long seed, args.GetInt("seed", 0));
  LH_ASSIGN_OR_RETURN(long long max_steps, args.GetInt("max-steps", 0));
  if (epochs < 1 || epochs > 1000000) {
    return absl::InvalidArgumentError("--epochs must be in [1, 1000000]");
  }
  if (batch < 1 || batch > 65536) {
    return absl::InvalidArgumentError("--batch-size must be in [1, 65536]");
  }
  if (seed < 0) return absl::InvalidArgumentError("--seed must be >= 0");
  if (max_steps < 0) return absl::InvalidArgumentError("--max-steps must be >= 0");
  o.epochs = static_cast<int>(epochs);
  o.batch_size = static_cast<int>(batch);
  o.seed = static_cast<uint64_t>(seed);
  o.max_steps = max_steps;
  LH_ASSIGN_OR_RETURN(o.lr, args.GetDouble("lr", o.lr));
  LH_ASSIGN_OR_RETURN(o.warmup_ratio, args.GetDouble("warmup-ratio", o.warmup_ratio));
  LH_ASSIGN_OR_RETURN(o.weight_decay, args.GetDouble("weight-decay", o.weight_decay));
  LH_ASSIGN_OR_RETURN(o.max_grad_norm,
                      args.GetDouble("max-grad-norm", o.max_grad_norm));
  if (args.Has("schedule")) {
    LH_ASSIGN_OR_RETURN(o.schedule, train::ParseSchedule(*args.Get("schedule")));
  }
  LH_ASSIGN_OR_RETURN(o.device,
                      model::ParseDevice(args.Get("device").value_or("cpu")));
  absl::Status s = train::ValidateTrainOptions(o);
  if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("--", s.message()));
  return o;
}

}  // namespace lorahub::cli
