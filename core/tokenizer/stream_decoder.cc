#include "core/tokenizer/stream_decoder.h"

#include <utility>

#include "absl/types/span.h"

namespace lorahub::tokenizer {

absl::StatusOr<std::string> StreamDecoder::Next(int id) {
  ids_.push_back(id);
  const absl::Span<const int> all(ids_);
  absl::StatusOr<std::string> head = tokenizer_->Decode(all.subspan(prefix_, read_ - prefix_));
  if (!head.ok()) return head.status();
  absl::StatusOr<std::string> window = tokenizer_->Decode(all.subspan(prefix_));
  if (!window.ok()) return window.status();
  if (window->size() <= head->size() || window->compare(0, head->size(), *head) != 0) {
    return std::string();  // nothing new yet, or the head's text changed: wait
  }
  prefix_ = read_;
  read_ = ids_.size();
  return window->substr(head->size());
}

}  // namespace lorahub::tokenizer
