// A terminal progress bar for training commands: on a terminal one line
// redrawn in place ("[####....] step 12/240 loss 2.345 lr 1.0e-03 ETA 1m23s");
// elsewhere (logs, pipes) one plain line every 5% of the steps.
// Not thread-safe; owned by the command that prints it.
#ifndef LORAHUB_CORE_TRAIN_PROGRESS_BAR_H_
#define LORAHUB_CORE_TRAIN_PROGRESS_BAR_H_

#include <cstdio>
#include <string>

#include "core/train/trainer.h"

namespace lorahub::train {

class ProgressBar {
 public:
  // Writes to `out` (not owned; usually stderr). `label` prefixes lines.
  ProgressBar(FILE* out, std::string label);
  // Draws `info`; returns true (never cancels).
  bool Update(const StepInfo& info);
  // Ends the in-place line, if one was drawn.
  void Finish();

 private:
  FILE* out_;
  std::string label_;
  bool tty_;
  bool drawn_ = false;
  int64_t last_logged_ = -1;
  double smoothed_ = -1;
};

// "1h02m", "3m07s", "12s".
std::string FormatDuration(double seconds);

}  // namespace lorahub::train

#endif  // LORAHUB_CORE_TRAIN_PROGRESS_BAR_H_
