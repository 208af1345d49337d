// The subcommands of the `lorahub` binary.
//
// Each command parses its own flags (see args.h) and returns the process exit
// code: 0 on success, 2 on bad input (flag, path or file), 1 on other failures.
// Commands print one-line errors to stderr, never stack traces.
#ifndef LORAHUB_SERVER_CLI_COMMAND_H_
#define LORAHUB_SERVER_CLI_COMMAND_H_

#include "absl/status/status.h"

namespace lorahub::cli {

// Exit codes shared by all commands.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

// Prints "lorahub <command>: <message>" to stderr and returns the exit code
// for `status`: 2 for InvalidArgument/NotFound/FailedPrecondition/OutOfRange/
// DataLoss (the user's input is at fault), 1 otherwise.
int ReportError(const char* command, const absl::Status& status);

class Args;
struct FlagSpec;

// Parses argv[2..] against `spec` and runs `run`; a bad flag, an error Status
// or an exception escaping `run` (LibTorch, allocation) becomes a one-line
// ReportError, never a stack trace. Returns the process exit code.
int RunWithArgs(const char* command, int argc, char** argv,
                const FlagSpec& spec, absl::Status (*run)(const Args&));

// `argv[0]` is the binary, argv[1] the command; flags start at argv[2].
int RunServe(int argc, char** argv);
int RunInspect(int argc, char** argv);
// Offline engine commands (generate_command.cc, score_command.cc).
int RunGenerate(int argc, char** argv);
int RunScore(int argc, char** argv);
// `lorahub eval`: see server/cli/eval_command.cc.
int RunEval(int argc, char** argv);
// `lorahub learn`: see server/cli/learn_command.cc.
int RunLearn(int argc, char** argv);
// `lorahub bench`: see server/cli/bench_command.cc.
int RunBench(int argc, char** argv);
// `lorahub tokenize`: see server/cli/tokenize_command.cc.
int RunTokenize(int argc, char** argv);
// Training (train_module_command.cc, train_base_command.cc).
int RunTrainModule(int argc, char** argv);
int RunTrainBase(int argc, char** argv);

}  // namespace lorahub::cli

#endif  // LORAHUB_SERVER_CLI_COMMAND_H_
