// lorahub.v1.CompositionOptions <-> the composition parameters of the core
// (model::CompositionParams, jobs::ComposeJobSpec): one place that reads,
// validates and writes them for the compose and inference services.
//
// Thread-safety: plain functions.
#ifndef LORAHUB_SERVER_COMPOSITION_OPTIONS_H_
#define LORAHUB_SERVER_COMPOSITION_OPTIONS_H_

#include <string>

#include "absl/status/status.h"
#include "lorahub/v1/common.pb.h"

namespace lorahub::server {

// Reads `options` for composition `method` (lorahub | cat | ties |
// dare_linear) into `density` and `majority_sign` (left unchanged where the
// options leave a field unset). InvalidArgument naming `prefix` + the field
// ("adapter.composition.options.density") for a density outside (0, 1], an
// unknown majority_sign_method value, or a field the method does not read.
absl::Status ReadCompositionOptions(const v1::CompositionOptions& options,
                                    const std::string& method,
                                    const std::string& prefix, double* density,
                                    std::string* majority_sign);

// The options a method reads, for reports (JobSpec.composition_options).
void WriteCompositionOptions(const std::string& method, double density,
                             const std::string& majority_sign,
                             v1::CompositionOptions* options);

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_COMPOSITION_OPTIONS_H_
