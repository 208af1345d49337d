#include "server/cli/bench_profile.h"

#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lorahub::cli {
namespace {

namespace tprof = torch::autograd::profiler;
namespace timpl = torch::profiler::impl;

// KinetoEvent's duration: durationNs() in recent LibTorch, durationUs() in
// older ones (1.13, Debian's). Picked at compile time.
template <typename E>
auto DurationNs(const E& e, int) -> decltype(e.durationNs(), uint64_t()) {
  return e.durationNs();
}
template <typename E>
uint64_t DurationNs(const E& e, long) {
  return static_cast<uint64_t>(e.durationUs()) * 1000;
}

bool IsCopyOrSet(const std::string& name) {
  return absl::StartsWith(name, "Memcpy") || absl::StartsWith(name, "Memset");
}

double NowUs() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

absl::Status StartProfiler(const ProfileOptions& options) {
  try {
    const timpl::ProfilerConfig config(timpl::ProfilerState::KINETO);
    std::set<timpl::ActivityType> activities = {timpl::ActivityType::CPU};
    if (options.cuda) activities.insert(timpl::ActivityType::CUDA);
    tprof::prepareProfiler(config, activities);
    tprof::enableProfiler(config, activities);
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("profiler did not start: ",
                                            e.what_without_backtrace()));
  }
  return absl::OkStatus();
}

absl::StatusOr<ProfileSummary> StopProfiler(const ProfileOptions& options,
                                            double wall_us) {
  ProfileSummary out;
  out.label = options.label;
  out.wall_us = wall_us;
  std::unique_ptr<tprof::ProfilerResult> result;
  try {
    result = tprof::disableProfiler();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("profiler did not stop: ",
                                            e.what_without_backtrace()));
  }
  if (result == nullptr) return absl::InternalError("profiler gave no result");

  // Device activities when there are any, else CPU operators.
  std::map<std::string, ProfileRow> by_name_device, by_name_cpu;
  for (const tprof::KinetoEvent& e : result->events()) {
    const bool device = e.deviceType() == c10::DeviceType::CUDA;
    ProfileRow& row = (device ? by_name_device : by_name_cpu)[e.name()];
    row.name = e.name();
    ++row.count;
    row.total_us += static_cast<double>(DurationNs(e, 0)) / 1000.0;
  }
  out.device = !by_name_device.empty();
  const auto& rows = out.device ? by_name_device : by_name_cpu;
  if (options.cuda && !out.device) {
    out.note =
        "no CUDA activities recorded (LibTorch without Kineto/CUPTI?): "
        "the table shows CPU operators";
  }
  for (const auto& [name, row] : rows) {
    out.events += row.count;
    out.busy_us += row.total_us;
    if (out.device && !IsCopyOrSet(name)) out.kernels += row.count;
    out.top.push_back(row);
  }
  std::sort(out.top.begin(), out.top.end(),
            [](const ProfileRow& a, const ProfileRow& b) {
              return a.total_us > b.total_us;
            });
  if (static_cast<int>(out.top.size()) > options.top) {
    out.top.resize(std::max(0, options.top));
  }
  if (!options.trace_path.empty()) {
    try {
      result->save(options.trace_path);
      std::FILE* f = std::fopen(options.trace_path.c_str(), "rb");
      if (f != nullptr) {
        std::fclose(f);
        out.trace_path = options.trace_path;
      } else {
        out.note = absl::StrCat(out.note, out.note.empty() ? "" : "; ",
                                "no trace written to ", options.trace_path,
                                " (LibTorch without Kineto?)");
      }
    } catch (const c10::Error& e) {
      out.note = absl::StrCat(out.note, out.note.empty() ? "" : "; ",
                              "trace not written: ",
                              e.what_without_backtrace());
    }
  }
  return out;
}

absl::StatusOr<ProfileSummary> ProfileRegion(
    const ProfileOptions& options, const std::function<absl::Status()>& body,
    const std::function<void()>& sync) {
  if (absl::Status st = StartProfiler(options); !st.ok()) return st;
  absl::Status body_status;
  double wall_us = 0;
  try {
    sync();
    const double t0 = NowUs();
    body_status = body();
    sync();
    wall_us = NowUs() - t0;
  } catch (const c10::Error& e) {
    body_status = absl::InternalError(e.what_without_backtrace());
  }
  absl::StatusOr<ProfileSummary> out = StopProfiler(options, wall_us);
  if (!body_status.ok()) return body_status;
  return out;
}

std::string FormatProfileTable(const ProfileSummary& s) {
  std::string text = absl::StrFormat(
      "profile %s: %d %s, %s time %.1f us, wall %.1f us (%.1f%% busy)\n",
      s.label, s.device ? s.kernels : s.events,
      s.device ? "kernels" : "CPU operator events (nested included)",
      s.device ? "kernel+copy" : "operator", s.busy_us, s.wall_us,
      s.wall_us > 0 ? 100.0 * s.busy_us / s.wall_us : 0.0);
  if (s.device && s.events != s.kernels) {
    absl::StrAppendFormat(&text, "  (+%d memcpy/memset)\n",
                          s.events - s.kernels);
  }
  absl::StrAppendFormat(&text, "  %12s %8s %10s  %s\n", "total_us", "count",
                        "avg_us", "name");
  for (const ProfileRow& r : s.top) {
    std::string name = r.name.size() > 110 ? r.name.substr(0, 107) + "..."
                                           : r.name;
    absl::StrAppendFormat(&text, "  %12.1f %8d %10.2f  %s\n", r.total_us,
                          r.count, r.count > 0 ? r.total_us / r.count : 0.0,
                          name);
  }
  if (!s.trace_path.empty()) {
    absl::StrAppend(&text, "  trace: ", s.trace_path, "\n");
  }
  if (!s.note.empty()) absl::StrAppend(&text, "  note: ", s.note, "\n");
  return text;
}

std::string TaggedPath(const std::string& path, const std::string& tag) {
  const size_t slash = path.find_last_of('/');
  const size_t dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash) ||
      dot == (slash == std::string::npos ? 0 : slash + 1)) {
    return absl::StrCat(path, ".", tag);
  }
  return absl::StrCat(path.substr(0, dot), ".", tag, path.substr(dot));
}

}  // namespace lorahub::cli
