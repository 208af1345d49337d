// `lorahub eval`: exact-match accuracy of a model (optionally with one
// adapter or a LoraHub composition of several) on a JSONL test set.
//
//   lorahub eval --model DIR [--adapter DIR]... [--weights w1,w2,...]
//     --data FILE.jsonl [--task NAME] [--shots FILE.jsonl [--k 5]]
//     [--each-adapter | --pick-min-loss] [--loss-examples FILE.jsonl]
//     [--predictions FILE.jsonl]
//     [--max-new-tokens 32] [--batch-size 64] [--device cpu|cuda:N]
//     [--dtype fp32|bf16] [--json]
//
// --data holds {"input": ..., "output": ...} lines. Each input is generated
// greedily (batches of --batch-size prompts) and the decoded text is compared
// with "output" by core/tasks/metric.h: both trimmed, whitespace runs
// collapsed; letter case compared only where --task names a registry task
// that is about case (without --task, case is compared).
//
// --shots FILE --k K: K-shot in-context learning. The first K lines of FILE
// are the demonstrations, the same for every test input, and the prompt is
//   "<in_1>\n<out_1>\n\n<in_2>\n<out_2>\n\n...<in_K>\n<out_K>\n\n<input>"
// (each demonstration's input, a newline, its output; demonstrations and the
// test input separated by a blank line).
//
// --each-adapter evaluates every --adapter on its own (weight 1), one output
// line per adapter, in the order given. --loss-examples adds "loss": the
// LoraHub loss (mean token cross-entropy, no regulariser; `lorahub score`'s
// "loss") of the evaluated adapter on those examples, so that a module can be
// picked by its loss on the few-shot examples without test labels.
// --pick-min-loss (needs --loss-examples) does that pick: of the --adapter
// modules, only the one with the lowest loss is evaluated (the "best single
// module" baseline), and its line names it.
// --predictions writes one JSON line per test example:
//   {"input", "reference", "prediction", "correct"} (with --each-adapter also
//   "adapter").
//
// Prints (JSON with --json):
//   {"accuracy": a, "correct": c, "examples": n, "task": NAME|null,
//    "shots": K, "adapters": [...], "weights": [...], ["adapter": DIR],
//    ["loss": L], "seconds": t}
// seconds covers generation only (loading excluded). Exit 2 on bad input.
//
//   lorahub eval --model DIR --plan PLAN.jsonl [--device D] [--dtype T] [--json]
//
// runs several evaluations in one process, loading the model and tokenizer
// once (a process start costs about as much as evaluating 50 short prompts on
// the embedded default). Each non-empty line of PLAN is a JSON array of
// strings: the flags of one evaluation as command-line words, any of the flags
// above except --model, --device, --dtype, --json and --plan, e.g.
//   ["--data", "t.jsonl", "--task", "add", "--shots", "s.jsonl", "--k", "5"]
// Evaluations run in plan order; each output line is what that evaluation
// prints alone plus "plan_line" (1-based). Every line is parsed first: a
// malformed one stops the run before any evaluation; an evaluation that fails
// stops it after the lines before have printed (exit 2 either way, the error
// names PLAN and the line).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model/generate.h"
#include "core/model/loader.h"
#include "core/model/lora.h"
#include "core/model/scorer.h"
#include "core/tasks/jsonl.h"
#include "core/tasks/metric.h"
#include "core/tasks/task_registry.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/cli/args.h"
#include "server/cli/command.h"
#include "server/cli/engine_flags.h"

namespace lorahub::cli {
namespace {

constexpr int kMaxShots = 64;
constexpr long long kMaxBatchSize = 4096;
// Prompts longer than this many tokens are an input error (a 64-shot prompt of
// the synthetic tasks is ~2,000 tokens; anything longer is not what the
// command is for and would only exhaust memory).
constexpr size_t kMaxPromptTokens = 8192;

// The documented k-shot prompt (see the file comment).
std::string FewShotPrompt(const std::vector<tasks::Example>& shots,
                          const std::string& input) {
  std::string prompt;
  for (const tasks::Example& shot : shots) {
    absl::StrAppend(&prompt, shot.input, "\n", shot.output, "\n\n");
  }
  absl::StrAppend(&prompt, input);
  return prompt;
}

struct Evaluation {
  int correct = 0;
  std::vector<std::string> predictions;
  double seconds = 0;
};

absl::StatusOr<Evaluation> GenerateAndMatch(
    const model::T5Weights& weights, const tokenizer::Tokenizer& tok,
    const std::vector<std::vector<int64_t>>& prompts,
    const std::vector<tasks::Example>& data,
    const tasks::MatchOptions& match, const model::GenerateOptions& options,
    size_t batch_size) {
  Evaluation eval;
  const auto start = std::chrono::steady_clock::now();
  for (size_t begin = 0; begin < prompts.size(); begin += batch_size) {
    const size_t end = std::min(prompts.size(), begin + batch_size);
    std::vector<std::vector<int64_t>> batch(prompts.begin() + begin,
                                            prompts.begin() + end);
    LH_ASSIGN_OR_RETURN(model::GenerateResult result,
                        model::Generate(weights, batch, nullptr, {}, options));
    for (size_t i = begin; i < end; ++i) {
      const std::vector<int64_t>& out = result.output_ids[i - begin];
      LH_ASSIGN_OR_RETURN(std::string text,
                          tok.Decode(std::vector<int>(out.begin(), out.end())));
      if (tasks::AnswersMatch(text, data[i].output, match)) ++eval.correct;
      eval.predictions.push_back(std::move(text));
    }
  }
  eval.seconds = std::chrono::duration<double>(
                     std::chrono::steady_clock::now() - start)
                     .count();
  return eval;
}

// One evaluated configuration: the merged weights and what to report.
struct Config {
  std::string adapter;  // --each-adapter: the adapter dir; else empty
  std::optional<model::LoraAdapter> lora;
};

// The tokenizer and base model, loaded on first use and shared by the
// evaluations of one process (one, or a --plan's).
class Shared {
 public:
  Shared(std::string model_dir, model::WeightOptions wopts)
      : model_dir_(std::move(model_dir)), wopts_(wopts) {}
  absl::StatusOr<const tokenizer::Tokenizer*> Tok() {
    if (tok_ == nullptr) {
      LH_ASSIGN_OR_RETURN(tok_, tokenizer::T5Tokenizer::Create(model_dir_ + "/spiece.model"));
    }
    return tok_.get();
  }
  absl::StatusOr<const model::T5Weights*> Base() {
    if (!base_) {
      LH_ASSIGN_OR_RETURN(model::T5Weights w, model::LoadT5(model_dir_, wopts_));
      base_ = std::move(w);
    }
    return &*base_;
  }

 private:
  std::string model_dir_;
  model::WeightOptions wopts_;
  std::unique_ptr<tokenizer::Tokenizer> tok_;
  std::optional<model::T5Weights> base_;
};

// One evaluation; `args` holds its flags (the model's come from `shared`).
// plan_line > 0: it is that line of a --plan (reported with its output).
absl::Status EvalOne(const Args& args, Shared& shared, bool json, int plan_line) {
  LH_ASSIGN_OR_RETURN(std::string data_path, args.Required("data"));
  const std::vector<std::string> adapter_dirs = args.GetAll("adapter");
  const bool pick = args.Has("pick-min-loss");
  const bool each = args.Has("each-adapter") || pick;
  if (args.Has("each-adapter") && pick) {
    return absl::InvalidArgumentError(
        "give one of --each-adapter, --pick-min-loss");
  }
  if (each && adapter_dirs.empty()) {
    return absl::InvalidArgumentError(
        "--each-adapter/--pick-min-loss need --adapter");
  }
  if (each && args.Has("weights")) {
    return absl::InvalidArgumentError(
        "--each-adapter/--pick-min-loss evaluate adapters alone: drop --weights");
  }
  if (pick && !args.Has("loss-examples")) {
    return absl::InvalidArgumentError("--pick-min-loss needs --loss-examples");
  }
  LH_ASSIGN_OR_RETURN(long long max_new, args.GetInt("max-new-tokens", 32));
  if (max_new < 1 || max_new > 8192) {
    return absl::InvalidArgumentError("--max-new-tokens must be in [1, 8192]");
  }
  LH_ASSIGN_OR_RETURN(long long batch_size, args.GetInt("batch-size", 64));
  if (batch_size < 1 || batch_size > kMaxBatchSize) {
    return absl::InvalidArgumentError(
        absl::StrCat("--batch-size must be in [1, ", kMaxBatchSize, "]"));
  }
  if (args.Has("k") && !args.Has("shots")) {
    return absl::InvalidArgumentError("--k needs --shots");
  }
  LH_ASSIGN_OR_RETURN(long long k, args.GetInt("k", 5));
  if (args.Has("shots") && (k < 1 || k > kMaxShots)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--k must be in [1, ", kMaxShots, "]"));
  }
  std::vector<double> weights;
  if (args.Has("weights")) {
    auto w = model::ParseWeightList(*args.Get("weights"));
    if (!w.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--weights: ", w.status().message()));
    }
    weights = *std::move(w);
  }
  tasks::MatchOptions match;  // case-sensitive unless the task says not
  std::optional<std::string> task_name = args.Get("task");
  if (task_name) {
    auto task = tasks::FindTask(*task_name);
    if (!task.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--task: ", task.status().message()));
    }
    match.case_sensitive = (*task)->case_sensitive;
  }

  // Inputs, before the (slower) model load.
  auto data = tasks::ReadJsonl(data_path);
  if (!data.ok()) return data.status();
  if (data->empty()) {
    return absl::InvalidArgumentError(absl::StrCat(data_path, ": no examples"));
  }
  std::vector<tasks::Example> shots;
  if (args.Has("shots")) {
    const std::string shots_path = *args.Get("shots");
    auto all = tasks::ReadJsonl(shots_path);
    if (!all.ok()) return all.status();
    if (static_cast<long long>(all->size()) < k) {
      return absl::InvalidArgumentError(absl::StrCat(
          shots_path, ": has ", all->size(), " examples, --k wants ", k));
    }
    shots.assign(all->begin(), all->begin() + k);
  }
  LH_ASSIGN_OR_RETURN(const tokenizer::Tokenizer* tok, shared.Tok());
  std::vector<std::vector<int64_t>> prompts;
  prompts.reserve(data->size());
  for (size_t i = 0; i < data->size(); ++i) {
    const std::string prompt =
        shots.empty() ? (*data)[i].input : FewShotPrompt(shots, (*data)[i].input);
    LH_ASSIGN_OR_RETURN(std::vector<int> ids, tok->Encode(prompt));
    if (ids.size() > kMaxPromptTokens) {
      return absl::InvalidArgumentError(
          absl::StrCat(data_path, ":", i + 1, ": prompt has ", ids.size(),
                       " tokens (at most ", kMaxPromptTokens, ")"));
    }
    prompts.emplace_back(ids.begin(), ids.end());
  }
  std::vector<model::Example> loss_examples;
  if (args.Has("loss-examples")) {
    LH_ASSIGN_OR_RETURN(loss_examples,
                        ReadLoraHubExamples(*args.Get("loss-examples"), *tok));
  }

  LH_ASSIGN_OR_RETURN(const model::T5Weights* base_ptr, shared.Base());
  const model::T5Weights& base = *base_ptr;
  std::vector<Config> configs;
  std::vector<double> effective;
  if (each) {
    for (const std::string& dir : adapter_dirs) {
      LH_ASSIGN_OR_RETURN(model::LoraAdapter lora,
                          model::LoadLoraAdapter(base, dir));
      configs.push_back({dir, std::move(lora)});
    }
  } else {
    LH_ASSIGN_OR_RETURN(
        std::optional<model::LoraAdapter> lora,
        model::LoadComposedAdapter(base, adapter_dirs, weights, &effective));
    configs.push_back({"", std::move(lora)});
  }

  // Losses on the few-shot examples: all configurations in one batched pass.
  std::vector<double> losses;
  if (!loss_examples.empty()) {
    std::vector<const model::LoraAdapter*> bank_adapters;
    std::vector<int64_t> slots;
    for (const Config& c : configs) {
      if (c.lora) {
        slots.push_back(static_cast<int64_t>(bank_adapters.size()));
        bank_adapters.push_back(&*c.lora);
      } else {
        slots.push_back(-1);
      }
    }
    std::optional<model::AdapterBank> bank;
    if (!bank_adapters.empty()) {
      LH_ASSIGN_OR_RETURN(bank, model::MakeAdapterBank(base, bank_adapters));
    }
    LH_ASSIGN_OR_RETURN(losses,
                        model::ScoreCandidates(base, bank ? &*bank : nullptr,
                                               slots, loss_examples, {}));
    if (pick) {
      const size_t best = static_cast<size_t>(
          std::min_element(losses.begin(), losses.end()) - losses.begin());
      configs = {std::move(configs[best])};
      losses = {losses[best]};
    }
  }

  std::ofstream predictions;
  if (args.Has("predictions")) {
    predictions.open(*args.Get("predictions"), std::ios::binary | std::ios::trunc);
    if (!predictions) {
      return absl::InvalidArgumentError(
          absl::StrCat(*args.Get("predictions"), ": cannot write"));
    }
  }
  model::GenerateOptions options;  // greedy
  options.max_new_tokens = max_new;
  for (size_t c = 0; c < configs.size(); ++c) {
    const Config& config = configs[c];
    model::T5Weights merged = base;
    if (config.lora) {
      LH_ASSIGN_OR_RETURN(merged, model::MergeAdapter(base, *config.lora));
    }
    LH_ASSIGN_OR_RETURN(
        Evaluation eval,
        GenerateAndMatch(merged, *tok, prompts, *data, match, options,
                         static_cast<size_t>(batch_size)));
    const int n = static_cast<int>(data->size());
    nlohmann::json j;
    j["accuracy"] = static_cast<double>(eval.correct) / n;
    j["correct"] = eval.correct;
    j["examples"] = n;
    j["task"] = task_name ? nlohmann::json(*task_name) : nlohmann::json(nullptr);
    j["shots"] = shots.size();
    if (each) {
      j["adapter"] = config.adapter;
    } else {
      j["adapters"] = adapter_dirs;
      j["weights"] = effective;
    }
    if (!losses.empty()) j["loss"] = losses[c];
    j["seconds"] = eval.seconds;
    if (plan_line > 0) j["plan_line"] = plan_line;
    if (predictions.is_open()) {
      for (int i = 0; i < n; ++i) {
        nlohmann::json p = {{"input", (*data)[i].input},
                            {"reference", (*data)[i].output},
                            {"prediction", eval.predictions[i]},
                            {"correct", tasks::AnswersMatch(eval.predictions[i],
                                                            (*data)[i].output,
                                                            match)}};
        if (each) p["adapter"] = config.adapter;
        predictions << p.dump(-1, ' ', false,
                              nlohmann::json::error_handler_t::replace)
                    << "\n";
      }
      if (!predictions) {
        return absl::InternalError(
            absl::StrCat(*args.Get("predictions"), ": write failed"));
      }
    }
    if (json) {
      std::printf("%s\n", j.dump(-1, ' ', false,
                                 nlohmann::json::error_handler_t::replace)
                              .c_str());
    } else {
      std::printf("%s%saccuracy %.4f (%d/%d)%s\n",
                  plan_line > 0 ? absl::StrCat("plan line ", plan_line, ": ").c_str() : "",
                  each ? absl::StrCat(config.adapter, ": ").c_str() : "",
                  static_cast<double>(eval.correct) / n, eval.correct, n,
                  losses.empty() ? ""
                                 : absl::StrCat(" loss ", losses[c]).c_str());
    }
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

// The flags of one evaluation (on the command line, or a --plan line).
const FlagSpec& EvalFlags() {
  static const FlagSpec* spec = new FlagSpec{
      {"adapter", "weights", "data", "task", "shots", "k", "loss-examples",
       "predictions", "max-new-tokens", "batch-size"},
      {"each-adapter", "pick-min-loss"}};
  return *spec;
}

// The words of one plan line (a JSON array of strings).
absl::StatusOr<std::vector<std::string>> PlanWords(const std::string& line) {
  nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!j.is_array()) return absl::InvalidArgumentError("not a JSON array of strings");
  std::vector<std::string> words;
  for (const nlohmann::json& w : j) {
    if (!w.is_string()) return absl::InvalidArgumentError("not a JSON array of strings");
    words.push_back(w.get<std::string>());
  }
  return words;
}

absl::Status RunPlan(const std::string& plan_path, Shared& shared, bool json) {
  std::ifstream in(plan_path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(plan_path, ": cannot read"));
  // Every line parsed before the first evaluation: a typo fails fast.
  std::vector<std::pair<int, Args>> plan;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    absl::StatusOr<std::vector<std::string>> words = PlanWords(line);
    absl::StatusOr<Args> args = absl::InternalError("unparsed");
    if (words.ok()) {
      std::vector<char*> argv;
      for (std::string& w : *words) argv.push_back(w.data());
      args = Args::Parse(static_cast<int>(argv.size()), argv.data(), 0, EvalFlags());
    }
    const absl::Status bad = words.ok() ? args.status() : words.status();
    if (!bad.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(plan_path, ":", n, ": ", bad.message()));
    }
    plan.emplace_back(n, *std::move(args));
  }
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat(plan_path, ": read error"));
  if (plan.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(plan_path, ": no evaluations"));
  }
  for (const auto& [n, args] : plan) {
    absl::Status s = EvalOne(args, shared, json, n);
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrCat(plan_path, ":", n, ": ", s.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status Run(const Args& args) {
  LH_ASSIGN_OR_RETURN(std::string model_dir, args.Required("model"));
  LH_ASSIGN_OR_RETURN(model::WeightOptions wopts, ParseWeightOptions(args));
  Shared shared(model_dir, wopts);
  const bool json = args.Has("json");
  if (!args.Has("plan")) return EvalOne(args, shared, json, 0);
  for (const auto& flags : {EvalFlags().valued, EvalFlags().booleans}) {
    for (const std::string& f : flags) {
      if (args.Has(f)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--plan: give --", f, " in the plan's lines"));
      }
    }
  }
  return RunPlan(*args.Get("plan"), shared, json);
}

}  // namespace

int RunEval(int argc, char** argv) {
  FlagSpec spec = EvalFlags();
  spec.valued.insert({"model", "device", "dtype", "plan"});
  spec.booleans.insert("json");
  return RunWithArgs("eval", argc, argv, spec, Run);
}

}  // namespace lorahub::cli
