// CachedModuleResolver: a ModuleResolver that remembers another's answers.
//
// Why: AdapterCache::Get resolves every module of every request on the
// engine thread (a composition's cache key is its modules' content), and
// the store's lookup is a SQLite query under the store's mutex, which a
// running compose job holds through each progress commit (an fsync). On an
// H200 host, 1,024 requests of 3-module compositions beside 4 compose jobs:
// 20,885 against 19,366 tok/s with shared compositions, 10,691 against
// 9,735 with every request its own (twentieth session, call 3).
//
// An answer is asked again when `version` changed since it was given (the
// store's module writes: Store::module_version) or when it is older than
// max_age (writes by other processes sharing the store's file, which the
// version does not see). Errors are not remembered.
//
// Thread-safety: the returned resolver may be called from any thread, as
// the inner one must allow.
#ifndef LORAHUB_CORE_SERVING_CACHED_MODULE_RESOLVER_H_
#define LORAHUB_CORE_SERVING_CACHED_MODULE_RESOLVER_H_

#include <cstdint>
#include <functional>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/serving/adapter_cache.h"

namespace lorahub::serving {

struct CachedResolverOptions {
  // Answers older than this are asked again.
  absl::Duration max_age = absl::Seconds(1);
  // The inner resolver's data version; a change drops every answer. Null:
  // only max_age.
  std::function<uint64_t()> version;
  // The clock (tests); null: absl::Now.
  std::function<absl::Time()> now;
};

ModuleResolver CachedModuleResolver(ModuleResolver inner, CachedResolverOptions options);

}  // namespace lorahub::serving

#endif  // LORAHUB_CORE_SERVING_CACHED_MODULE_RESOLVER_H_
