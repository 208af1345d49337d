// Drives the real HubClient (libcurl) against the local hub emulator
// (tests/hub/hub_emulator.py) on 127.0.0.1. Expected digests come from the
// emulator (Python hashlib) through its model-info API, not from the client.
#include "core/hub/hub_client.h"

#include <dirent.h>
#include <sys/stat.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/hub/hub_emulator_process.h"

namespace lorahub::hub {
namespace {

using testing::HubEmulator;
using testing::LoggedRequest;
using testing::TempDir;

constexpr char kRepo[] = "lorahub/flan_t5_tiny-test";
constexpr char kCommit1[] = "1111111111111111111111111111111111111111";
constexpr char kCommit2[] = "2222222222222222222222222222222222222222";
constexpr char kBinOnlyRepo[] = "lorahub/bin-only";
constexpr char kPrivateRepo[] = "acme/private";
constexpr char kGatedRepo[] = "acme/gated";
constexpr char kToken[] = "hf_secret_token";
constexpr size_t kLfsSize = 300000;

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string out(n, '\0');
  for (char& c : out) c = static_cast<char>(rng() & 0xff);
  return out;
}

std::string Hex(const std::string& s) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
  }
  return out;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

bool Exists(const std::string& path) {
  struct stat st;
  return lstat(path.c_str(), &st) == 0;
}

std::string ReadLink(const std::string& path) {
  char buf[4096];
  ssize_t n = readlink(path.c_str(), buf, sizeof(buf));
  return n < 0 ? "" : std::string(buf, n);
}

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      std::string name = e->d_name;
      if (name != "." && name != "..") out.push_back(name);
    }
    closedir(d);
  }
  return out;
}

const std::string& LfsContent() {
  static const std::string* s = new std::string(RandomBytes(kLfsSize, 7));
  return *s;
}
const std::string kConfigV1 = R"({"peft_type": "LORA", "r": 16, "lora_alpha": 32})";
const std::string kConfigV2 = R"({"peft_type": "LORA", "r": 8, "lora_alpha": 16})";
const std::string kNested = "nested file\n";

nlohmann::json Fixture() {
  nlohmann::json lfs = {{"hex", Hex(LfsContent())}, {"lfs", true}};
  nlohmann::json bin = {{"hex", Hex(RandomBytes(5000, 9))}, {"lfs", true}};
  nlohmann::json repos;
  repos[kRepo] = {
      {"refs", {{"main", kCommit1}, {"refs/pr/1", kCommit2}}},
      {"renamed_from", {"lorahub/old-name"}},
      {"commits",
       {{kCommit1,
         {{"files",
           {{"adapter_config.json", {{"text", kConfigV1}}},
            {"adapter_model.safetensors", lfs},
            {"sub/dir/nested.txt", {{"text", kNested}}}}}}},
        {kCommit2,
         {{"files",
           {{"adapter_config.json", {{"text", kConfigV2}}},
            {"adapter_model.safetensors", lfs}}}}}}}};
  repos[kBinOnlyRepo] = {
      {"refs", {{"main", kCommit1}}},
      {"commits",
       {{kCommit1,
         {{"files",
           {{"adapter_config.json", {{"text", kConfigV1}}},
            {"adapter_model.bin", bin}}}}}}}};
  repos[kPrivateRepo] = {
      {"refs", {{"main", kCommit1}}},
      {"tokens", {kToken}},
      {"commits",
       {{kCommit1, {{"files", {{"adapter_config.json", {{"text", kConfigV1}}}}}}}}}};
  repos[kGatedRepo] = {
      {"refs", {{"main", kCommit1}}},
      {"gated", true},
      {"commits",
       {{kCommit1, {{"files", {{"adapter_config.json", {{"text", kConfigV1}}}}}}}}}};
  return {{"repos", repos}};
}

class HubClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* var : {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
                            "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT",
                            "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"}) {
      unsetenv(var);
    }
    setenv("HF_HOME", (home_.path() + "/hf_home").c_str(), 1);
    auto emu = HubEmulator::Start(Fixture());
    ASSERT_TRUE(emu.ok()) << emu.status();
    emu_ = std::move(*emu);
    cache_dir_ = cache_.path() + "/hub";
  }

  HubClientOptions Options() const {
    HubClientOptions o;
    o.endpoint = emu_->endpoint();
    o.cache_dir = cache_dir_;
    o.token = "";
    o.offline = false;
    o.initial_backoff_ms = 10;
    o.max_backoff_ms = 40;
    return o;
  }

  std::unique_ptr<HubClient> Client(HubClientOptions o) const {
    auto c = HubClient::Create(std::move(o));
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }
  std::unique_ptr<HubClient> Client() const { return Client(Options()); }

  std::string RepoDir(const std::string& repo = kRepo) const {
    return cache_dir_ + "/" + HubCache::RepoFolderName(repo);
  }

  // sha256 of adapter_model.safetensors as the emulator computed it.
  std::string EmulatorSha256(const std::string& file) const {
    nlohmann::json info = emu_->Get(absl::StrCat("/api/models/", kRepo, "?blobs=true"));
    for (const auto& s : info["siblings"]) {
      if (s["rfilename"] == file) return s["lfs"]["sha256"];
    }
    return "";
  }
  std::string EmulatorBlobId(const std::string& file) const {
    nlohmann::json info = emu_->Get(absl::StrCat("/api/models/", kRepo, "?blobs=true"));
    for (const auto& s : info["siblings"]) {
      if (s["rfilename"] == file) return s["blobId"];
    }
    return "";
  }

  // Nothing of a failed LFS download may be visible in blobs/ or snapshots/.
  void ExpectNoLfsBlob() const {
    std::string sha = EmulatorSha256("adapter_model.safetensors");
    EXPECT_FALSE(Exists(RepoDir() + "/blobs/" + sha));
    EXPECT_FALSE(Exists(absl::StrCat(RepoDir(), "/snapshots/", kCommit1,
                                     "/adapter_model.safetensors")));
  }

  TempDir home_;
  TempDir cache_;
  std::string cache_dir_;
  std::unique_ptr<HubEmulator> emu_;
};

TEST_F(HubClientTest, DownloadsLfsAndGitFilesIntoHfCacheLayout) {
  auto client = Client();
  auto lfs = client->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_TRUE(lfs.ok()) << lfs.status();
  EXPECT_EQ(lfs->commit, kCommit1);
  EXPECT_FALSE(lfs->from_cache);
  EXPECT_EQ(ReadFile(lfs->path), LfsContent());
  const std::string sha = EmulatorSha256("adapter_model.safetensors");
  ASSERT_EQ(sha.size(), 64u);
  EXPECT_EQ(lfs->etag, sha);
  EXPECT_EQ(lfs->path, absl::StrCat(RepoDir(), "/snapshots/", kCommit1,
                                    "/adapter_model.safetensors"));
  EXPECT_EQ(ReadLink(lfs->path), "../../blobs/" + sha);
  EXPECT_EQ(ReadFile(RepoDir() + "/blobs/" + sha), LfsContent());
  EXPECT_EQ(ReadFile(RepoDir() + "/refs/main"), kCommit1);
  EXPECT_TRUE(Exists(cache_dir_ + "/.locks/" + HubCache::RepoFolderName(kRepo) +
                     "/" + sha + ".lock"));
  EXPECT_FALSE(Exists(RepoDir() + "/blobs/" + sha + ".incomplete"));

  auto git = client->Download(kRepo, "main", "adapter_config.json");
  ASSERT_TRUE(git.ok()) << git.status();
  EXPECT_EQ(ReadFile(git->path), kConfigV1);
  EXPECT_EQ(ReadLink(git->path), "../../blobs/" + EmulatorBlobId("adapter_config.json"));

  auto nested = client->Download(kRepo, "main", "sub/dir/nested.txt");
  ASSERT_TRUE(nested.ok()) << nested.status();
  EXPECT_EQ(ReadFile(nested->path), kNested);
  EXPECT_TRUE(absl::StartsWith(ReadLink(nested->path), "../../../../blobs/"));

  // HEAD to the hub, then GET of the LFS file on the CDN host.
  std::vector<LoggedRequest> log = emu_->Log();
  ASSERT_GE(log.size(), 2u);
  EXPECT_EQ(log[0].method, "HEAD");
  EXPECT_EQ(log[0].host, "hub");
  EXPECT_EQ(log[1].method, "GET");
  EXPECT_EQ(log[1].host, "cdn");
  EXPECT_EQ(emu_->Count("GET", "cdn"), 1);
  EXPECT_EQ(emu_->Count("HEAD", "cdn"), 0);  // the HEAD never follows the 302
}

TEST_F(HubClientTest, RefusesFilesOverTheSizeLimit) {
  HubClientOptions o = Options();
  o.max_file_bytes = kLfsSize - 1;
  auto big = Client(o)->Download(kRepo, "main", "adapter_model.safetensors");
  EXPECT_TRUE(absl::IsResourceExhausted(big.status())) << big.status();
  EXPECT_EQ(emu_->Count("GET", ""), 0);
}

TEST_F(HubClientTest, CachedFileIsNotDownloadedAgain) {
  auto client = Client();
  ASSERT_TRUE(client->Download(kRepo, "main", "adapter_model.safetensors").ok());
  ASSERT_TRUE(client->Download(kRepo, "main", "adapter_config.json").ok());
  emu_->Reset();
  auto again = client->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->from_cache);
  EXPECT_EQ(emu_->Count("GET", ""), 0);
  EXPECT_EQ(emu_->Count("HEAD", "hub"), 1);  // the branch may have moved

  // A commit-pinned cached file needs no request at all (§11.2 item 6).
  emu_->Reset();
  auto pinned = Client()->Download(kRepo, kCommit1, "adapter_config.json");
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  EXPECT_EQ(ReadFile(pinned->path), kConfigV1);
  EXPECT_EQ(emu_->Log().size(), 0u);
}

TEST_F(HubClientTest, ReusesBlobsAlreadyInTheCache) {
  // Another tool fetched the blob; a new commit with the same content only
  // needs a new snapshot link.
  auto client = Client();
  ASSERT_TRUE(client->Download(kRepo, "main", "adapter_model.safetensors").ok());
  emu_->Reset();
  auto pr = client->Download(kRepo, "refs/pr/1", "adapter_model.safetensors");
  ASSERT_TRUE(pr.ok()) << pr.status();
  EXPECT_EQ(pr->commit, kCommit2);
  EXPECT_EQ(ReadFile(pr->path), LfsContent());
  EXPECT_EQ(emu_->Count("GET", ""), 0);
  std::vector<LoggedRequest> log = emu_->Log();
  ASSERT_EQ(log.size(), 1u);
  EXPECT_TRUE(absl::StrContains(log[0].path, "/resolve/refs%2Fpr%2F1/")) << log[0].path;
  EXPECT_EQ(ReadFile(RepoDir() + "/refs/refs/pr/1"), kCommit2);
}

TEST_F(HubClientTest, ResumesWithRangeAfterDroppedConnection) {
  emu_->AddFault({{"kind", "drop_after_bytes"}, {"bytes", 100000}, {"count", 2},
                  {"host", "cdn"}});
  auto client = Client();
  auto file = client->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(ReadFile(file->path), LfsContent());
  std::vector<std::string> ranges;
  for (const LoggedRequest& r : emu_->Log()) {
    if (r.method == "GET") ranges.push_back(r.range);
  }
  // Each drop happens 100000 bytes into that response's body.
  ASSERT_EQ(ranges.size(), 3u);
  EXPECT_EQ(ranges[0], "");
  EXPECT_EQ(ranges[1], "bytes=100000-");
  EXPECT_EQ(ranges[2], "bytes=200000-");
}

TEST_F(HubClientTest, ResumesAcrossCallsFromIncompleteFile) {
  emu_->AddFault({{"kind", "drop_after_bytes"}, {"bytes", 123456}, {"count", 1},
                  {"host", "cdn"}});
  HubClientOptions o = Options();
  o.max_retries = 0;
  auto failed = Client(o)->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_FALSE(failed.ok());
  EXPECT_TRUE(absl::IsUnavailable(failed.status())) << failed.status();
  const std::string sha = EmulatorSha256("adapter_model.safetensors");
  struct stat st;
  ASSERT_EQ(stat((RepoDir() + "/blobs/" + sha + ".incomplete").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 123456);
  ExpectNoLfsBlob();

  emu_->Reset();
  auto file = Client(o)->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(ReadFile(file->path), LfsContent());
  std::vector<LoggedRequest> log = emu_->Log();
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[1].range, "bytes=123456-");
}

TEST_F(HubClientTest, RestartsFromZeroWhenServerIgnoresRange) {
  emu_->AddFault({{"kind", "drop_after_bytes"}, {"bytes", 50000}, {"count", 1},
                  {"host", "cdn"}});
  HubClientOptions o = Options();
  o.max_retries = 0;
  ASSERT_FALSE(Client(o)->Download(kRepo, "main", "adapter_model.safetensors").ok());
  emu_->AddFault({{"kind", "ignore_range"}, {"host", "cdn"}});
  auto file = Client(o)->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(ReadFile(file->path), LfsContent());
}

TEST_F(HubClientTest, RetriesServerErrorsThenSucceeds) {
  emu_->AddFault({{"kind", "status"}, {"status", 500}, {"count", 2}, {"method", "HEAD"}});
  emu_->AddFault({{"kind", "status"}, {"status", 503}, {"count", 1}, {"host", "cdn"}});
  emu_->AddFault({{"kind", "status"}, {"status", 429}, {"count", 1}, {"host", "cdn"}});
  auto file = Client()->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(ReadFile(file->path), LfsContent());
  EXPECT_EQ(emu_->Count("HEAD", "hub"), 3);
  EXPECT_EQ(emu_->Count("GET", "cdn"), 3);
}

TEST_F(HubClientTest, PersistentServerErrorIsUnavailableUnlessCached) {
  emu_->AddFault({{"kind", "status"}, {"status", 502}});
  HubClientOptions o = Options();
  o.max_retries = 2;
  auto failed = Client(o)->Download(kRepo, "main", "adapter_config.json");
  ASSERT_FALSE(failed.ok());
  EXPECT_TRUE(absl::IsUnavailable(failed.status())) << failed.status();
  EXPECT_EQ(emu_->Count("HEAD", "hub"), 3);  // 1 + 2 retries

  // With a cached snapshot, 5xx falls back to it (hub_protocol.md §10.3).
  emu_->Reset();
  ASSERT_TRUE(Client(o)->Download(kRepo, "main", "adapter_config.json").ok());
  emu_->AddFault({{"kind", "status"}, {"status", 500}});
  auto cached = Client(o)->Download(kRepo, "main", "adapter_config.json");
  ASSERT_TRUE(cached.ok()) << cached.status();
  EXPECT_TRUE(cached->from_cache);
  EXPECT_EQ(ReadFile(cached->path), kConfigV1);
}

TEST_F(HubClientTest, CorruptLfsBodyNeverEntersCache) {
  emu_->AddFault({{"kind", "corrupt_body"}, {"count", 1}, {"host", "cdn"}});
  auto client = Client();
  auto failed = client->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_FALSE(failed.ok());
  EXPECT_TRUE(absl::IsDataLoss(failed.status())) << failed.status();
  EXPECT_TRUE(absl::StrContains(failed.status().message(), "sha256"));
  ExpectNoLfsBlob();
  for (const std::string& name : ListDir(RepoDir() + "/blobs")) {
    ADD_FAILURE() << "unexpected file in blobs/: " << name;
  }
  auto file = client->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(ReadFile(file->path), LfsContent());
}

TEST_F(HubClientTest, CorruptGitFileFailsSha1Check) {
  emu_->AddFault({{"kind", "corrupt_body"}, {"count", 1}, {"method", "GET"}});
  auto failed = Client()->Download(kRepo, "main", "adapter_config.json");
  ASSERT_FALSE(failed.ok());
  EXPECT_TRUE(absl::IsDataLoss(failed.status())) << failed.status();
  EXPECT_TRUE(ListDir(RepoDir() + "/blobs").empty());
  EXPECT_FALSE(Exists(absl::StrCat(RepoDir(), "/snapshots/", kCommit1,
                                   "/adapter_config.json")));
}

TEST_F(HubClientTest, SizeMismatchIsConsistencyError) {
  emu_->AddFault({{"kind", "wrong_content_length"}, {"delta", -1}, {"count", 1},
                  {"method", "HEAD"}});
  auto failed = Client()->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_FALSE(failed.ok());
  EXPECT_TRUE(absl::IsDataLoss(failed.status())) << failed.status();
  EXPECT_TRUE(absl::StrContains(failed.status().message(), "consistency"));
  ExpectNoLfsBlob();
  EXPECT_TRUE(ListDir(RepoDir() + "/blobs").empty());
}

TEST_F(HubClientTest, MissingMetadataHeadersAreProtocolErrors) {
  for (const char* header : {"X-Repo-Commit", "ETag", "size"}) {
    SCOPED_TRACE(header);
    emu_->Reset();
    emu_->AddFault({{"kind", "omit_header"}, {"header", header}, {"method", "HEAD"}});
    auto failed = Client()->Download(kRepo, "main", "adapter_model.safetensors");
    ASSERT_FALSE(failed.ok());
    EXPECT_TRUE(absl::IsInternal(failed.status())) << failed.status();
    EXPECT_EQ(emu_->Count("GET", ""), 0);
  }
}

TEST_F(HubClientTest, WeakEtagIsNormalised) {
  emu_->AddFault({{"kind", "weak_etag"}});
  auto file = Client()->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->etag, EmulatorSha256("adapter_model.safetensors"));
}

TEST_F(HubClientTest, OfflineModeServesCacheOnly) {
  HubClientOptions o = Options();
  o.offline = true;
  auto missing = Client(o)->Download(kRepo, "main", "adapter_config.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(missing.status())) << missing.status();
  EXPECT_EQ(emu_->Log().size(), 0u);

  ASSERT_TRUE(Client()->Download(kRepo, "main", "adapter_config.json").ok());
  emu_->Reset();
  auto cached = Client(o)->Download(kRepo, "main", "adapter_config.json");
  ASSERT_TRUE(cached.ok()) << cached.status();
  EXPECT_EQ(cached->commit, kCommit1);
  EXPECT_EQ(ReadFile(cached->path), kConfigV1);

  // The same through the environment variable.
  setenv("HF_HUB_OFFLINE", "1", 1);
  HubClientOptions env = Options();
  env.offline.reset();
  auto client = Client(env);
  EXPECT_TRUE(*client->options().offline);
  EXPECT_TRUE(client->Download(kRepo, kCommit1, "adapter_config.json").ok());
  EXPECT_FALSE(client->Download(kRepo, "main", "adapter_model.safetensors").ok());
  EXPECT_EQ(emu_->Log().size(), 0u);
}

TEST_F(HubClientTest, HubDownFallsBackToCache) {
  ASSERT_TRUE(Client()->Download(kRepo, "main", "adapter_config.json").ok());
  HubClientOptions o = Options();
  o.endpoint = "http://127.0.0.1:1";  // nothing listens there
  o.max_retries = 1;
  auto cached = Client(o)->Download(kRepo, "main", "adapter_config.json");
  ASSERT_TRUE(cached.ok()) << cached.status();
  EXPECT_EQ(ReadFile(cached->path), kConfigV1);
  auto missing = Client(o)->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(absl::IsUnavailable(missing.status())) << missing.status();
}

TEST_F(HubClientTest, TokenIsSentAsBearerAndNotToTheCdn) {
  auto anonymous = Client()->Download(kPrivateRepo, "main", "adapter_config.json");
  ASSERT_FALSE(anonymous.ok());
  EXPECT_TRUE(absl::IsUnauthenticated(anonymous.status())) << anonymous.status();

  HubClientOptions wrong = Options();
  wrong.token = "hf_wrong";
  auto denied = Client(wrong)->Download(kPrivateRepo, "main", "adapter_config.json");
  EXPECT_TRUE(absl::IsUnauthenticated(denied.status())) << denied.status();

  HubClientOptions o = Options();
  o.token = kToken;
  auto file = Client(o)->Download(kPrivateRepo, "main", "adapter_config.json");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(ReadFile(file->path), kConfigV1);
  EXPECT_EQ(emu_->Log().back().auth, absl::StrCat("Bearer ", kToken));

  emu_->Reset();
  ASSERT_TRUE(Client(o)->Download(kRepo, "main", "adapter_model.safetensors").ok());
  for (const LoggedRequest& r : emu_->Log()) {
    if (r.host == "hub") {
      EXPECT_EQ(r.auth, absl::StrCat("Bearer ", kToken));
    } else {
      EXPECT_EQ(r.auth, "") << "token leaked to the CDN";
    }
  }
}

TEST_F(HubClientTest, TokenFromEnvironmentAndTokenFile) {
  HubClientOptions o = Options();
  o.token.reset();
  setenv("HF_TOKEN", kToken, 1);
  EXPECT_TRUE(Client(o)->Download(kPrivateRepo, "main", "adapter_config.json").ok());
  unsetenv("HF_TOKEN");
  EXPECT_EQ(*Client(o)->options().token, "");

  std::string hf_home = home_.path() + "/hf_home";
  mkdir(hf_home.c_str(), 0755);
  std::ofstream(hf_home + "/token") << kToken << "\n";
  auto client = Client(o);
  EXPECT_EQ(*client->options().token, kToken);
  emu_->Reset();
  EXPECT_TRUE(client->Download(kPrivateRepo, kCommit1, "adapter_config.json").ok());
}

TEST_F(HubClientTest, NotFoundErrorsNameTheCauseAndAreNotMasked) {
  auto client = Client();
  auto repo = client->Download("lorahub/no-such-repo", "main", "adapter_config.json");
  EXPECT_TRUE(absl::IsNotFound(repo.status())) << repo.status();
  EXPECT_TRUE(absl::StrContains(repo.status().message(), "RepoNotFound"));

  auto rev = client->Download(kRepo, "no-such-branch", "adapter_config.json");
  EXPECT_TRUE(absl::IsNotFound(rev.status())) << rev.status();
  EXPECT_TRUE(absl::StrContains(rev.status().message(), "RevisionNotFound"));

  auto entry = client->Download(kRepo, "main", "missing.bin");
  EXPECT_TRUE(absl::IsNotFound(entry.status())) << entry.status();
  EXPECT_TRUE(absl::StrContains(entry.status().message(), "EntryNotFound"));
  EXPECT_TRUE(Exists(absl::StrCat(RepoDir(), "/.no_exist/", kCommit1, "/missing.bin")));
  // The marker answers a pinned request without the network.
  emu_->Reset();
  EXPECT_TRUE(absl::IsNotFound(client->Download(kRepo, kCommit1, "missing.bin").status()));
  EXPECT_EQ(emu_->Log().size(), 0u);

  auto gated = client->Download(kGatedRepo, "main", "adapter_config.json");
  EXPECT_TRUE(absl::IsPermissionDenied(gated.status())) << gated.status();
}

TEST_F(HubClientTest, RefusesBadNamesWithoutAnyRequest) {
  auto client = Client();
  for (const char* repo : {"", "../etc", "a/b/c", "/abs", "org/..", "a--b",
                           "org/-name", "org/name.", "org/na me", "org\\name"}) {
    auto r = client->Download(repo, "main", "adapter_config.json");
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << "repo '" << repo << "': " << r.status();
  }
  for (const char* file : {"", "../x", "/etc/passwd", "a/../../b", "C:\\x", "a\\b",
                           "a//b", "./a", "dir/", "a\nb"}) {
    auto r = client->Download(kRepo, "main", file);
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << "file '" << file << "': " << r.status();
  }
  for (const char* rev : {"..", "a/../b", "/main", "main/", "ma in", "a%2Fb"}) {
    auto r = client->Download(kRepo, rev, "adapter_config.json");
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << "rev '" << rev << "': " << r.status();
  }
  EXPECT_EQ(emu_->Log().size(), 0u);
  EXPECT_FALSE(Exists(cache_dir_));
}

TEST_F(HubClientTest, ConcurrentRequestsForOneFileDownloadItOnce) {
  // Slow the body down so that all threads overlap the transfer.
  emu_->AddFault({{"kind", "stall_ms"}, {"ms", 400}, {"where", "body"}, {"host", "cdn"}});
  auto client = Client();
  constexpr int kThreads = 8;
  std::vector<absl::StatusOr<CachedFile>> results(kThreads, absl::UnknownError(""));
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      results[i] = client->Download(kRepo, "main", "adapter_model.safetensors");
    });
  }
  for (std::thread& t : threads) t.join();
  for (const auto& r : results) {
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(ReadFile(r->path), LfsContent());
  }
  EXPECT_EQ(emu_->Count("GET", "cdn"), 1);
}

TEST_F(HubClientTest, ConcurrentProcessesShareTheCacheSafely) {
  // Two processes (this one and a fork) download the same blob at once; the
  // flock makes them take turns and one complete blob results.
  emu_->AddFault({{"kind", "stall_ms"}, {"ms", 300}, {"where", "body"}, {"host", "cdn"}});
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto c = HubClient::Create(Options());
    bool ok = c.ok() && (*c)->Download(kRepo, "main", "adapter_model.safetensors").ok();
    _exit(ok ? 0 : 1);
  }
  auto file = Client()->Download(kRepo, "main", "adapter_model.safetensors");
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_EQ(ReadFile(file->path), LfsContent());
  EXPECT_EQ(emu_->Count("GET", "cdn"), 1);
}

TEST_F(HubClientTest, ProcessKilledMidDownloadLeavesOnlyIncompleteFile) {
  // The emulator sends half the body, then stalls; the child is killed then.
  emu_->AddFault({{"kind", "stall_ms"}, {"ms", 3000}, {"where", "body"},
                  {"host", "cdn"}, {"count", 1}});
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto c = HubClient::Create(Options());
    if (c.ok()) (*c)->Download(kRepo, "main", "adapter_model.safetensors").IgnoreError();
    _exit(0);
  }
  const std::string sha = EmulatorSha256("adapter_model.safetensors");
  const std::string incomplete = RepoDir() + "/blobs/" + sha + ".incomplete";
  struct stat st;
  for (int i = 0; i < 200; ++i) {
    if (stat(incomplete.c_str(), &st) == 0 && st.st_size == kLfsSize / 2) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  ASSERT_EQ(stat(incomplete.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, static_cast<off_t>(kLfsSize / 2));
  ExpectNoLfsBlob();

  // The lock died with the child; this process resumes from the partial file.
  auto file = Client()->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(ReadFile(file->path), LfsContent());
  EXPECT_EQ(emu_->Log().back().range, absl::StrCat("bytes=", kLfsSize / 2, "-"));
}

TEST_F(HubClientTest, FollowsRelativeRedirectOfRenamedRepo) {
  auto file = Client()->Download("lorahub/old-name", "main", "adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(ReadFile(file->path), LfsContent());
  std::vector<LoggedRequest> log = emu_->Log();
  ASSERT_EQ(log.size(), 3u);
  EXPECT_TRUE(absl::StartsWith(log[0].path, "/lorahub/old-name/resolve/"));
  EXPECT_TRUE(absl::StartsWith(log[1].path, absl::StrCat("/", kRepo, "/resolve/")));
  EXPECT_EQ(log[1].method, "HEAD");
  EXPECT_EQ(log[2].host, "cdn");
}

TEST_F(HubClientTest, GetFollowsRedirects) {
  // HEAD answers 200, the GET is redirected (relative) to the pinned URL.
  emu_->AddFault({{"kind", "redirect"}, {"method", "GET"}, {"count", 1},
                  {"location", absl::StrCat("/", kRepo, "/resolve/", kCommit1,
                                            "/adapter_config.json")}});
  auto file = Client()->Download(kRepo, "main", "adapter_config.json");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(ReadFile(file->path), kConfigV1);
  EXPECT_EQ(emu_->Count("GET", "hub"), 2);
}

TEST_F(HubClientTest, DownServerIsUnavailable) {
  emu_->AddFault({{"kind", "down"}});
  HubClientOptions o = Options();
  o.max_retries = 2;
  auto failed = Client(o)->Download(kRepo, "main", "adapter_config.json");
  ASSERT_FALSE(failed.ok());
  EXPECT_TRUE(absl::IsUnavailable(failed.status())) << failed.status();
  EXPECT_EQ(emu_->Count("HEAD", "hub"), 3);
}

TEST_F(HubClientTest, MovedBranchGetsNewSnapshotAndKeepsOldOne) {
  auto client = Client();
  auto v1 = client->Download(kRepo, "main", "adapter_config.json");
  ASSERT_TRUE(v1.ok()) << v1.status();
  emu_->MoveRef(kRepo, "main", kCommit2);
  auto v2 = client->Download(kRepo, "main", "adapter_config.json");
  ASSERT_TRUE(v2.ok()) << v2.status();
  EXPECT_EQ(v2->commit, kCommit2);
  EXPECT_EQ(ReadFile(v2->path), kConfigV2);
  EXPECT_EQ(ReadFile(RepoDir() + "/refs/main"), kCommit2);
  EXPECT_EQ(ReadFile(v1->path), kConfigV1);
}

TEST_F(HubClientTest, DownloadAdapterPrefersSafetensorsAndFallsBackToBin) {
  auto client = Client();
  auto st = client->DownloadAdapter(kRepo, "main");
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->commit, kCommit1);
  EXPECT_EQ(st->snapshot_dir, absl::StrCat(RepoDir(), "/snapshots/", kCommit1));
  EXPECT_EQ(st->weights_path, st->snapshot_dir + "/adapter_model.safetensors");
  EXPECT_EQ(ReadFile(st->config_path), kConfigV1);

  auto bin = client->DownloadAdapter(kBinOnlyRepo, "");
  ASSERT_TRUE(bin.ok()) << bin.status();
  EXPECT_EQ(bin->weights_path, bin->snapshot_dir + "/adapter_model.bin");
  EXPECT_EQ(ReadFile(bin->weights_path).size(), 5000u);
  EXPECT_TRUE(Exists(absl::StrCat(RepoDir(kBinOnlyRepo), "/.no_exist/", kCommit1,
                                  "/adapter_model.safetensors")));
  // Cached and offline: no request.
  emu_->Reset();
  HubClientOptions o = Options();
  o.offline = true;
  auto offline = Client(o)->DownloadAdapter(kBinOnlyRepo, "main");
  ASSERT_TRUE(offline.ok()) << offline.status();
  EXPECT_EQ(offline->weights_path, bin->weights_path);
  EXPECT_EQ(emu_->Log().size(), 0u);
}

TEST_F(HubClientTest, ProgressReportsAndCancels) {
  std::vector<std::pair<uint64_t, uint64_t>> seen;
  auto file = Client()->Download(kRepo, "main", "adapter_model.safetensors",
                                 [&](uint64_t done, uint64_t total) {
                                   seen.emplace_back(done, total);
                                   return true;
                                 });
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back().first, kLfsSize);
  EXPECT_EQ(seen.back().second, kLfsSize);
  for (size_t i = 1; i < seen.size(); ++i) EXPECT_GE(seen[i].first, seen[i - 1].first);

  TempDir other;
  HubClientOptions o = Options();
  o.cache_dir = other.path();
  auto cancelled = Client(o)->Download(kRepo, "main", "adapter_model.safetensors",
                                       [](uint64_t done, uint64_t) { return done < 1000; });
  ASSERT_FALSE(cancelled.ok());
  EXPECT_TRUE(absl::IsCancelled(cancelled.status())) << cancelled.status();
  EXPECT_FALSE(Exists(absl::StrCat(other.path(), "/", HubCache::RepoFolderName(kRepo),
                                   "/snapshots/", kCommit1, "/adapter_model.safetensors")));
}

TEST_F(HubClientTest, StalledBodyTimesOutAndResumes) {
  // Half the body, then 3 s of silence: the 1 s low-speed limit aborts the
  // GET, and the retry resumes from the half with Range.
  emu_->AddFault({{"kind", "stall_ms"}, {"ms", 3000}, {"where", "body"},
                  {"host", "cdn"}, {"count", 1}});
  HubClientOptions o = Options();
  o.download_stall_timeout_ms = 1000;
  auto file = Client(o)->Download(kRepo, "main", "adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(ReadFile(file->path), LfsContent());
  EXPECT_EQ(emu_->Log().back().range, absl::StrCat("bytes=", kLfsSize / 2, "-"));
}

TEST_F(HubClientTest, MetadataTimeoutIsReported) {
  emu_->AddFault({{"kind", "stall_ms"}, {"ms", 2000}, {"method", "HEAD"}});
  HubClientOptions o = Options();
  o.metadata_timeout_ms = 300;
  o.max_retries = 1;
  auto failed = Client(o)->Download(kRepo, "main", "adapter_config.json");
  ASSERT_FALSE(failed.ok());
  EXPECT_TRUE(absl::IsDeadlineExceeded(failed.status())) << failed.status();
  EXPECT_EQ(emu_->Count("HEAD", "hub"), 2);
}

}  // namespace
}  // namespace lorahub::hub

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  std::string& script = lorahub::hub::testing::HubEmulator::ScriptPath();
  if (argc > 1) {
    script = argv[1];
  } else if (const char* env = std::getenv("HUB_EMULATOR")) {
    script = env;
  } else {
    script = "tests/hub/hub_emulator.py";
  }
  return RUN_ALL_TESTS();
}
