// `lorahub tokenize`: encodes text (or decodes ids) with a model's
// spiece.model, exactly as the engine will.
//   lorahub tokenize --model DIR|FILE --text TEXT [--json] [--extra-ids N]
//   lorahub tokenize --model DIR|FILE --decode "1 2 3" [--json]
// Output is one line: `{"ids":[...]}` / `{"text":"..."}` with --json, else the
// ids space-separated / the raw text. --text may repeat: one line per text,
// in order (one process start for many texts).
#include <sys/stat.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"
#include "server/cli/args.h"
#include "server/cli/command.h"

namespace lorahub::cli {
namespace {

constexpr char kCommand[] = "tokenize";

// A model directory holds spiece.model; a file path is used as it is.
std::string SpieceModelPath(const std::string& model) {
  struct stat info;
  if (stat(model.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) {
    return model + "/spiece.model";
  }
  return model;
}

absl::StatusOr<std::vector<int>> ParseIds(const std::string& text) {
  std::vector<int> ids;
  for (absl::string_view word :
       absl::StrSplit(text, absl::ByAnyChar(" ,\t\n[]"), absl::SkipEmpty())) {
    int id;
    if (!absl::SimpleAtoi(word, &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("flag --decode: '", word, "' is not an integer id"));
    }
    ids.push_back(id);
  }
  return ids;
}

int Encode(const tokenizer::Tokenizer& tokenizer, const std::string& text,
           bool json) {
  absl::StatusOr<std::vector<int>> ids = tokenizer.Encode(text);
  if (!ids.ok()) return ReportError(kCommand, ids.status());
  // The ids go through the int64 tensor the encoder is fed, so this command
  // also proves that SentencePiece (behind its shim) and LibTorch share the
  // process with gRPC's protobuf.
  at::Tensor tensor =
      at::from_blob(ids->data(), {static_cast<int64_t>(ids->size())}, at::kInt)
          .to(at::kLong);
  const int64_t* data = tensor.data_ptr<int64_t>();
  std::vector<int64_t> values(data, data + tensor.numel());
  if (json) {
    std::printf("%s\n", nlohmann::json{{"ids", values}}.dump().c_str());
  } else {
    std::printf("%s\n", absl::StrJoin(values, " ").c_str());
  }
  return kExitOk;
}

int Decode(const tokenizer::Tokenizer& tokenizer, const std::string& ids_text,
           bool json) {
  absl::StatusOr<std::vector<int>> ids = ParseIds(ids_text);
  if (!ids.ok()) return ReportError(kCommand, ids.status());
  absl::StatusOr<std::string> text = tokenizer.Decode(*ids);
  if (!text.ok()) return ReportError(kCommand, text.status());
  if (json) {
    nlohmann::json out = {{"text", *text}};
    std::printf("%s\n",
                out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
                    .c_str());
  } else {
    std::printf("%s\n", text->c_str());
  }
  return kExitOk;
}

}  // namespace

int RunTokenize(int argc, char** argv) {
  FlagSpec spec{{"model", "text", "decode", "extra-ids"}, {"json"}};
  absl::StatusOr<Args> args = Args::Parse(argc, argv, 2, spec);
  if (!args.ok()) return ReportError(kCommand, args.status());
  absl::StatusOr<std::string> model = args->Required("model");
  if (!model.ok()) return ReportError(kCommand, model.status());
  if (args->Has("text") == args->Has("decode")) {
    return ReportError(kCommand, absl::InvalidArgumentError(
                                     "give exactly one of --text and --decode"));
  }
  absl::StatusOr<long long> extra_ids = args->GetInt("extra-ids", 100);
  if (!extra_ids.ok()) return ReportError(kCommand, extra_ids.status());
  if (*extra_ids < 0 || *extra_ids > 1000) {
    return ReportError(kCommand, absl::InvalidArgumentError(
                                     "flag --extra-ids must be in [0, 1000]"));
  }
  tokenizer::T5TokenizerOptions options;
  options.extra_ids = static_cast<int>(*extra_ids);
  auto tokenizer =
      tokenizer::T5Tokenizer::Create(SpieceModelPath(*model), options);
  if (!tokenizer.ok()) return ReportError(kCommand, tokenizer.status());

  bool json = args->Has("json");
  try {
    if (args->Has("text")) {
      for (const std::string& text : args->GetAll("text")) {
        if (int code = Encode(**tokenizer, text, json); code != kExitOk) {
          return code;
        }
      }
      return kExitOk;
    }
    return Decode(**tokenizer, *args->Get("decode"), json);
  } catch (const std::exception& e) {  // c10::Error, nlohmann exceptions
    return ReportError(kCommand, absl::InternalError(e.what()));
  }
}

}  // namespace lorahub::cli
