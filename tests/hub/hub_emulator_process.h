// Test harness: runs tests/hub/hub_emulator.py as a subprocess on 127.0.0.1
// and talks to its admin routes (request log, fault switches, move_ref).
#ifndef LORAHUB_TESTS_HUB_HUB_EMULATOR_PROCESS_H_
#define LORAHUB_TESTS_HUB_HUB_EMULATOR_PROCESS_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace lorahub::hub::testing {

// A temporary directory removed (recursively) by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// One logged request of the emulator.
struct LoggedRequest {
  std::string method;
  std::string path;
  std::string host;   // "hub" or "cdn"
  std::string range;  // "" if none
  std::string auth;   // "" if none
};

class HubEmulator {
 public:
  // Path of the emulator script: set from the test's argv by main().
  static std::string& ScriptPath();

  // Writes `fixture` to a temp file and starts the emulator; waits for its
  // "PORTS" line (10 s at most).
  static absl::StatusOr<std::unique_ptr<HubEmulator>> Start(
      const nlohmann::json& fixture);
  ~HubEmulator();  // closes the emulator's stdin, then waits / kills its pid

  std::string endpoint() const;  // http://127.0.0.1:<hub port>
  int cdn_port() const { return cdn_port_; }

  std::vector<LoggedRequest> Log() const;
  // Counts logged requests with this method and host ("" matches any).
  int Count(const std::string& method, const std::string& host) const;
  void Reset() const;
  void AddFault(const nlohmann::json& fault) const;
  void MoveRef(const std::string& repo, const std::string& ref,
               const std::string& commit) const;
  nlohmann::json Get(const std::string& path) const;

 private:
  HubEmulator() = default;
  std::string Post(const std::string& path, const std::string& body) const;

  TempDir dir_;
  pid_t pid_ = -1;
  int stdin_fd_ = -1;
  int hub_port_ = 0;
  int cdn_port_ = 0;
};

}  // namespace lorahub::hub::testing

#endif  // LORAHUB_TESTS_HUB_HUB_EMULATOR_PROCESS_H_
