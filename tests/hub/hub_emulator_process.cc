#include "tests/hub/hub_emulator_process.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"

namespace lorahub::hub::testing {
namespace {

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) {
  return remove(path);
}

size_t Collect(char* data, size_t size, size_t n, void* user) {
  static_cast<std::string*>(user)->append(data, size * n);
  return size * n;
}

std::string AdminRequest(const std::string& url, const std::string* body) {
  CURL* curl = curl_easy_init();
  std::string out;
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, &Collect);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &out);
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, 10L);
  if (body != nullptr) {
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, body->c_str());
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE, static_cast<long>(body->size()));
  }
  CURLcode rc = curl_easy_perform(curl);
  curl_easy_cleanup(curl);
  if (rc != CURLE_OK) {
    fprintf(stderr, "admin request %s failed: %s\n", url.c_str(), curl_easy_strerror(rc));
  }
  return out;
}

}  // namespace

TempDir::TempDir() {
  const char* base = getenv("TEST_TMPDIR");
  std::string tmpl = absl::StrCat(base ? base : "/tmp", "/hubtest.XXXXXX");
  if (mkdtemp(tmpl.data()) == nullptr) {
    perror("mkdtemp");
    abort();
  }
  path_ = tmpl;
}

TempDir::~TempDir() {
  nftw(path_.c_str(), &RemoveEntry, 16, FTW_DEPTH | FTW_PHYS);
}

std::string& HubEmulator::ScriptPath() {
  static std::string path;
  return path;
}

absl::StatusOr<std::unique_ptr<HubEmulator>> HubEmulator::Start(
    const nlohmann::json& fixture) {
  std::unique_ptr<HubEmulator> emu(new HubEmulator());
  std::string fixture_path = emu->dir_.path() + "/fixture.json";
  std::ofstream(fixture_path) << fixture.dump();
  int in_pipe[2], out_pipe[2];
  if (pipe2(in_pipe, O_CLOEXEC) != 0 || pipe2(out_pipe, O_CLOEXEC) != 0) {
    return absl::InternalError("pipe failed");
  }
  const char* python = getenv("HUB_EMULATOR_PYTHON");
  std::string py = python ? python : "/usr/bin/python3";
  pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    dup2(in_pipe[0], 0);
    dup2(out_pipe[1], 1);
    execl(py.c_str(), py.c_str(), ScriptPath().c_str(), "--fixture",
          fixture_path.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  close(in_pipe[0]);
  close(out_pipe[1]);
  emu->pid_ = pid;
  emu->stdin_fd_ = in_pipe[1];
  std::string line;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (line.find('\n') == std::string::npos) {
    struct pollfd pfd = {out_pipe[0], POLLIN, 0};
    if (std::chrono::steady_clock::now() > deadline || poll(&pfd, 1, 200) < 0) break;
    if (pfd.revents == 0) continue;
    char buf[256];
    ssize_t n = read(out_pipe[0], buf, sizeof(buf));
    if (n <= 0) break;
    line.append(buf, n);
  }
  close(out_pipe[0]);
  if (sscanf(line.c_str(), "PORTS %d %d", &emu->hub_port_, &emu->cdn_port_) != 2) {
    return absl::InternalError(absl::StrCat("emulator ", ScriptPath(),
                                            " did not start; got '", line, "'"));
  }
  return emu;
}

HubEmulator::~HubEmulator() {
  if (stdin_fd_ >= 0) close(stdin_fd_);
  if (pid_ > 0) {
    for (int i = 0; i < 50; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

std::string HubEmulator::endpoint() const {
  return absl::StrCat("http://127.0.0.1:", hub_port_);
}

std::string HubEmulator::Post(const std::string& path, const std::string& body) const {
  return AdminRequest(endpoint() + path, &body);
}

nlohmann::json HubEmulator::Get(const std::string& path) const {
  return nlohmann::json::parse(AdminRequest(endpoint() + path, nullptr));
}

std::vector<LoggedRequest> HubEmulator::Log() const {
  std::vector<LoggedRequest> out;
  for (const auto& e : Get("/_admin/log")) {
    LoggedRequest r;
    r.method = e["method"];
    r.path = e["path"];
    r.host = e["host"];
    if (!e["range"].is_null()) r.range = e["range"];
    if (!e["auth"].is_null()) r.auth = e["auth"];
    out.push_back(r);
  }
  return out;
}

int HubEmulator::Count(const std::string& method, const std::string& host) const {
  int n = 0;
  for (const LoggedRequest& r : Log()) {
    if ((method.empty() || r.method == method) && (host.empty() || r.host == host)) ++n;
  }
  return n;
}

void HubEmulator::Reset() const { Post("/_admin/reset", "{}"); }

void HubEmulator::AddFault(const nlohmann::json& fault) const {
  Post("/_admin/fault", fault.dump());
}

void HubEmulator::MoveRef(const std::string& repo, const std::string& ref,
                          const std::string& commit) const {
  Post("/_admin/move_ref",
       nlohmann::json{{"repo", repo}, {"ref", ref}, {"commit", commit}}.dump());
}

}  // namespace lorahub::hub::testing
