// `lorahub`: the server and the offline tools, one binary.
#include <cstdio>
#include <cstring>

#include "server/cli/command.h"
#include "server/version.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int argc, char** argv);
  const char* help;
};

constexpr Command kCommands[] = {
    {"serve", lorahub::cli::RunServe, "run the gRPC server"},
    {"inspect", lorahub::cli::RunInspect,
     "validate a checkpoint or adapter and list its tensors"},
    {"tokenize", lorahub::cli::RunTokenize,
     "encode text (or --decode ids) with a model's spiece.model"},
    {"generate", lorahub::cli::RunGenerate,
     "generate text with a model and optional (composed) adapters"},
    {"score", lorahub::cli::RunScore,
     "LoraHub loss of a (composed) adapter on examples"},
    {"bench", lorahub::cli::RunBench, "measure the engine's speed (JSON)"},
    {"eval", lorahub::cli::RunEval,
     "exact-match accuracy on a JSONL test set (zero- or k-shot)"},
    {"learn", lorahub::cli::RunLearn,
     "learn LoraHub composition weights on few-shot examples"},
    {"train-module", lorahub::cli::RunTrainModule,
     "train a PEFT LoRA module on JSONL examples"},
    {"train-base", lorahub::cli::RunTrainBase,
     "train a T5 base model from random init"},
};

void PrintUsage(FILE* out) {
  std::fprintf(out, "usage: lorahub <command> [flags]\n\ncommands:\n");
  for (const Command& command : kCommands) {
    std::fprintf(out, "  %-12s %s\n", command.name, command.help);
  }
  std::fprintf(out, "  %-12s %s\n", "version", "print the version");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    PrintUsage(stderr);
    return lorahub::cli::kExitUsage;
  }
  const char* name = argv[1];
  if (!std::strcmp(name, "help") || !std::strcmp(name, "--help")) {
    PrintUsage(stdout);
    return lorahub::cli::kExitOk;
  }
  if (!std::strcmp(name, "version") || !std::strcmp(name, "--version")) {
    std::printf("lorahub %s\n", lorahub::kVersion);
    return lorahub::cli::kExitOk;
  }
  for (const Command& command : kCommands) {
    if (!std::strcmp(name, command.name)) return command.run(argc, argv);
  }
  std::fprintf(stderr, "lorahub: unknown command '%s'\n", name);
  PrintUsage(stderr);
  return lorahub::cli::kExitUsage;
}
