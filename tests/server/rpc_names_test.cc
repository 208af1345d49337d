// The metrics' fixed `method` label set (metrics::DefaultRpcNames) names
// every method of every lorahub.v1 service, read from the compiled proto
// descriptors: a new RPC that was not added there would be counted as
// "other" on the dashboard.
#include <set>
#include <string>

#include "core/metrics/metrics.h"
#include "google/protobuf/descriptor.h"
#include "gtest/gtest.h"
#include "lorahub/v1/compose.grpc.pb.h"
#include "lorahub/v1/inference.grpc.pb.h"
#include "lorahub/v1/info.grpc.pb.h"
#include "lorahub/v1/modules.grpc.pb.h"

namespace lorahub {
namespace {

TEST(RpcNamesTest, DefaultRpcNamesCoverEveryLorahubMethod) {
  const std::set<std::string> names(metrics::DefaultRpcNames().begin(),
                                     metrics::DefaultRpcNames().end());
  const google::protobuf::DescriptorPool* pool =
      google::protobuf::DescriptorPool::generated_pool();
  int methods = 0;
  for (const char* service :
       {v1::ModuleService::service_full_name(),
        v1::ComposeService::service_full_name(),
        v1::InferenceService::service_full_name(),
        v1::InfoService::service_full_name()}) {
    const google::protobuf::ServiceDescriptor* d =
        pool->FindServiceByName(service);
    ASSERT_NE(d, nullptr) << service;
    for (int i = 0; i < d->method_count(); ++i, ++methods) {
      EXPECT_TRUE(names.count(d->method(i)->name()))
          << service << "/" << d->method(i)->name()
          << " is not in metrics::DefaultRpcNames()";
    }
  }
  EXPECT_GE(methods, 18);  // As of DeleteJob: 5 + 10 + 2 + 1.
}

}  // namespace
}  // namespace lorahub
