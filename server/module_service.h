// lorahub.v1.ModuleService on gRPC's callback API. Adding a module reads
// (and for hub repos downloads) files and validates the adapter against the
// base model: that work runs on a thread of its own (at most
// kMaxConcurrentAdds at once, RESOURCE_EXHAUSTED beyond), never on a gRPC
// thread. Get/List/Delete are point operations on the local SQLite store.
#ifndef LORAHUB_SERVER_MODULE_SERVICE_H_
#define LORAHUB_SERVER_MODULE_SERVICE_H_

#include <atomic>
#include <condition_variable>
#include <mutex>

#include "lorahub/v1/modules.grpc.pb.h"
#include "server/service_context.h"

namespace lorahub::server {

class ModuleServiceImpl final
    : public lorahub::v1::ModuleService::CallbackService {
 public:
  static constexpr int kMaxConcurrentAdds = 4;

  explicit ModuleServiceImpl(ServiceContext* context) : ctx_(context) {}
  // Waits for background adds and prefetches to end.
  ~ModuleServiceImpl();

  grpc::ServerUnaryReactor* AddModule(
      grpc::CallbackServerContext* context,
      const lorahub::v1::AddModuleRequest* request,
      lorahub::v1::Module* response) override;
  grpc::ServerUnaryReactor* GetModule(
      grpc::CallbackServerContext* context,
      const lorahub::v1::GetModuleRequest* request,
      lorahub::v1::Module* response) override;
  grpc::ServerUnaryReactor* ListModules(
      grpc::CallbackServerContext* context,
      const lorahub::v1::ListModulesRequest* request,
      lorahub::v1::ListModulesResponse* response) override;
  grpc::ServerUnaryReactor* DeleteModule(
      grpc::CallbackServerContext* context,
      const lorahub::v1::DeleteModuleRequest* request,
      lorahub::v1::DeleteModuleResponse* response) override;
  grpc::ServerWriteReactor<lorahub::v1::PrefetchProgress>* PrefetchModule(
      grpc::CallbackServerContext* context,
      const lorahub::v1::PrefetchModuleRequest* request) override;

 private:
  bool TryBeginWork();
  void EndWork();

  ServiceContext* ctx_;
  std::mutex mu_;
  std::condition_variable cv_;
  int workers_ = 0;
};

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_MODULE_SERVICE_H_
