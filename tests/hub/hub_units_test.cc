// Unit tests of the hub building blocks that need no server: digests against
// published test vectors, name validation, URL helpers, error mapping and the
// cache layout primitives.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/hub/file_digest.h"
#include "core/hub/http_transfer.h"
#include "core/hub/hub_cache.h"
#include "core/hub/hub_client.h"
#include "core/hub/hub_validation.h"
#include "gtest/gtest.h"

namespace lorahub::hub {
namespace {

std::string TempRoot() {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string tmpl = absl::StrCat(base ? base : "/tmp", "/hubunits.XXXXXX");
  EXPECT_NE(mkdtemp(tmpl.data()), nullptr);
  return tmpl;
}

TEST(FileDigestTest, MatchesPublishedVectors) {
  // FIPS 180-2 "abc" and the empty string.
  EXPECT_EQ(Sha256Hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256Hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  // `git hash-object` of an empty file and of "{}".
  EXPECT_EQ(GitBlobSha1Hex(""), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
  EXPECT_EQ(GitBlobSha1Hex("{}"), "9e26dfeeb6e641a33dae4961196235bdb965b21b");
}

TEST(FileDigestTest, VerifiesFilesAgainstEtags) {
  std::string path = TempRoot() + "/f";
  std::ofstream(path) << "abc";
  EXPECT_TRUE(VerifyFileAgainstEtag(
      path, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad").ok());
  absl::Status bad = VerifyFileAgainstEtag(
      path, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ae");
  EXPECT_TRUE(absl::IsDataLoss(bad)) << bad;
  EXPECT_NE(bad.message().find(path), absl::string_view::npos);
  auto sha1 = GitBlobSha1HexOfFile(path);
  ASSERT_TRUE(sha1.ok());
  EXPECT_TRUE(VerifyFileAgainstEtag(path, *sha1).ok());
  EXPECT_TRUE(absl::IsDataLoss(
      VerifyFileAgainstEtag(path, "0000000000000000000000000000000000000000")));
  EXPECT_TRUE(absl::IsNotFound(Sha256HexOfFile(path + ".missing").status()));
}

TEST(ValidationTest, RepoIds) {
  for (const char* ok : {"gpt2", "org/name", "lorahub/flan_t5_large-wiki_qa",
                         "a.b/c_d-e", "_x/y_"}) {
    EXPECT_TRUE(ValidateRepoId(ok).ok()) << ok;
  }
  const std::string too_long(97, 'a');
  for (const std::string& bad : std::vector<std::string>{
           "", "/", "a/", "/a", "a/b/c", "..", "a/..", "a--b", "-a", "a.", "a b",
           too_long}) {
    EXPECT_TRUE(absl::IsInvalidArgument(ValidateRepoId(bad))) << bad;
  }
}

TEST(ValidationTest, FilenamesAndRevisions) {
  for (const char* ok : {"adapter_model.bin", "sub/dir/x.json", "a b(1).txt"}) {
    EXPECT_TRUE(ValidateFilename(ok).ok()) << ok;
  }
  for (const char* bad : {"", "/abs", "../x", "a/../b", "a/./b", "a//b", "a/",
                          "C:x", "a\\b", "a\x01", "a?b", "%2e%2e"}) {
    EXPECT_TRUE(absl::IsInvalidArgument(ValidateFilename(bad))) << bad;
  }
  for (const char* ok : {"main", "v1.0", "refs/pr/1",
                         "0123456789abcdef0123456789abcdef01234567"}) {
    EXPECT_TRUE(ValidateRevision(ok).ok()) << ok;
  }
  for (const char* bad : {"", "..", "a/..", "/main", "main/", "a b", "a%2F"}) {
    EXPECT_TRUE(absl::IsInvalidArgument(ValidateRevision(bad))) << bad;
  }
  EXPECT_TRUE(IsCommitHash("0123456789abcdef0123456789abcdef01234567"));
  EXPECT_FALSE(IsCommitHash("0123456789ABCDEF0123456789abcdef01234567"));
  EXPECT_FALSE(IsCommitHash("main"));
  EXPECT_TRUE(absl::IsInternal(ValidateEtag("../x")));
  EXPECT_TRUE(absl::IsInternal(ValidateEtag("")));
  EXPECT_TRUE(ValidateEtag("abc123").ok());
}

TEST(HttpHelpersTest, QuotingAndLocations) {
  EXPECT_EQ(UrlQuote("refs/pr/1", /*keep_slash=*/false), "refs%2Fpr%2F1");
  EXPECT_EQ(UrlQuote("a b/c~d.e", /*keep_slash=*/true), "a%20b/c~d.e");
  EXPECT_EQ(UrlOrigin("HTTP://Host:8080/x?y"), "http://host:8080");
  EXPECT_EQ(UrlOrigin("/relative"), "");
  EXPECT_EQ(ResolveLocation("http://h:1/a/b?q", "/api/x"), "http://h:1/api/x");
  EXPECT_EQ(ResolveLocation("http://h:1/a/b", "c"), "http://h:1/a/c");
  EXPECT_EQ(ResolveLocation("http://h:1/a", "https://cdn/x"), "https://cdn/x");
  EXPECT_EQ(NormalizeEtag("W/\"abc\""), "abc");
  EXPECT_EQ(NormalizeEtag("\"abc\""), "abc");
  EXPECT_EQ(NormalizeEtag("abc"), "abc");
}

TEST(HttpErrorTest, MapsHubErrorsToStatusCodes) {
  EXPECT_TRUE(absl::IsUnauthenticated(HubHttpError(401, "RepoNotFound", "", "x")));
  EXPECT_TRUE(absl::IsPermissionDenied(HubHttpError(403, "", "", "x")));
  EXPECT_TRUE(absl::IsPermissionDenied(HubHttpError(401, "GatedRepo", "", "x")));
  EXPECT_TRUE(absl::IsNotFound(HubHttpError(404, "RepoNotFound", "", "x")));
  EXPECT_TRUE(absl::IsNotFound(HubHttpError(404, "EntryNotFound", "", "x")));
  EXPECT_TRUE(absl::IsNotFound(HubHttpError(404, "", "", "x")));
  EXPECT_TRUE(absl::IsUnavailable(HubHttpError(503, "", "", "x")));
  EXPECT_TRUE(absl::IsUnavailable(HubHttpError(429, "", "", "x")));
  EXPECT_TRUE(absl::IsInternal(HubHttpError(418, "", "", "x")));
  absl::Status s = HubHttpError(404, "RevisionNotFound", "Invalid rev id: v9", "HEAD u");
  EXPECT_NE(s.message().find("Invalid rev id: v9"), absl::string_view::npos) << s;
}

TEST(HubCacheTest, LayoutRefsAndLinks) {
  HubCache cache(TempRoot());
  EXPECT_EQ(HubCache::RepoFolderName("org/name"), "models--org--name");
  EXPECT_EQ(HubCache::RepoFolderName("gpt2"), "models--gpt2");
  EXPECT_TRUE(absl::IsNotFound(cache.ReadRef("org/name", "main").status()));
  const std::string commit = "0123456789abcdef0123456789abcdef01234567";
  ASSERT_TRUE(cache.WriteRef("org/name", "refs/pr/3", commit).ok());
  auto ref = cache.ReadRef("org/name", "refs/pr/3");
  ASSERT_TRUE(ref.ok()) << ref.status();
  EXPECT_EQ(*ref, commit);
  EXPECT_EQ(*cache.ResolveCommitLocally("org/name", commit), commit);

  ASSERT_TRUE(MakeDirs(cache.RepoDir("org/name") + "/blobs").ok());
  std::ofstream(cache.BlobPath("org/name", "e1")) << "blob";
  ASSERT_TRUE(cache.LinkSnapshot("org/name", commit, "a/b.txt", "e1").ok());
  // Re-linking replaces the link atomically.
  ASSERT_TRUE(cache.LinkSnapshot("org/name", commit, "a/b.txt", "e1").ok());
  std::string link = cache.SnapshotPath("org/name", commit, "a/b.txt");
  char target[256] = {0};
  ASSERT_GT(readlink(link.c_str(), target, sizeof(target) - 1), 0);
  EXPECT_STREQ(target, "../../../blobs/e1");
  std::ifstream in(link);
  std::string content;
  in >> content;
  EXPECT_EQ(content, "blob");

  std::ofstream(cache.RepoDir("org/name") + "/refs/bad") << "not a commit";
  EXPECT_TRUE(absl::IsDataLoss(cache.ReadRef("org/name", "bad").status()));
}

TEST(HubClientOptionsTest, ResolvesEnvironment) {
  setenv("HF_HOME", "/tmp/hf-home-test", 1);
  unsetenv("HF_HUB_CACHE");
  unsetenv("HUGGINGFACE_HUB_CACHE");
  setenv("HF_ENDPOINT", "http://mirror.example:8080/", 1);
  setenv("HF_HUB_OFFLINE", "yes", 1);
  setenv("HF_TOKEN", "  tok  ", 1);
  auto client = HubClient::Create({});
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ((*client)->options().cache_dir, "/tmp/hf-home-test/hub");
  EXPECT_EQ((*client)->options().endpoint, "http://mirror.example:8080");
  EXPECT_TRUE(*(*client)->options().offline);
  EXPECT_EQ(*(*client)->options().token, "tok");
  setenv("HF_HUB_CACHE", "/tmp/other-cache", 1);
  setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1", 1);
  setenv("HF_HUB_OFFLINE", "0", 1);
  client = HubClient::Create({});
  ASSERT_TRUE(client.ok());
  EXPECT_EQ((*client)->options().cache_dir, "/tmp/other-cache");
  EXPECT_FALSE(*(*client)->options().offline);
  EXPECT_EQ(*(*client)->options().token, "");
  HubClientOptions bad;
  bad.endpoint = "ftp://x";
  EXPECT_TRUE(absl::IsInvalidArgument(HubClient::Create(bad).status()));
}

}  // namespace
}  // namespace lorahub::hub
