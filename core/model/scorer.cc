#include "core/model/scorer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/model/fused_ops.h"
#include "core/model/host_upload.h"
#include "core/model/t5_forward.h"

namespace lorahub::model {

absl::Status ValidateExamples(const std::vector<Example>& examples, int vocab) {
  if (examples.empty()) return absl::InvalidArgumentError("no examples");
  for (size_t i = 0; i < examples.size(); ++i) {
    for (const auto* ids : {&examples[i].input_ids, &examples[i].label_ids}) {
      if (ids->empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("example ", i, ": empty ",
                         ids == &examples[i].input_ids ? "input" : "output"));
      }
      for (int64_t id : *ids) {
        if (id < 0 || id >= vocab) {
          return absl::InvalidArgumentError(absl::StrCat(
              "example ", i, ": token id ", id, " outside [0, ", vocab, ")"));
        }
      }
    }
  }
  return absl::OkStatus();
}

void PadExamples(const std::vector<Example>& ex, bool labels, int64_t pad,
                 at::Tensor& ids, at::Tensor& mask) {
  size_t len = 0;
  for (const Example& e : ex) {
    len = std::max(len, (labels ? e.label_ids : e.input_ids).size());
  }
  const int64_t n = static_cast<int64_t>(ex.size());
  ids = at::full({n, static_cast<int64_t>(len)}, pad, at::kLong);
  mask = at::zeros({n, static_cast<int64_t>(len)}, at::kLong);
  auto ia = ids.accessor<int64_t, 2>();
  auto ma = mask.accessor<int64_t, 2>();
  for (int64_t r = 0; r < n; ++r) {
    const auto& v = labels ? ex[r].label_ids : ex[r].input_ids;
    for (size_t t = 0; t < v.size(); ++t) {
      ia[r][t] = v[t];
      ma[r][t] = 1;
    }
  }
}

int64_t RowsPerChunk(int64_t max_rows, int64_t num_examples) {
  max_rows = std::max<int64_t>(max_rows, 1);
  if (num_examples < 1 || max_rows < num_examples) return max_rows;
  return max_rows / num_examples * num_examples;
}

int64_t RowsPerPass(const ScoreOptions& options,
                    const std::vector<Example>& examples, bool cuda) {
  const int64_t n = static_cast<int64_t>(examples.size());
  int64_t max_rows = options.max_rows;
  if (max_rows <= 0) {
    size_t longest = 1;
    for (const Example& e : examples) longest = std::max(longest, e.input_ids.size());
    max_rows = cuda ? kAutoPassTokens / static_cast<int64_t>(longest) : kCpuPassRows;
  }
  return RowsPerChunk(max_rows, n);
}

absl::StatusOr<std::vector<double>> ScoreCandidates(
    const T5Weights& w, const AdapterBank* bank,
    const std::vector<int64_t>& candidate_slots,
    const std::vector<Example>& examples, const ScoreOptions& options) {
  absl::Status s = ValidateExamples(examples, w.config.vocab_size);
  if (!s.ok()) return s;
  if (candidate_slots.empty()) return std::vector<double>{};
  const int64_t n = static_cast<int64_t>(examples.size());
  const int64_t C = static_cast<int64_t>(candidate_slots.size());
  const int64_t max_rows = RowsPerPass(options, examples, w.device.is_cuda());
  try {
    at::Tensor ids, mask, labels, label_mask;
    PadExamples(examples, false, w.config.pad_token_id, ids, mask);
    PadExamples(examples, true, w.config.pad_token_id, labels, label_mask);
    labels = labels.masked_fill(label_mask == 0, kIgnoredLabel);
    ids = ids.to(w.device);
    mask = mask.to(w.device);
    labels = labels.to(w.device);
    // Per (candidate, example): summed token CE and token count.
    std::vector<at::Tensor> ce_sums;
    const int64_t total = C * n;
    for (int64_t start = 0; start < total; start += max_rows) {
      const int64_t rows_here = std::min(max_rows, total - start);
      std::vector<int64_t> ex_idx(rows_here), slots(rows_here);
      for (int64_t r = 0; r < rows_here; ++r) {
        ex_idx[r] = (start + r) % n;
        slots[r] = candidate_slots[(start + r) / n];
      }
      auto rows = MakeRowAdapters(w, bank, slots);
      if (!rows.ok()) return rows.status();
      at::Tensor index = UploadInt64(ex_idx, w.device);
      at::Tensor chunk_ids = ids.index_select(0, index);
      at::Tensor chunk_mask = mask.index_select(0, index);
      at::Tensor chunk_labels = labels.index_select(0, index);
      auto enc = Encode(w, chunk_ids, chunk_mask, *rows);
      if (!enc.ok()) return enc.status();
      auto sums =
          DecodeFullNll(w,
                        ShiftRight(chunk_labels, w.config.decoder_start_token_id,
                                   w.config.pad_token_id),
                        *enc, *rows, chunk_labels);
      if (!sums.ok()) return sums.status();
      ce_sums.push_back(sums->to(at::kDouble));
    }
    // One host transfer for all candidates.
    at::Tensor sums = at::cat(ce_sums).view({C, n}).cpu();
    auto sa = sums.accessor<double, 2>();
    std::vector<int64_t> counts(n);
    for (int64_t e = 0; e < n; ++e) {
      counts[e] = static_cast<int64_t>(examples[e].label_ids.size());
    }
    const int64_t bs =
        options.batch_size <= 0 ? n : std::min<int64_t>(n, options.batch_size);
    std::vector<double> losses(C, 0.0);
    for (int64_t c = 0; c < C; ++c) {
      double total_loss = 0;
      for (int64_t g = 0; g < n; g += bs) {
        double sum = 0;
        int64_t count = 0;
        for (int64_t e = g; e < std::min(n, g + bs); ++e) {
          sum += sa[c][e];
          count += counts[e];
        }
        total_loss += sum / static_cast<double>(count);
      }
      losses[c] = total_loss / static_cast<double>(n);
    }
    return losses;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("scorer: ", e.what_without_backtrace()));
  }
}

double LoraHubScore(double loss, const std::vector<double>& weights) {
  if (weights.empty()) return loss;
  double sum = 0;
  for (double x : weights) sum += std::fabs(x);
  return loss + 0.05 * sum / static_cast<double>(weights.size());
}

}  // namespace lorahub::model
