#include "server/composition_options.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace lorahub::server {

absl::Status ReadCompositionOptions(const v1::CompositionOptions& options,
                                    const std::string& method,
                                    const std::string& prefix, double* density,
                                    std::string* majority_sign) {
  const bool reads_density = method == "ties" || method == "dare_linear";
  if (options.has_density()) {
    if (!reads_density) {
      return absl::InvalidArgumentError(absl::StrCat(
          prefix, "density: only ties and dare_linear use it, not ", method));
    }
    const double d = options.density();
    if (!std::isfinite(d) || !(d > 0) || d > 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "density: must be in (0, 1], got ", d));
    }
    *density = d;
  }
  switch (options.majority_sign_method()) {
    case v1::MAJORITY_SIGN_METHOD_UNSPECIFIED:
      return absl::OkStatus();
    case v1::MAJORITY_SIGN_METHOD_TOTAL:
    case v1::MAJORITY_SIGN_METHOD_FREQUENCY:
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "majority_sign_method: unknown value ",
                       static_cast<int>(options.majority_sign_method())));
  }
  if (method != "ties") {
    return absl::InvalidArgumentError(absl::StrCat(
        prefix, "majority_sign_method: only ties uses it, not ", method));
  }
  *majority_sign = options.majority_sign_method() ==
                           v1::MAJORITY_SIGN_METHOD_FREQUENCY
                       ? "frequency"
                       : "total";
  return absl::OkStatus();
}

void WriteCompositionOptions(const std::string& method, double density,
                             const std::string& majority_sign,
                             v1::CompositionOptions* options) {
  if (method == "ties" || method == "dare_linear") options->set_density(density);
  if (method == "ties") {
    options->set_majority_sign_method(majority_sign == "frequency"
                                          ? v1::MAJORITY_SIGN_METHOD_FREQUENCY
                                          : v1::MAJORITY_SIGN_METHOD_TOTAL);
  }
}

}  // namespace lorahub::server
