#include "client/request_flags.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"

namespace lorahub::client {
namespace {

namespace v1 = lorahub::v1;

bool Has(const FlagMap& flags, const std::string& k) { return flags.count(k) > 0; }

std::string Get(const FlagMap& flags, const std::string& k) {
  auto it = flags.find(k);
  return it == flags.end() ? "" : it->second;
}

// An absent flag leaves *out; a present one must parse as a number.
template <typename T>
bool ParseNum(const FlagMap& flags, const std::string& k, T* out) {
  if (!Has(flags, k)) return true;
  double v;
  if (!absl::SimpleAtod(Get(flags, k), &v)) return false;
  *out = static_cast<T>(v);
  return true;
}

}  // namespace

const char* StatusCodeName(grpc::StatusCode code) {
  static const char* kNames[] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
      "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
      "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int c = static_cast<int>(code);
  return (c >= 0 && c <= 16) ? kNames[c] : "UNKNOWN";
}

bool ParseMethod(const std::string& n, v1::CompositionMethod* m) {
  if (n == "lorahub") *m = v1::COMPOSITION_METHOD_LORAHUB;
  else if (n == "cat") *m = v1::COMPOSITION_METHOD_CAT;
  else if (n == "ties") *m = v1::COMPOSITION_METHOD_TIES;
  else if (n == "dare_linear") *m = v1::COMPOSITION_METHOD_DARE_LINEAR;
  else return false;
  return true;
}

std::string ParseCompositionOptions(const FlagMap& flags, v1::CompositionOptions* out) {
  if (Has(flags, "density")) {
    double d;
    if (!absl::SimpleAtod(Get(flags, "density"), &d)) return "--density: not a number";
    out->set_density(d);
  }
  if (Has(flags, "majority-sign")) {
    const std::string n = Get(flags, "majority-sign");
    if (n == "total") out->set_majority_sign_method(v1::MAJORITY_SIGN_METHOD_TOTAL);
    else if (n == "frequency") out->set_majority_sign_method(v1::MAJORITY_SIGN_METHOD_FREQUENCY);
    else return "--majority-sign: total or frequency";
  }
  return "";
}

std::string ParseWeightList(const std::string& text, const std::string& flag,
                            std::vector<float>* out) {
  out->clear();
  for (absl::string_view w : absl::StrSplit(text, ',')) {
    float v;
    if (!absl::SimpleAtof(w, &v)) return flag + ": not a number list";
    out->push_back(v);
  }
  return "";
}

std::string ParseCompositionSettings(const FlagMap& flags, v1::ExplicitComposition* c) {
  if (Has(flags, "method")) {
    v1::CompositionMethod m;
    if (!ParseMethod(Get(flags, "method"), &m)) {
      return "--method: lorahub, cat, ties or dare_linear";
    }
    c->set_method(m);
  }
  std::string bad = ParseCompositionOptions(flags, c->mutable_options());
  if (!bad.empty()) return bad;
  if (Has(flags, "dare-seed")) {
    uint64_t seed;
    if (!absl::SimpleAtoi(Get(flags, "dare-seed"), &seed)) {
      return "--dare-seed: not a non-negative integer";
    }
    c->set_dare_seed(seed);
  }
  return "";
}

std::string ParseAdapterFlags(const FlagMap& flags, bool base, const std::string& command,
                              v1::AdapterRef* out) {
  const int kinds = (Has(flags, "module") ? 1 : 0) + (Has(flags, "modules") ? 1 : 0) +
                    (Has(flags, "task") ? 1 : 0) + (base ? 1 : 0);
  if (kinds != 1) {
    return command + ": give one of --task, --module, --modules/--weights, base";
  }
  if (Has(flags, "task")) out->set_task(Get(flags, "task"));
  if (Has(flags, "module")) out->set_module_id(Get(flags, "module"));
  if (Has(flags, "modules")) {
    v1::ExplicitComposition* c = out->mutable_composition();
    for (absl::string_view id : absl::StrSplit(Get(flags, "modules"), ',')) {
      c->add_module_ids(std::string(id));
    }
    if (!Has(flags, "weights")) return command + ": --modules needs --weights";
    std::vector<float> weights;
    std::string bad = ParseWeightList(Get(flags, "weights"), "--weights", &weights);
    if (!bad.empty()) return bad;
    for (float w : weights) c->add_weights(w);
    return ParseCompositionSettings(flags, c);
  }
  if (Has(flags, "method") || Has(flags, "density") || Has(flags, "majority-sign") ||
      Has(flags, "dare-seed")) {
    return command +
           ": --method, --density, --majority-sign and --dare-seed go with "
           "--modules/--weights";
  }
  return "";
}

std::string ParseDecodingFlags(const FlagMap& flags, const std::string& command,
                               v1::DecodingOptions* out) {
  int max_new = 0, beams = 0, top_k = 0;
  float temperature = 0, top_p = 0;
  double seed = 0;
  if (!ParseNum(flags, "max-new-tokens", &max_new) || !ParseNum(flags, "num-beams", &beams) ||
      !ParseNum(flags, "top-k", &top_k) || !ParseNum(flags, "temperature", &temperature) ||
      !ParseNum(flags, "top-p", &top_p) || !ParseNum(flags, "seed", &seed)) {
    return command + ": a numeric flag is malformed";
  }
  out->set_max_new_tokens(max_new);
  out->set_num_beams(beams);
  out->set_top_k(top_k);
  out->set_temperature(temperature);
  out->set_top_p(top_p);
  out->set_seed(static_cast<uint64_t>(seed));
  if (Has(flags, "logprobs")) {
    int top = 0;
    if (!ParseNum(flags, "logprobs", &top) || top < 0 || top > 5) {
      return command + ": --logprobs must be a whole number in [0, 5]";
    }
    out->set_logprobs(true);
    out->set_top_logprobs(top);
  }
  out->clear_stop();
  if (auto it = flags.find("stop"); it != flags.end()) {
    for (absl::string_view s : absl::StrSplit(it->second, kStopSeparator)) {
      out->add_stop(std::string(s));
    }
  }
  return "";
}

}  // namespace lorahub::client
