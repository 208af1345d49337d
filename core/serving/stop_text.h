// StopText: stop sequences over a stream of generated text pieces, for
// Generate's DecodingOptions.stop. Generation ends at the first place where
// the text contains one of the stop strings; the text returned ends just
// before it (the stop string itself is not returned, as in OpenAI's and
// vLLM's APIs).
//
// Streaming without ever taking text back: a piece's text is released only
// once it cannot be the start of a stop string any more. Text that might be
// (a suffix of the text so far that is a proper prefix of some stop
// string) is held back until a later piece decides it: it completes a
// stop (never released), or breaks off (released), or the stream ends
// (Flush releases it).
//
// Cost: each Add scans only the text not yet released, at most the longest
// stop string's length plus the new piece.
//
// Thread-safety: one thread at a time.
#ifndef LORAHUB_CORE_SERVING_STOP_TEXT_H_
#define LORAHUB_CORE_SERVING_STOP_TEXT_H_

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace lorahub::serving {

// Limits on DecodingOptions.stop.
inline constexpr int kMaxStopStrings = 8;
inline constexpr size_t kMaxStopBytes = 256;

// OK, or InvalidArgument naming `field` ("options.stop[2]: empty") for more
// than kMaxStopStrings strings, an empty one or one longer than
// kMaxStopBytes.
absl::Status ValidateStopStrings(const std::vector<std::string>& stops,
                                 const std::string& field);

class StopText {
 public:
  // `stops` must pass ValidateStopStrings; none: every piece is released
  // as it comes.
  explicit StopText(std::vector<std::string> stops);

  // Appends a piece. Returns the text it releases (maybe empty). After a
  // stop string completes, stopped() is true and later pieces are ignored.
  std::string Add(absl::string_view piece);
  // The stream ended without a stop: releases the text held back.
  std::string Flush();

  bool stopped() const { return stopped_; }
  // The whole text released so far (after a stop: up to the stop string).
  absl::string_view released() const {
    return absl::string_view(text_).substr(0, released_);
  }

 private:
  // Bytes at the end of text_ (after released_) that start some stop
  // string without completing it.
  size_t HeldBack() const;

  const std::vector<std::string> stops_;
  size_t longest_ = 0;
  std::string text_;    // Everything added until the stop.
  size_t released_ = 0;  // text_[0, released_) was returned.
  bool stopped_ = false;
};

}  // namespace lorahub::serving

#endif  // LORAHUB_CORE_SERVING_STOP_TEXT_H_
