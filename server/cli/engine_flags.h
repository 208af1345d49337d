// Flags and inputs shared by the offline engine commands (generate, score,
// learn): --device / --dtype, and LoraHub-style few-shot examples.
#ifndef LORAHUB_SERVER_CLI_ENGINE_FLAGS_H_
#define LORAHUB_SERVER_CLI_ENGINE_FLAGS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/loader.h"
#include "core/model/scorer.h"
#include "core/model/t5_weights.h"
#include "core/tokenizer/tokenizer.h"
#include "server/cli/args.h"

namespace lorahub::cli {

// --device (cpu | cuda:N, default cpu) and --dtype (fp32 | bf16, default fp32).
absl::StatusOr<model::WeightOptions> ParseWeightOptions(const Args& args);

// --method lorahub|cat|ties|dare_linear (default lorahub, names as
// `lorahub learn --method`), --density (ties, dare_linear; (0, 1], default
// 0.5), --majority-sign total|frequency (ties), --composition-seed N
// (dare_linear's masks, default 42: a compose job uses its --seed / spec
// seed here). InvalidArgument naming the flag.
absl::StatusOr<model::CompositionParams> ParseCompositionFlags(const Args& args);

// The reference implementation's own setting: a CUDA device (--device cuda*),
// fp32 (--dtype) and the lorahub method (--method). There `learn` and `score`
// use the exact reference op sequence by default (core/model/
// exact_reference_loss.h: the same LibTorch then gives the reference's scores
// bit for bit); each command adds its own conditions.
bool InReferenceSetting(const Args& args);

// Reads a JSONL file of {"input", "output"} objects and tokenizes it as the
// LoraHub reference does (max_length 2048 with truncation, eos kept).
absl::StatusOr<std::vector<model::Example>> ReadLoraHubExamples(
    const std::string& path, const tokenizer::Tokenizer& tokenizer);

}  // namespace lorahub::cli

#endif  // LORAHUB_SERVER_CLI_ENGINE_FLAGS_H_
