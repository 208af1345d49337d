#include "server/rpc_metrics_interceptor.h"

#include <chrono>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "grpcpp/support/interceptor.h"

namespace lorahub::server {
namespace {

using grpc::experimental::InterceptionHookPoints;

class RpcMetricsInterceptor : public grpc::experimental::Interceptor {
 public:
  RpcMetricsInterceptor(metrics::ServiceMetrics* metrics,
                        grpc::experimental::ServerRpcInfo* info)
      : metrics_(metrics),
        method_(info->method() ? info->method() : ""),
        start_(std::chrono::steady_clock::now()) {}

  // The call is torn down: if no status was sent, the client went away.
  // (The server context is being destroyed by then, so it is not asked
  // whether a deadline passed: such calls count as CANCELLED.)
  ~RpcMetricsInterceptor() override { Record(absl::StatusCode::kCancelled); }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            InterceptionHookPoints::PRE_SEND_STATUS)) {
      Record(static_cast<absl::StatusCode>(methods->GetSendStatus().error_code()));
    }
    methods->Proceed();
  }

 private:
  void Record(absl::StatusCode code) {
    if (recorded_) return;
    recorded_ = true;
    const double seconds = std::chrono::duration<double>(
                               std::chrono::steady_clock::now() - start_)
                               .count();
    metrics_->RecordRequest(method_, code, seconds);
  }

  metrics::ServiceMetrics* metrics_;
  std::string method_;
  std::chrono::steady_clock::time_point start_;
  // Interception hooks of one call run one at a time.
  bool recorded_ = false;
};

}  // namespace

grpc::experimental::Interceptor*
RpcMetricsInterceptorFactory::CreateServerInterceptor(
    grpc::experimental::ServerRpcInfo* info) {
  return new RpcMetricsInterceptor(metrics_, info);
}

std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
RpcMetricsInterceptors(metrics::ServiceMetrics* metrics) {
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>>
      out;
  if (metrics != nullptr) {
    out.push_back(std::make_unique<RpcMetricsInterceptorFactory>(metrics));
  }
  return out;
}

}  // namespace lorahub::server
