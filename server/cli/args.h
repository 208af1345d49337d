// Command-line arguments of one `lorahub <command>` invocation.
//
// Flags are `--name value`, `--name=value`, or bare `--name` for booleans; a
// flag may repeat (`--adapter a --adapter b`). Each command declares the flags
// it accepts, so a misspelled flag is an error, not silently ignored.
// Not thread-safe; owned by the command that parses it.
#ifndef LORAHUB_SERVER_CLI_ARGS_H_
#define LORAHUB_SERVER_CLI_ARGS_H_

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lorahub::cli {

// What a command accepts.
struct FlagSpec {
  std::set<std::string> valued;    // flags that take a value
  std::set<std::string> booleans;  // flags that take none (e.g. "json")
};

class Args {
 public:
  // Parses argv[first..argc). Unknown flags, missing values and positional
  // arguments are InvalidArgument errors naming the offending word.
  static absl::StatusOr<Args> Parse(int argc, char** argv, int first,
                                    const FlagSpec& spec);

  // Adds defaults from a JSON config file: an object whose keys are flag
  // names of `spec` (without "--") and whose values are strings, numbers,
  // booleans, or arrays of those for repeatable flags. Flags given on the
  // command line win. InvalidArgument naming the file and key for an
  // unreadable file, bad JSON, an unknown key or a value of another type.
  absl::Status MergeConfigFile(const std::string& path, const FlagSpec& spec);

  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  // Last value given for `name`, or nullopt.
  std::optional<std::string> Get(const std::string& name) const;
  // Every value given for `name`, in order.
  std::vector<std::string> GetAll(const std::string& name) const;
  // The value of a flag that must be present.
  absl::StatusOr<std::string> Required(const std::string& name) const;
  // Integer and float values; InvalidArgument names the flag if malformed.
  absl::StatusOr<long long> GetInt(const std::string& name,
                                   long long default_value) const;
  absl::StatusOr<double> GetDouble(const std::string& name,
                                   double default_value) const;

 private:
  std::map<std::string, std::vector<std::string>> values_;
};

}  // namespace lorahub::cli

#endif  // LORAHUB_SERVER_CLI_ARGS_H_
