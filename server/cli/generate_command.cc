// `lorahub generate`: offline generation with the T5 engine.
//
//   lorahub generate --model DIR [--adapter DIR]... [--weights w1,w2,...]
//     (--text TEXT | --input-file FILE.jsonl | --input-ids 3,4,1)
//     [--max-new-tokens N] [--num-beams K] [--length-penalty X]
//     [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR]...
//     [--batch-size N] [--device cpu|cuda:N] [--dtype fp32|bf16] [--json]
//     [--method lorahub|cat|ties|dare_linear] [--density D]
//     [--majority-sign total|frequency] [--composition-seed N]
//
// Prints one line per input; with --json:
//   {"input": ..., "output_ids": [...], "text": ...} (with --stop, also
//   "stopped": true|false)
// --stop (repeatable, as the service's DecodingOptions.stop): an output ends
// where its text first contains one of the strings; the text stops before
// it and the ids at the token that completed it, as Generate streams them.
// Any of --temperature/--top-k/--top-p/--seed turns sampling on
// (--temperature 0 means greedy). Several adapters are composed with
// --weights (the --method rule, default LoraHub; see ParseCompositionFlags)
// and merged into the weights for speed.
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/model/generate.h"
#include "core/model/loader.h"
#include "core/serving/stop_text.h"
#include "core/tokenizer/stream_decoder.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/cli/args.h"
#include "server/cli/engine_flags.h"
#include "server/cli/command.h"

namespace lorahub::cli {
namespace {

constexpr size_t kMaxInputFileBytes = size_t{256} << 20;

struct Input {
  std::string text;  // as given (or the id list for --input-ids)
  std::vector<int64_t> ids;
};

absl::StatusOr<std::vector<std::string>> ReadInputTexts(
    const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::vector<std::string> texts;
  std::string line;
  size_t total = 0;
  int number = 0;
  while (std::getline(file, line)) {
    ++number;
    total += line.size() + 1;
    if (total > kMaxInputFileBytes) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": file too large"));
    }
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("input") ||
        !j["input"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ":", number, ": want a JSON object with a string \"input\""));
    }
    texts.push_back(j["input"].get<std::string>());
  }
  if (texts.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no inputs"));
  }
  return texts;
}

absl::StatusOr<std::vector<int64_t>> ParseIds(const std::string& text) {
  std::vector<int64_t> ids;
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    int64_t id = 0;
    if (!absl::SimpleAtoi(item, &id) || id < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("--input-ids: '", std::string(item), "' is not an id"));
    }
    ids.push_back(id);
  }
  return ids;
}

// An output cut where a stop string completes (see the header comment).
struct Output {
  std::vector<int64_t> ids;
  std::string text;
  bool stopped = false;
};

// `ids` decoded; cut at the first of `stops` when there are any.
absl::StatusOr<Output> Finish(const tokenizer::Tokenizer& tok,
                              const std::vector<std::string>& stops,
                              const std::vector<int64_t>& ids) {
  Output out;
  if (!stops.empty()) {
    // Piece by piece, as the service's stream: the same cut.
    tokenizer::StreamDecoder pieces(&tok);
    serving::StopText stop(stops);
    for (int64_t id : ids) {
      out.ids.push_back(id);
      LH_ASSIGN_OR_RETURN(std::string piece, pieces.Next(static_cast<int>(id)));
      stop.Add(piece);
      if (stop.stopped()) {
        out.text = std::string(stop.released());
        out.stopped = true;
        return out;
      }
    }
  }
  out.ids = ids;
  LH_ASSIGN_OR_RETURN(out.text, tok.Decode(std::vector<int>(ids.begin(), ids.end())));
  return out;
}

absl::Status Run(const Args& args) {
  auto model_dir = args.Required("model");
  if (!model_dir.ok()) return model_dir.status();
  const int sources =
      args.Has("text") + args.Has("input-file") + args.Has("input-ids");
  if (sources != 1) {
    return absl::InvalidArgumentError(
        "give exactly one of --text, --input-file, --input-ids");
  }
  model::GenerateOptions options;
  auto max_new = args.GetInt("max-new-tokens", 32);
  if (!max_new.ok()) return max_new.status();
  options.max_new_tokens = *max_new;
  auto beams = args.GetInt("num-beams", 1);
  if (!beams.ok()) return beams.status();
  if (*beams < 1 || *beams > 64) {
    return absl::InvalidArgumentError("--num-beams must be in [1, 64]");
  }
  options.num_beams = static_cast<int>(*beams);
  auto lp = args.GetDouble("length-penalty", 1.0);
  if (!lp.ok()) return lp.status();
  options.length_penalty = *lp;
  auto temperature = args.GetDouble("temperature", 1.0);
  auto top_k = args.GetInt("top-k", 50);
  auto top_p = args.GetDouble("top-p", 1.0);
  auto seed = args.GetInt("seed", 0);
  for (const absl::Status& s :
       {temperature.status(), top_k.status(), top_p.status(), seed.status()}) {
    if (!s.ok()) return s;
  }
  options.do_sample = args.Has("temperature") || args.Has("top-k") ||
                      args.Has("top-p") || args.Has("seed");
  if (args.Has("temperature") && *temperature == 0) options.do_sample = false;
  if (*temperature < 0) {
    return absl::InvalidArgumentError("--temperature must be >= 0");
  }
  if (options.do_sample) {
    options.temperature = *temperature;
    if (*top_k < 0 || *top_k > (1 << 30)) {
      return absl::InvalidArgumentError("--top-k must be >= 0");
    }
    options.top_k = static_cast<int>(*top_k);
    options.top_p = *top_p;
    options.seed = static_cast<uint64_t>(*seed);
  }
  const std::vector<std::string> stops = args.GetAll("stop");
  LH_RETURN_IF_ERROR(serving::ValidateStopStrings(stops, "--stop"));
  auto batch_size = args.GetInt("batch-size", 16);
  if (!batch_size.ok()) return batch_size.status();
  if (*batch_size < 1)
    return absl::InvalidArgumentError("--batch-size must be >= 1");
  std::vector<double> weights;
  if (args.Has("weights")) {
    auto w = model::ParseWeightList(*args.Get("weights"));
    if (!w.ok()) return w.status();
    weights = *w;
  }
  auto weight_options = ParseWeightOptions(args);
  if (!weight_options.ok()) return weight_options.status();
  const model::WeightOptions& wopts = *weight_options;

  // Tokenizer: required unless the inputs are ids.
  std::unique_ptr<tokenizer::Tokenizer> tok;
  {
    auto t = tokenizer::T5Tokenizer::Create(*model_dir + "/spiece.model");
    if (t.ok()) {
      tok = std::move(*t);
    } else if (!args.Has("input-ids") || !stops.empty()) {
      return t.status();
    }
  }
  std::vector<Input> inputs;
  if (args.Has("input-ids")) {
    auto ids = ParseIds(*args.Get("input-ids"));
    if (!ids.ok()) return ids.status();
    inputs.push_back({*args.Get("input-ids"), *ids});
  } else {
    std::vector<std::string> texts;
    if (args.Has("text")) {
      texts.push_back(*args.Get("text"));
    } else {
      auto t = ReadInputTexts(*args.Get("input-file"));
      if (!t.ok()) return t.status();
      texts = *t;
    }
    for (const std::string& text : texts) {
      auto ids = tok->Encode(text);
      if (!ids.ok()) return ids.status();
      inputs.push_back({text, std::vector<int64_t>(ids->begin(), ids->end())});
    }
  }

  auto base = model::LoadT5(*model_dir, wopts);
  if (!base.ok()) return base.status();
  auto composition = ParseCompositionFlags(args);
  if (!composition.ok()) return composition.status();
  std::vector<double> effective;
  auto adapter = model::LoadComposedAdapter(*base, args.GetAll("adapter"),
                                            weights, *composition, &effective);
  if (!adapter.ok()) return adapter.status();
  model::T5Weights weights_used = *base;
  if (adapter->has_value()) {
    auto merged = model::MergeAdapter(*base, **adapter);
    if (!merged.ok()) return merged.status();
    weights_used = *std::move(merged);
  }

  const bool json = args.Has("json");
  for (size_t start = 0; start < inputs.size(); start += *batch_size) {
    const size_t end =
        std::min(inputs.size(), start + static_cast<size_t>(*batch_size));
    std::vector<std::vector<int64_t>> batch;
    for (size_t i = start; i < end; ++i) batch.push_back(inputs[i].ids);
    auto result = model::Generate(weights_used, batch, nullptr, {}, options);
    if (!result.ok()) return result.status();
    for (size_t i = start; i < end; ++i) {
      Output out{result->output_ids[i - start]};
      if (tok) {
        LH_ASSIGN_OR_RETURN(out, Finish(*tok, stops, out.ids));
      }
      if (json) {
        nlohmann::json line;
        line["input"] = inputs[i].text;
        line["output_ids"] = out.ids;
        line["text"] = tok ? nlohmann::json(out.text) : nlohmann::json(nullptr);
        if (!stops.empty()) line["stopped"] = out.stopped;
        std::printf("%s\n", line.dump(-1, ' ', false,
                                      nlohmann::json::error_handler_t::replace)
                                .c_str());
      } else {
        std::printf("%s\n", out.text.c_str());
      }
    }
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

}  // namespace

int RunGenerate(int argc, char** argv) {
  FlagSpec spec{
      {"model", "adapter", "weights", "text", "input-file", "input-ids",
       "max-new-tokens", "num-beams", "length-penalty", "temperature", "top-k",
       "top-p", "seed", "stop", "batch-size", "device", "dtype", "method", "density",
       "majority-sign", "composition-seed"},
      {"json"}};
  return RunWithArgs("generate", argc, argv, spec, Run);
}

}  // namespace lorahub::cli
