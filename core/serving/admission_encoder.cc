#include "core/serving/admission_encoder.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>

#include "core/model/projection.h"
#include "core/util/status_macros.h"

namespace lorahub::serving {

AdmissionEncoder::AdmissionEncoder(const model::T5Weights& weights,
                                   AdmissionEncoderOptions options)
    : w_(weights), options_(options) {}

AdmissionEncoder::~AdmissionEncoder() = default;

int64_t AdmissionEncoder::BucketTokens(int64_t tokens) {
  // A bucket holds at least one row of the longest (StaticPackedEncoder).
  int64_t t = std::max(tokens, kLongestRow);
  int64_t step = 64;
  for (int64_t bound = 512; t > bound; bound *= 2) step *= 2;
  return (t + step - 1) / step * step;
}

bool AdmissionEncoder::Takes(const std::vector<std::vector<int64_t>>& prompts,
                             const model::RowAdapters& rows) const {
  const auto n = static_cast<int64_t>(prompts.size());
  if (n < 1 || n > options_.max_rows) return false;
  if (rows.bank != nullptr &&
      (w_.dtype == at::kFloat || !model::internal::SlotRunsEnabled())) {
    return false;
  }
  int64_t tokens = 0;
  for (const std::vector<int64_t>& p : prompts) {
    const auto len = static_cast<int64_t>(p.size());
    if (len < 1 || len > kLongestRow) return false;
    tokens += len;
  }
  return BucketTokens(tokens) <= options_.max_tokens;
}

absl::StatusOr<model::EncoderOutput> AdmissionEncoder::Encode(
    const std::vector<std::vector<int64_t>>& prompts,
    const model::RowAdapters& rows, int64_t bank_layout) {
  if (!Takes(prompts, rows)) {
    return absl::InvalidArgumentError(
        "admission encoder: prompts or adapters it does not take");
  }
  if (rows.bank != nullptr &&
      (rows.bank != bank_ || bank_layout != bank_layout_)) {
    // The graphs read the old bank's tensors: the buckets with a bank go.
    for (auto it = encoders_.begin(); it != encoders_.end();) {
      it = it->first.second ? encoders_.erase(it) : std::next(it);
    }
    bank_ = rows.bank;
    bank_layout_ = bank_layout;
  }
  LH_ASSIGN_OR_RETURN(model::PackedInput input, model::PackRows(prompts, w_.device));
  const model::RowAdapters table = model::SlotTableRows(rows);
  const std::pair<int64_t, bool> key{BucketTokens(input.rows.host_starts.back()),
                                     rows.bank != nullptr};
  auto it = encoders_.find(key);
  if (it == encoders_.end()) {
    model::PackedBucket bucket;
    bucket.rows = options_.max_rows;
    bucket.tokens = key.first;
    bucket.longest = kLongestRow;
    bucket.up_to = true;
    model::StaticEncoderOptions o;
    o.cuda_graph = options_.cuda_graph;
    LH_ASSIGN_OR_RETURN(std::unique_ptr<model::StaticPackedEncoder> made,
                        model::StaticPackedEncoder::Create(w_, bucket, table, o));
    it = encoders_.emplace(key, std::move(made)).first;
  }
  ++passes_;
  return it->second->Run(input, table);
}

int64_t AdmissionEncoder::encoders() const {
  return static_cast<int64_t>(encoders_.size());
}

int64_t AdmissionEncoder::graphs() const {
  int64_t n = 0;
  for (const auto& [key, encoder] : encoders_) n += encoder->graph_active();
  return n;
}

}  // namespace lorahub::serving
