// `lorahub bench --profile-out FILE`: one region of work (an objective
// evaluation, a generation call) under LibTorch's Kineto profiler, with a
// Chrome trace and a summary of where the device time went (issue 7: how
// many kernels an evaluation launches, and how much of its wall time they
// fill).
//
// The LibTorch profiler headers stay in bench_profile.cc. Works with or
// without Kineto/CUPTI: on a CUDA device the summary counts the device
// activities (kernels, memcpy, memset) that the profiler reports; where it
// reports none (a LibTorch built without Kineto, or no CUPTI) the summary
// says so in `note`; on the CPU it summarises the CPU operators instead.
// Thread-safety: one profiled region per process at a time (the profiler is
// process-global); not for concurrent use.
#ifndef LORAHUB_SERVER_CLI_BENCH_PROFILE_H_
#define LORAHUB_SERVER_CLI_BENCH_PROFILE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lorahub::cli {

struct ProfileOptions {
  std::string label;       // names the region in the table, e.g. "objective"
  std::string trace_path;  // Chrome trace (JSON) written here; empty: none
  bool cuda = false;       // also record CUDA activities (needs CUPTI)
  int top = 25;            // rows of the table
};

// One row of the table: all events of one name.
struct ProfileRow {
  std::string name;
  int64_t count = 0;
  double total_us = 0;
};

struct ProfileSummary {
  std::string label;
  // True: the rows are device activities; false: CPU operators (nested
  // operators are counted too, so their times overlap).
  bool device = false;
  int64_t events = 0;   // rows' events in all
  int64_t kernels = 0;  // device kernels (events less memcpy/memset)
  double busy_us = 0;   // sum of the events' durations
  double wall_us = 0;   // host time of the region, the device synchronised
  std::vector<ProfileRow> top;  // by total time, at most options.top
  std::string trace_path;       // where the trace went; empty if none
  std::string note;             // what is missing and why; empty if nothing
};

// Runs `body` once under the profiler. `sync` waits for the device (called
// before the start and after the body, both inside the profiled region).
// The status of `body` if it fails; Internal when the profiler cannot start.
// A trace that cannot be written is a `note`, not an error.
absl::StatusOr<ProfileSummary> ProfileRegion(
    const ProfileOptions& options, const std::function<absl::Status()>& body,
    const std::function<void()>& sync);

// The two halves of ProfileRegion, for a region that is not one call:
// StartProfiler starts the profiler, StopProfiler stops it and summarises
// (`wall_us`: the region's wall time, as the caller measured it). Both on
// the same thread: LibTorch records the operators (and RecordFunction
// spans) of the thread that starts it, and the devices' activities of the
// whole process (`lorahub serve --profile-out` runs them on an engine's
// thread).
absl::Status StartProfiler(const ProfileOptions& options);
absl::StatusOr<ProfileSummary> StopProfiler(const ProfileOptions& options,
                                            double wall_us);

// The summary as a table for people (several lines, ends with '\n').
std::string FormatProfileTable(const ProfileSummary& summary);

// `path` with `tag` inserted before its extension: ("out/p.json", "generate")
// -> "out/p.generate.json"; without an extension, appended.
std::string TaggedPath(const std::string& path, const std::string& tag);

}  // namespace lorahub::cli

#endif  // LORAHUB_SERVER_CLI_BENCH_PROFILE_H_
