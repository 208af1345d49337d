// Command-line flags -> lorahub.v1 request fields, shared by lorahubctl's
// `generate` (one request) and `load` (many requests with the same adapter
// kind and decoding options), so both read the flags the same way.
//
// Flags are given as the parsed map (name without "--" -> value). Every
// Parse* function returns an empty string on success, or a usage message
// ("--weights: not a number list") for the caller to print before exiting 2;
// the server validates values further (ranges, unknown ids).
// Stateless functions; safe to call from any thread.
#ifndef LORAHUB_CLIENT_REQUEST_FLAGS_H_
#define LORAHUB_CLIENT_REQUEST_FLAGS_H_

#include <map>
#include <string>
#include <vector>

#include "grpcpp/support/status_code_enum.h"
#include "lorahub/v1/inference.pb.h"

namespace lorahub::client {

using FlagMap = std::map<std::string, std::string>;

// "NOT_FOUND" for grpc::StatusCode::NOT_FOUND; "UNKNOWN" outside 0..16.
const char* StatusCodeName(grpc::StatusCode code);

// --method lorahub|cat|ties|dare_linear -> *m; false for another name.
bool ParseMethod(const std::string& name, lorahub::v1::CompositionMethod* m);

// --density D and --majority-sign total|frequency -> *out.
std::string ParseCompositionOptions(const FlagMap& flags,
                                    lorahub::v1::CompositionOptions* out);

// "0.5,0.3,0.2" -> {0.5, 0.3, 0.2}; `flag` names the flag in the message.
std::string ParseWeightList(const std::string& text, const std::string& flag,
                            std::vector<float>* out);

// The settings of an explicit composition other than its modules and
// weights: --method, --density, --majority-sign, --dare-seed.
std::string ParseCompositionSettings(const FlagMap& flags,
                                     lorahub::v1::ExplicitComposition* c);

// The adapter of a request: exactly one of --task NAME, --module ID,
// --modules a,b --weights x,y (plus the composition settings above) or
// `base` (no adapter; the caller saw the positional word). `command` prefixes
// the messages ("generate: give one of ...").
std::string ParseAdapterFlags(const FlagMap& flags, bool base, const std::string& command,
                              lorahub::v1::AdapterRef* out);

// Between the values of a repeated --stop in the FlagMap.
inline constexpr char kStopSeparator = '\0';

// --max-new-tokens --num-beams --top-k --temperature --top-p --seed -> *out
// (absent flags leave the server's defaults: 0); --stop STR, repeatable
// (values joined by kStopSeparator), -> out->stop; --logprobs N (0..5) ->
// logprobs with top_logprobs N.
std::string ParseDecodingFlags(const FlagMap& flags, const std::string& command,
                               lorahub::v1::DecodingOptions* out);

}  // namespace lorahub::client

#endif  // LORAHUB_CLIENT_REQUEST_FLAGS_H_
