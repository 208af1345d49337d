// `lorahubctl`: command-line client of a running lorahub server.
//
// Exit codes: 0 success, 2 bad usage or a request the server rejected as
// invalid, 1 other failures (server unreachable, internal errors).
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "grpcpp/grpcpp.h"
#include "lorahub/v1/info.grpc.pb.h"

namespace {

constexpr int kExitUsage = 2;

int Usage() {
  std::fprintf(stderr,
               "usage: lorahubctl [--server HOST:PORT] <command>\n\n"
               "commands:\n"
               "  info       print the server's version, model and devices\n");
  return kExitUsage;
}

int Info(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = lorahub::v1::InfoService::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(10));
  lorahub::v1::ServerInfo info;
  grpc::Status status =
      stub->GetServerInfo(&context, lorahub::v1::GetServerInfoRequest(), &info);
  if (!status.ok()) {
    std::fprintf(stderr, "lorahubctl info: %s\n",
                 status.error_message().c_str());
    return status.error_code() == grpc::StatusCode::INVALID_ARGUMENT ? 2 : 1;
  }
  std::printf("version: %s\nbase_model: %s\n", info.version().c_str(),
              info.base_model().c_str());
  for (const std::string& device : info.devices()) {
    std::printf("device: %s\n", device.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string server = "127.0.0.1:50051";
  int i = 1;
  for (; i < argc && !std::strncmp(argv[i], "--", 2); ++i) {
    if (!std::strcmp(argv[i], "--server") && i + 1 < argc) {
      server = argv[++i];
    } else {
      return Usage();
    }
  }
  if (i >= argc) return Usage();
  auto channel =
      grpc::CreateChannel(server, grpc::InsecureChannelCredentials());
  if (!std::strcmp(argv[i], "info")) return Info(channel);
  return Usage();
}
