// lorahub.v1.ComposeService on gRPC's callback API, over the store and the
// compose worker (core/jobs). SubmitJob validates the spec, resolves a module
// sample into ids, inserts a QUEUED job and returns at once; the worker runs
// it. Unary RPCs are short SQLite transactions run inline.
//
// WatchJob replays the job's event log from the store and then follows it
// by polling every kWatchPollMs until the job ends. Each stream has its own
// thread (at most kMaxWatchers at once; RESOURCE_EXHAUSTED beyond), so no
// gRPC thread ever blocks.
//
// ExportTask composes the task's adapter on the first engine's thread
// (InferenceEngine::RunOnDevice, like a compose job's evaluations), writes it
// as a PEFT directory into a private temporary directory from a per-stream
// thread (at most kMaxExports at once), streams the files in chunks of at
// most kMaxExportChunkBytes and removes the directory.
//
// Thread-safety: all methods may be called concurrently.
#ifndef LORAHUB_SERVER_COMPOSE_SERVICE_H_
#define LORAHUB_SERVER_COMPOSE_SERVICE_H_

#include <atomic>
#include <functional>

#include "lorahub/v1/compose.grpc.pb.h"
#include "server/service_context.h"

namespace lorahub::server {

struct ComposeServiceOptions {
  int max_queued_jobs = 100;  // more -> RESOURCE_EXHAUSTED
  int max_budget = 10000;     // evaluations per job
  int max_modules = 64;       // modules per job
  int max_examples = 64;
  // Called after a job is queued (wakes the worker); may be empty.
  std::function<void()> on_submit;
};

class ComposeServiceImpl final : public lorahub::v1::ComposeService::CallbackService {
 public:
  static constexpr int kMaxWatchers = 64;
  static constexpr int kWatchPollMs = 100;
  static constexpr int kMaxExports = 4;
  static constexpr int kMaxExportChunkBytes = 1 << 20;

  ComposeServiceImpl(ServiceContext* context, ComposeServiceOptions options)
      : ctx_(context), options_(std::move(options)) {}
  // Waits until every watch and export stream has ended.
  ~ComposeServiceImpl();

  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const lorahub::v1::SubmitJobRequest* request,
                                      lorahub::v1::Job* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const lorahub::v1::GetJobRequest* request,
                                   lorahub::v1::Job* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const lorahub::v1::ListJobsRequest* request,
                                     lorahub::v1::ListJobsResponse* response) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const lorahub::v1::CancelJobRequest* request,
                                      lorahub::v1::Job* response) override;
  grpc::ServerWriteReactor<lorahub::v1::JobEvent>* WatchJob(
      grpc::CallbackServerContext* context,
      const lorahub::v1::WatchJobRequest* request) override;
  grpc::ServerUnaryReactor* GetTask(grpc::CallbackServerContext* context,
                                    const lorahub::v1::GetTaskRequest* request,
                                    lorahub::v1::Task* response) override;
  grpc::ServerUnaryReactor* ListTasks(grpc::CallbackServerContext* context,
                                      const lorahub::v1::ListTasksRequest* request,
                                      lorahub::v1::ListTasksResponse* response) override;
  grpc::ServerUnaryReactor* DeleteJob(grpc::CallbackServerContext* context,
                                      const lorahub::v1::DeleteJobRequest* request,
                                      lorahub::v1::DeleteJobResponse* response) override;
  grpc::ServerUnaryReactor* DeleteTask(grpc::CallbackServerContext* context,
                                       const lorahub::v1::DeleteTaskRequest* request,
                                       lorahub::v1::DeleteTaskResponse* response) override;
  grpc::ServerWriteReactor<lorahub::v1::ExportTaskChunk>* ExportTask(
      grpc::CallbackServerContext* context,
      const lorahub::v1::ExportTaskRequest* request) override;

  // Used by the watch reactors.
  ServiceContext* context() const { return ctx_; }
  std::atomic<int>& watchers() { return watchers_; }
  std::atomic<int>& exports() { return exports_; }

 private:
  ServiceContext* ctx_;
  const ComposeServiceOptions options_;
  std::atomic<int> watchers_{0};
  std::atomic<int> exports_{0};
};

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_COMPOSE_SERVICE_H_
