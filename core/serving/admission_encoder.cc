#include "core/serving/admission_encoder.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

#include "core/model/projection.h"
#include "core/util/status_macros.h"

namespace lorahub::serving {

AdmissionEncoder::AdmissionEncoder(const model::T5Weights& weights,
                                   AdmissionEncoderOptions options)
    : w_(weights),
      options_(options),
      graph_pool_(options.shared_graph_pool && options.cuda_graph &&
                          weights.device.is_cuda()
                      ? model::MakeGraphMemoryPool()
                      : nullptr) {}

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
    made_every_[1] = false;
    last_table_[1].reset();
  }
  LH_ASSIGN_OR_RETURN(model::PackedInput input, model::PackRows(prompts, w_.device));
  const model::RowAdapters table = model::SlotTableRows(rows);
  const bool with_bank = rows.bank != nullptr;
  last_table_[with_bank] = table;
  if (options_.capture_every_bucket && !made_every_[with_bank]) {
    // A bucket that cannot be made ahead (e.g. out of device memory) is
    // left to its own first pass, as without capture_every_bucket.
    made_every_[with_bank] = true;
    if (absl::Status s = MakeEveryBucket(table); !s.ok()) {
      static std::atomic<bool> logged{false};
      if (!logged.exchange(true)) {
        std::fprintf(stderr,
                     "lorahub: admission encoder buckets not made ahead (%s); "
                     "each is made at its first pass\n",
                     std::string(s.message()).c_str());
      }
    }
  }
  LH_ASSIGN_OR_RETURN(
      model::StaticPackedEncoder * encoder,
      EncoderOf({BucketTokens(input.rows.host_starts.back()), with_bank}, table));
  ++passes_;
  return encoder->Run(input, table);
}

absl::StatusOr<model::StaticPackedEncoder*> AdmissionEncoder::EncoderOf(
    std::pair<int64_t, bool> key, const model::RowAdapters& table) {
  auto it = encoders_.find(key);
  if (it == encoders_.end()) {
    model::PackedBucket bucket;
    bucket.rows = options_.max_rows;
    bucket.tokens = key.first;
    bucket.longest = kLongestRow;
    bucket.up_to = true;
    model::StaticEncoderOptions o;
    o.cuda_graph = options_.cuda_graph;
    o.graph_pool = graph_pool_;
    LH_ASSIGN_OR_RETURN(std::unique_ptr<model::StaticPackedEncoder> made,
                        model::StaticPackedEncoder::Create(w_, bucket, table, o));
    it = encoders_.emplace(key, std::move(made)).first;
  }
  return it->second.get();
}

std::vector<int64_t> AdmissionEncoder::Buckets() const {
  // A bucket takes the passes of more tokens than the bucket below it.
  const int64_t reach = options_.max_rows * kLongestRow;
  std::vector<int64_t> buckets;
  for (int64_t below = 0, t = BucketTokens(1);
       t <= options_.max_tokens && below < reach; below = t, t = BucketTokens(t + 1)) {
    buckets.push_back(t);
  }
  return buckets;
}

absl::Status AdmissionEncoder::MakeBucket(int64_t tokens,
                                          const model::RowAdapters& table) {
  const bool with_bank = table.bank != nullptr;
  // Rows of kLongestRow pad tokens up to the bucket's tokens (fewer where
  // max_rows rows cannot fill it: the pass still takes it).
  std::vector<std::vector<int64_t>> prompts;
  for (int64_t left = tokens;
       left > 0 && static_cast<int64_t>(prompts.size()) < options_.max_rows;
       left -= kLongestRow) {
    prompts.emplace_back(static_cast<size_t>(std::min(left, kLongestRow)),
                         w_.config.pad_token_id);
  }
  try {
    model::RowAdapters placeholder = table;
    if (with_bank) {
      const auto n = static_cast<int64_t>(prompts.size());
      placeholder.slots = at::zeros({n}, table.slots.options());
      placeholder.mask = at::zeros({n, 1, 1}, table.mask.options());
    }
    LH_ASSIGN_OR_RETURN(model::PackedInput input,
                        model::PackRows(prompts, w_.device));
    LH_ASSIGN_OR_RETURN(model::StaticPackedEncoder * encoder,
                        EncoderOf({tokens, with_bank}, placeholder));
    return encoder->Run(input, placeholder).status();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(
        "admission encoder: placeholder pass: ", e.what_without_backtrace()));
  }
}

absl::Status AdmissionEncoder::MakeEveryBucket(const model::RowAdapters& table) {
  const bool with_bank = table.bank != nullptr;
  for (int64_t tokens : Buckets()) {
    if (encoders_.count({tokens, with_bank}) > 0) continue;
    LH_RETURN_IF_ERROR(MakeBucket(tokens, table));
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> AdmissionEncoder::MakeNextBucket(int64_t bank_layout) {
  for (const bool with_bank : {true, false}) {
    if (!last_table_[with_bank]) continue;
    // The bank's graphs would be dropped at its next pass.
    if (with_bank && bank_layout != bank_layout_) continue;
    for (int64_t tokens : Buckets()) {
      if (encoders_.count({tokens, with_bank}) > 0) continue;
      // A failed pass may leave no encoder: it is not tried again here.
      const absl::Status s = MakeBucket(tokens, *last_table_[with_bank]);
      if (!s.ok()) last_table_[with_bank].reset();
      LH_RETURN_IF_ERROR(s);
      return true;
    }
  }
  return false;
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
