#include "core/serving/stop_text.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace lorahub::serving {

absl::Status ValidateStopStrings(const std::vector<std::string>& stops,
                                 const std::string& field) {
  if (stops.size() > static_cast<size_t>(kMaxStopStrings)) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ": at most ", kMaxStopStrings, " strings, got ", stops.size()));
  }
  for (size_t i = 0; i < stops.size(); ++i) {
    if (stops[i].empty()) {
      return absl::InvalidArgumentError(absl::StrCat(field, "[", i, "]: empty"));
    }
    if (stops[i].size() > kMaxStopBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, "[", i, "]: longer than ", kMaxStopBytes, " bytes"));
    }
  }
  return absl::OkStatus();
}

StopText::StopText(std::vector<std::string> stops) : stops_(std::move(stops)) {
  for (const std::string& s : stops_) longest_ = std::max(longest_, s.size());
}

std::string StopText::Add(absl::string_view piece) {
  if (stopped_) return "";
  text_.append(piece.data(), piece.size());
  if (stops_.empty()) {
    std::string out = text_.substr(released_);
    released_ = text_.size();
    return out;
  }
  // Released text never starts a stop string (HeldBack kept it), so a match
  // starts at released_ or later: the earliest one over all stops wins.
  size_t first = std::string::npos;
  for (const std::string& s : stops_) {
    first = std::min(first, text_.find(s, released_));
  }
  size_t end;
  if (first != std::string::npos) {
    stopped_ = true;
    end = first;
  } else {
    end = text_.size() - HeldBack();
  }
  std::string out = text_.substr(released_, end - released_);
  released_ = end;
  if (stopped_) text_.resize(end);
  return out;
}

std::string StopText::Flush() {
  if (stopped_) return "";
  std::string out = text_.substr(released_);
  released_ = text_.size();
  return out;
}

size_t StopText::HeldBack() const {
  const size_t pending = text_.size() - released_;
  const size_t most = std::min(pending, longest_ == 0 ? 0 : longest_ - 1);
  // The longest suffix that is a proper prefix of some stop string.
  for (size_t n = most; n > 0; --n) {
    absl::string_view tail = absl::string_view(text_).substr(text_.size() - n);
    for (const std::string& s : stops_) {
      if (s.size() > n && absl::string_view(s).substr(0, n) == tail) return n;
    }
  }
  return 0;
}

}  // namespace lorahub::serving
