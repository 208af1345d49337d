// `lorahub serve`: runs the gRPC server until SIGINT/SIGTERM.
#include <csignal>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/grpcpp.h"
#include "server/cli/args.h"
#include "server/cli/command.h"
#include "server/info_service.h"

namespace lorahub::cli {
namespace {

volatile std::sig_atomic_t g_stop = 0;
void OnSignal(int) { g_stop = 1; }

}  // namespace

int RunServe(int argc, char** argv) {
  FlagSpec spec{{"listen", "model", "device"}, {}};
  absl::StatusOr<Args> args = Args::Parse(argc, argv, 2, spec);
  if (!args.ok()) return ReportError("serve", args.status());
  std::string listen = args->Get("listen").value_or("127.0.0.1:50051");
  std::vector<std::string> devices =
      absl::StrSplit(args->Get("device").value_or("cpu"), ',');

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  server::InfoServiceImpl info(args->Get("model").value_or(""), devices);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&info);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    return ReportError("serve", absl::InvalidArgumentError(absl::StrCat(
                                    "cannot listen on '", listen, "'")));
  }
  // The chosen port is printed so that tests can ask for port 0.
  std::string host = listen.substr(0, listen.rfind(':'));
  std::printf("listening on %s:%d\n", host.c_str(), port);
  std::fflush(stdout);

  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  while (!g_stop) {
    struct timespec delay = {0, 100 * 1000 * 1000};
    nanosleep(&delay, nullptr);
  }
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  return kExitOk;
}

}  // namespace lorahub::cli
