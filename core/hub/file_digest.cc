#include "core/hub/file_digest.h"

#include <openssl/evp.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"

namespace lorahub::hub {
namespace {

struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};
using MdCtx = std::unique_ptr<EVP_MD_CTX, MdCtxDeleter>;

std::string ToHex(const unsigned char* bytes, unsigned int n) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(2 * n);
  for (unsigned int i = 0; i < n; ++i) {
    out.push_back(kHex[bytes[i] >> 4]);
    out.push_back(kHex[bytes[i] & 15]);
  }
  return out;
}

std::string Finish(EVP_MD_CTX* ctx) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_DigestFinal_ex(ctx, digest, &n);
  return ToHex(digest, n);
}

// Hashes `prefix` followed by the file's bytes.
absl::StatusOr<std::string> DigestFile(const EVP_MD* md,
                                       const std::string& path,
                                       bool git_blob_prefix) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    int err = errno;
    std::string msg = absl::StrCat("cannot open '", path, "' for hashing: ",
                                   std::strerror(err));
    return err == ENOENT ? absl::NotFoundError(msg) : absl::InternalError(msg);
  }
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> closer(f, &std::fclose);
  MdCtx ctx(EVP_MD_CTX_new());
  EVP_DigestInit_ex(ctx.get(), md, nullptr);
  if (git_blob_prefix) {
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
      return absl::InternalError(absl::StrCat("cannot stat '", path, "'"));
    }
    std::string header = absl::StrCat("blob ", st.st_size);
    EVP_DigestUpdate(ctx.get(), header.data(), header.size() + 1);  // + '\0'
  }
  std::vector<char> buf(1 << 20);
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) {
    EVP_DigestUpdate(ctx.get(), buf.data(), n);
  }
  if (std::ferror(f)) {
    return absl::InternalError(absl::StrCat("read error while hashing '", path, "'"));
  }
  return Finish(ctx.get());
}

bool IsHex(absl::string_view s) {
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

}  // namespace

std::string Sha256Hex(absl::string_view data) {
  MdCtx ctx(EVP_MD_CTX_new());
  EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
  EVP_DigestUpdate(ctx.get(), data.data(), data.size());
  return Finish(ctx.get());
}

std::string GitBlobSha1Hex(absl::string_view data) {
  MdCtx ctx(EVP_MD_CTX_new());
  EVP_DigestInit_ex(ctx.get(), EVP_sha1(), nullptr);
  std::string header = absl::StrCat("blob ", data.size());
  EVP_DigestUpdate(ctx.get(), header.data(), header.size() + 1);
  EVP_DigestUpdate(ctx.get(), data.data(), data.size());
  return Finish(ctx.get());
}

absl::StatusOr<std::string> Sha256HexOfFile(const std::string& path) {
  return DigestFile(EVP_sha256(), path, /*git_blob_prefix=*/false);
}

absl::StatusOr<std::string> GitBlobSha1HexOfFile(const std::string& path) {
  return DigestFile(EVP_sha1(), path, /*git_blob_prefix=*/true);
}

absl::Status VerifyFileAgainstEtag(const std::string& path,
                                   absl::string_view etag) {
  absl::StatusOr<std::string> actual;
  const char* kind;
  if (etag.size() == 64 && IsHex(etag)) {
    actual = Sha256HexOfFile(path);
    kind = "sha256";
  } else if (etag.size() == 40 && IsHex(etag)) {
    actual = GitBlobSha1HexOfFile(path);
    kind = "git-blob sha1";
  } else {
    return absl::OkStatus();
  }
  if (!actual.ok()) return actual.status();
  if (*actual != etag) {
    return absl::DataLossError(absl::StrCat("downloaded file '", path,
                                            "' is corrupt: expected ", kind, " ",
                                            etag, ", got ", *actual));
  }
  return absl::OkStatus();
}

}  // namespace lorahub::hub
