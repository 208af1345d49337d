#include "core/train/progress_bar.h"

#include <unistd.h>

#include <cmath>
#include <utility>

#include "absl/strings/str_format.h"

namespace lorahub::train {

std::string FormatDuration(double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return "?";
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, (s / 60) % 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%ds", s);
}

ProgressBar::ProgressBar(FILE* out, std::string label)
    : out_(out), label_(std::move(label)), tty_(isatty(fileno(out)) == 1) {}

bool ProgressBar::Update(const StepInfo& info) {
  // Exponential moving average: the raw per-step loss is noisy.
  smoothed_ = smoothed_ < 0 ? info.loss : 0.9 * smoothed_ + 0.1 * info.loss;
  const double per_step = info.elapsed_seconds / static_cast<double>(info.step);
  const double eta = per_step * static_cast<double>(info.total_steps - info.step);
  const double frac =
      static_cast<double>(info.step) / static_cast<double>(info.total_steps);
  if (tty_) {
    constexpr int kWidth = 24;
    const int filled = static_cast<int>(frac * kWidth);
    std::string bar(filled, '#');
    bar.append(kWidth - filled, '.');
    absl::FPrintF(out_, "\r%s [%s] step %d/%d epoch %d loss %.4f lr %.1e ETA %s  ",
                  label_, bar, info.step, info.total_steps, info.epoch,
                  smoothed_, info.lr, FormatDuration(eta));
    drawn_ = true;
  } else {
    const int64_t bucket = static_cast<int64_t>(frac * 20);
    if (bucket == last_logged_ && info.step != info.total_steps) return true;
    last_logged_ = bucket;
    absl::FPrintF(out_, "%s step %d/%d epoch %d loss %.4f lr %.1e elapsed %s ETA %s\n",
                  label_, info.step, info.total_steps, info.epoch, smoothed_,
                  info.lr, FormatDuration(info.elapsed_seconds),
                  FormatDuration(eta));
  }
  std::fflush(out_);
  return true;
}

void ProgressBar::Finish() {
  if (drawn_) {
    absl::FPrintF(out_, "\n");
    drawn_ = false;
  }
}

}  // namespace lorahub::train
