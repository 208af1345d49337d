// Per-RPC metrics for every service of the server, recorded in one place: a
// gRPC server interceptor installed on the ServerBuilder.
//
// For each call it takes the time when the interceptor is created (the call
// arrived: gRPC creates server interceptors when it starts handling the RPC)
// and, when the server sends the final status (PRE_SEND_STATUS), records
// ServiceMetrics::RecordRequest(method, code, seconds):
//   lorahub_grpc_requests_total{method, code}
//   lorahub_grpc_request_duration_seconds{method}
// `method` is the bare method name of the full path "/pkg.Service/Method";
// names outside ServiceMetrics' fixed set become "other", so labels stay
// bounded whatever a client calls. A call that ends without the server
// sending a status (the client cancelled or the deadline passed first) is
// recorded when the call is torn down, as CANCELLED.
//
// The services themselves do no request counting.
//
// Thread-safety: one interceptor per call; ServiceMetrics is thread-safe.
// Ownership: `metrics` is borrowed and must outlive the server.
#ifndef LORAHUB_SERVER_RPC_METRICS_INTERCEPTOR_H_
#define LORAHUB_SERVER_RPC_METRICS_INTERCEPTOR_H_

#include <memory>
#include <vector>

#include "core/metrics/metrics.h"
#include "grpcpp/support/server_interceptor.h"

namespace lorahub::server {

class RpcMetricsInterceptorFactory
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit RpcMetricsInterceptorFactory(metrics::ServiceMetrics* metrics)
      : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  metrics::ServiceMetrics* metrics_;
};

// The factory list to hand to ServerBuilder::experimental()
// .SetInterceptorCreators(); empty when `metrics` is null.
std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
RpcMetricsInterceptors(metrics::ServiceMetrics* metrics);

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_RPC_METRICS_INTERCEPTOR_H_
