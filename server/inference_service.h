// lorahub.v1.InferenceService on gRPC's callback API. Handlers validate and
// tokenize the request, hand it to an engine (core/serving) and return; the
// engine thread queues each token's message on the stream, and the server's
// StreamPump threads (ServiceContext::pump) start the writes, one in flight
// per stream (the next from OnWriteDone). Nothing here blocks a
// gRPC thread except point reads of the store for `adapter.task` (the task,
// and for a ties / dare_linear task the job that published it, whose spec
// holds the composition parameters: jobs::LookUpTaskComposition).
#ifndef LORAHUB_SERVER_INFERENCE_SERVICE_H_
#define LORAHUB_SERVER_INFERENCE_SERVICE_H_

#include "lorahub/v1/inference.grpc.pb.h"
#include "server/service_context.h"

namespace lorahub::server {

class InferenceServiceImpl final
    : public lorahub::v1::InferenceService::CallbackService {
 public:
  explicit InferenceServiceImpl(ServiceContext* context) : ctx_(context) {}

  grpc::ServerWriteReactor<lorahub::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context,
      const lorahub::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Score(grpc::CallbackServerContext* context,
                                  const lorahub::v1::ScoreRequest* request,
                                  lorahub::v1::ScoreResponse* response) override;

 private:
  ServiceContext* ctx_;
};

// Converts the wire adapter reference (tasks are looked up in the store,
// with their method and its parameters). InvalidArgument naming the field,
// NotFound for an unknown task, FailedPrecondition for a ties / dare_linear
// task whose job is gone.
absl::StatusOr<serving::AdapterSpec> ToAdapterSpec(
    const lorahub::v1::AdapterRef& ref, ServiceContext* ctx);

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_INFERENCE_SERVICE_H_
