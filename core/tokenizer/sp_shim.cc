// libsp_shim.so: see sp_shim.h for why this exists. This is the only file in
// the project that includes a SentencePiece header; it must never include
// Abseil or protobuf headers (sentencepiece_processor.h declares its own
// `absl::string_view`, which clashes with real Abseil).
#include "core/tokenizer/sp_shim.h"

#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <vector>

#include <sentencepiece_processor.h>

struct lh_sp {
  sentencepiece::SentencePieceProcessor processor;
};

namespace {

void SetError(char* err, size_t err_cap, const std::string& message) {
  if (err == nullptr || err_cap == 0) return;
  size_t n = message.size() < err_cap - 1 ? message.size() : err_cap - 1;
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

bool InRange(const lh_sp* sp, int id) {
  return id >= 0 && id < sp->processor.GetPieceSize();
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int lh_sp_abi_version(void) {
  return LH_SP_ABI_VERSION;
}

__attribute__((visibility("default"))) lh_sp* lh_sp_load(const char* data,
                                                         size_t size, char* err,
                                                         size_t err_cap) {
  // No exception may cross the C boundary; none may leak the processor
  // either (SentencePiece throws on some malformed models: a fuzzed one
  // leaked it here, tests/fuzz/t5_tokenizer_fuzz.cc).
  try {
    auto sp = std::make_unique<lh_sp>();
    const auto status = sp->processor.LoadFromSerializedProto(
        std::string_view(data, size));
    if (!status.ok()) {
      SetError(err, err_cap, status.ToString());
      return nullptr;
    }
    if (sp->processor.GetPieceSize() <= 0) {
      SetError(err, err_cap, "model has no pieces");
      return nullptr;
    }
    return sp.release();
  } catch (const std::exception& e) {
    SetError(err, err_cap, e.what());
    return nullptr;
  }
}

__attribute__((visibility("default"))) void lh_sp_free(lh_sp* sp) { delete sp; }

__attribute__((visibility("default"))) int lh_sp_piece_size(const lh_sp* sp) {
  return sp->processor.GetPieceSize();
}

__attribute__((visibility("default"))) long lh_sp_encode(
    const lh_sp* sp, const char* text, size_t text_len, int* ids, size_t cap,
    char* err, size_t err_cap) {
  try {
    std::vector<int> result;
    const auto status = sp->processor.Encode(
        std::string_view(text, text_len), &result);
    if (!status.ok()) {
      SetError(err, err_cap, status.ToString());
      return -1;
    }
    if (result.size() <= cap && !result.empty()) {
      std::memcpy(ids, result.data(), result.size() * sizeof(int));
    }
    return static_cast<long>(result.size());
  } catch (const std::exception& e) {
    SetError(err, err_cap, e.what());
    return -1;
  }
}

__attribute__((visibility("default"))) long lh_sp_decode(
    const lh_sp* sp, const int* ids, size_t n, char* out, size_t cap,
    char* err, size_t err_cap) {
  try {
    std::vector<int> input(ids, ids + n);
    for (int id : input) {
      if (!InRange(sp, id)) {
        SetError(err, err_cap, "id " + std::to_string(id) + " out of range");
        return -1;
      }
    }
    std::string text;
    const auto status = sp->processor.Decode(input, &text);
    if (!status.ok()) {
      SetError(err, err_cap, status.ToString());
      return -1;
    }
    if (text.size() <= cap && !text.empty()) {
      std::memcpy(out, text.data(), text.size());
    }
    return static_cast<long>(text.size());
  } catch (const std::exception& e) {
    SetError(err, err_cap, e.what());
    return -1;
  }
}

__attribute__((visibility("default"))) long lh_sp_id_to_piece(const lh_sp* sp,
                                                              int id, char* out,
                                                              size_t cap) {
  if (!InRange(sp, id)) return -1;
  const std::string& piece = sp->processor.IdToPiece(id);
  if (piece.size() <= cap && !piece.empty()) {
    std::memcpy(out, piece.data(), piece.size());
  }
  return static_cast<long>(piece.size());
}

__attribute__((visibility("default"))) int lh_sp_is_control(const lh_sp* sp,
                                                            int id) {
  return InRange(sp, id) && sp->processor.IsControl(id) ? 1 : 0;
}

__attribute__((visibility("default"))) int lh_sp_is_unknown(const lh_sp* sp,
                                                            int id) {
  return InRange(sp, id) && sp->processor.IsUnknown(id) ? 1 : 0;
}

}  // extern "C"
