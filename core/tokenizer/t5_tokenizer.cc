// T5Tokenizer over the SentencePiece shim; see tokenizer.h for the contract.
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/tokenizer/sp_shim_loader.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/status_macros.h"

namespace lorahub::tokenizer {
namespace {

using internal::SpShimApi;

// spiece.model of t5 is 0.8 MB; anything this large is not a tokenizer.
constexpr std::streamoff kMaxModelBytes = 64 << 20;
constexpr int kMaxExtraIds = 1000;
constexpr std::string_view kExtraIdPrefix = "<extra_id_";

class T5TokenizerImpl : public Tokenizer {
 public:
  T5TokenizerImpl(const SpShimApi* api, lh_sp* sp, std::string source,
                  T5TokenizerOptions options)
      : api_(api), sp_(sp), source_(std::move(source)), options_(options) {
    piece_size_ = api_->piece_size(sp_);
  }
  ~T5TokenizerImpl() override { api_->free(sp_); }
  T5TokenizerImpl(const T5TokenizerImpl&) = delete;
  T5TokenizerImpl& operator=(const T5TokenizerImpl&) = delete;

  // Checks T5's special pieces and records the strings that encode as them.
  absl::Status Init() {
    if (Piece(pad_id()) != "<pad>" || Piece(eos_id()) != "</s>") {
      return absl::InvalidArgumentError(absl::StrCat(
          source_, ": not a T5 SentencePiece model (id 0 is '", Piece(0),
          "', id 1 is '", Piece(1), "'; expected '<pad>' and '</s>')"));
    }
    for (int id = 0; id < piece_size_; ++id) {
      if (api_->is_unknown(sp_, id)) {
        unk_id_ = id;
        break;
      }
    }
    if (unk_id_ < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(source_, ": the model has no unknown piece"));
    }
    specials_ = {{Piece(pad_id()), pad_id()},
                 {Piece(eos_id()), eos_id()},
                 {Piece(unk_id_), unk_id_}};
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<int>> Encode(std::string_view text) const override {
    std::vector<int> ids;
    size_t chunk_start = 0;
    for (size_t pos = 0; pos < text.size();) {
      size_t length = 0;
      int id = -1;
      if (text[pos] == '<' && MatchSpecial(text.substr(pos), &length, &id)) {
        LH_RETURN_IF_ERROR(
            EncodePlain(text.substr(chunk_start, pos - chunk_start), &ids));
        ids.push_back(id);
        pos += length;
        chunk_start = pos;
      } else {
        ++pos;
      }
    }
    LH_RETURN_IF_ERROR(EncodePlain(text.substr(chunk_start), &ids));
    // HF's _add_eos_if_not_present.
    if (options_.add_eos && (ids.empty() || ids.back() != eos_id())) {
      ids.push_back(eos_id());
    }
    return ids;
  }

  absl::StatusOr<std::string> Decode(absl::Span<const int> ids) const override {
    std::vector<int> kept;
    kept.reserve(ids.size());
    for (int id : ids) {
      // Special (pad, eos, unk), extra ids (>= piece_size_) and ids outside the
      // vocabulary are all skipped.
      if (id < 0 || id >= piece_size_ || id == pad_id() || id == eos_id() ||
          id == unk_id_) {
        continue;
      }
      kept.push_back(id);
    }
    // As transformers' T5 tokenizer decodes (its Metaspace decoder): join the
    // pieces, turn each U+2581 into a space and drop one leading space. This
    // differs from SentencePiece's own DecodeIds, which also drops the spaces
    // of pieces made only of U+2581 at the start of the text.
    std::string text;
    for (int id : kept) text += Piece(id);
    static constexpr std::string_view kSpaceMark = "\xE2\x96\x81";  // U+2581
    std::string out;
    out.reserve(text.size());
    for (size_t i = 0; i < text.size();) {
      if (text.compare(i, kSpaceMark.size(), kSpaceMark) == 0) {
        out += ' ';
        i += kSpaceMark.size();
      } else {
        out += text[i++];
      }
    }
    if (!out.empty() && out[0] == ' ') out.erase(0, 1);
    return out;
  }

  int vocab_size() const override { return piece_size_ + options_.extra_ids; }
  int pad_id() const override { return 0; }
  int eos_id() const override { return 1; }
  int unk_id() const override { return unk_id_; }

 private:
  std::string Piece(int id) const {
    char buffer[256];
    long n = api_->id_to_piece(sp_, id, buffer, sizeof(buffer));
    if (n < 0) return "";
    if (static_cast<size_t>(n) > sizeof(buffer)) {
      std::string piece(static_cast<size_t>(n), '\0');
      api_->id_to_piece(sp_, id, piece.data(), piece.size());
      return piece;
    }
    return std::string(buffer, static_cast<size_t>(n));
  }

  // Whether `text` starts with a special token string; sets its byte length
  // and id. `<extra_id_N>` matches only the exact spelling HF registers
  // (decimal, no leading zeros, N < extra_ids).
  bool MatchSpecial(std::string_view text, size_t* length, int* id) const {
    if (text.substr(0, kExtraIdPrefix.size()) == kExtraIdPrefix) {
      size_t pos = kExtraIdPrefix.size();
      int number = 0;
      size_t digits = 0;
      while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9' &&
             digits < 5) {
        number = number * 10 + (text[pos] - '0');
        ++pos;
        ++digits;
      }
      bool canonical = digits > 0 && !(digits > 1 && text[kExtraIdPrefix.size()] == '0');
      if (canonical && pos < text.size() && text[pos] == '>' &&
          number < options_.extra_ids) {
        *length = pos + 1;
        *id = piece_size_ + options_.extra_ids - 1 - number;
        return true;
      }
      return false;
    }
    for (const auto& [piece, piece_id] : specials_) {
      if (!piece.empty() && text.substr(0, piece.size()) == piece) {
        *length = piece.size();
        *id = piece_id;
        return true;
      }
    }
    return false;
  }

  // SentencePiece encoding of text without special tokens, appended to `ids`.
  absl::Status EncodePlain(std::string_view text, std::vector<int>* ids) const {
    if (text.empty()) return absl::OkStatus();
    std::vector<int> buffer(text.size() * 2 + 8);
    for (int attempt = 0; attempt < 2; ++attempt) {
      char error[256] = "";
      long n = api_->encode(sp_, text.data(), text.size(), buffer.data(),
                            buffer.size(), error, sizeof(error));
      if (n < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(source_, ": SentencePiece encode failed: ", error));
      }
      if (static_cast<size_t>(n) <= buffer.size()) {
        ids->insert(ids->end(), buffer.begin(), buffer.begin() + n);
        return absl::OkStatus();
      }
      // NFKC normalisation can expand the text; retry with the exact size.
      buffer.assign(static_cast<size_t>(n), 0);
    }
    return absl::InternalError(
        absl::StrCat(source_, ": SentencePiece encode size changed"));
  }

  const SpShimApi* api_;
  lh_sp* sp_;  // owned
  std::string source_;
  T5TokenizerOptions options_;
  int piece_size_ = 0;
  int unk_id_ = -1;
  std::vector<std::pair<std::string, int>> specials_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> T5Tokenizer::CreateFromBytes(
    std::string_view model_bytes, const std::string& source,
    const T5TokenizerOptions& options) {
  if (options.extra_ids < 0 || options.extra_ids > kMaxExtraIds) {
    return absl::InvalidArgumentError(
        absl::StrCat("extra_ids must be in [0, ", kMaxExtraIds, "], got ",
                     options.extra_ids));
  }
  LH_ASSIGN_OR_RETURN(const SpShimApi* api, internal::GetSpShim());
  char error[512] = "";
  lh_sp* sp = api->load(model_bytes.data(), model_bytes.size(), error,
                        sizeof(error));
  if (sp == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": not a valid SentencePiece model: ", error));
  }
  auto tokenizer = std::make_unique<T5TokenizerImpl>(api, sp, source, options);
  LH_RETURN_IF_ERROR(tokenizer->Init());
  return std::unique_ptr<Tokenizer>(std::move(tokenizer));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> T5Tokenizer::Create(
    const std::string& spiece_model_path, const T5TokenizerOptions& options) {
  std::ifstream in(spiece_model_path, std::ios::binary | std::ios::ate);
  if (!in) {
    int saved = errno;
    if (saved == ENOENT) {
      return absl::NotFoundError(
          absl::StrCat(spiece_model_path, ": no such file"));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        spiece_model_path, ": cannot open: ", std::strerror(saved)));
  }
  std::streamoff size = in.tellg();
  if (size < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(spiece_model_path, ": cannot read (a directory?)"));
  }
  if (size > kMaxModelBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(spiece_model_path, ": ", size,
                     " bytes is too large for a SentencePiece model"));
  }
  std::string bytes(static_cast<size_t>(size), '\0');
  in.seekg(0);
  if (!in.read(bytes.data(), size)) {
    return absl::InvalidArgumentError(
        absl::StrCat(spiece_model_path, ": read failed"));
  }
  return CreateFromBytes(bytes, spiece_model_path, options);
}

}  // namespace lorahub::tokenizer
