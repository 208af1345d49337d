// Flags shared by `lorahub train-module` and `lorahub train-base`: the
// optimisation schedule (train::TrainOptions) and the device.
#ifndef LORAHUB_SERVER_CLI_TRAIN_FLAGS_H_
#define LORAHUB_SERVER_CLI_TRAIN_FLAGS_H_

#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "core/train/trainer.h"
#include "server/cli/args.h"

namespace lorahub::cli {

// --epochs --lr --batch-size --seed --device --warmup-ratio --schedule
// --weight-decay --max-grad-norm --max-steps --max-input-tokens
// --max-output-tokens
std::set<std::string> TrainValuedFlags();

// Reads the flags above over `defaults`; InvalidArgument naming the flag.
absl::StatusOr<train::TrainOptions> ParseTrainFlags(
    const Args& args, const train::TrainOptions& defaults);

}  // namespace lorahub::cli

#endif  // LORAHUB_SERVER_CLI_TRAIN_FLAGS_H_
