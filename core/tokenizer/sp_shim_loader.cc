#include "core/tokenizer/sp_shim_loader.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/tokenizer/sp_shim_embed.h"

namespace lorahub::tokenizer::internal {
namespace {

// Sanitizer runtimes refuse RTLD_DEEPBIND; sanitized builds do without it
// (fine in processes that do not also load libprotobuf).
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define LH_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define LH_SANITIZED 1
#endif
#endif
#ifdef LH_SANITIZED
constexpr int kDlopenFlags = RTLD_NOW | RTLD_LOCAL;
#else
constexpr int kDlopenFlags = RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND;
#endif

bool WriteAll(int fd, const unsigned char* data, size_t size) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

std::string DlError() {
  const char* message = dlerror();
  return message ? message : "unknown dlopen error";
}

// dlopen of the embedded bytes through an anonymous memory file: nothing is
// left on disk and no directory needs to be writable.
void* OpenFromMemfd(std::string* error) {
  int fd = memfd_create("lorahub_sp_shim", MFD_CLOEXEC);
  if (fd < 0) {
    *error = absl::StrCat("memfd_create: ", std::strerror(errno));
    return nullptr;
  }
  void* handle = nullptr;
  if (WriteAll(fd, kSpShimBytes, kSpShimSize)) {
    handle = dlopen(absl::StrCat("/proc/self/fd/", fd).c_str(), kDlopenFlags);
    if (!handle) *error = DlError();
  } else {
    *error = absl::StrCat("writing memfd: ", std::strerror(errno));
  }
  ::close(fd);  // the mapping made by dlopen keeps the contents alive
  return handle;
}

// Fallback for systems without memfd or /proc: a private temporary file,
// unlinked as soon as it is mapped.
void* OpenFromTempFile(std::string* error) {
  const char* dir = std::getenv("TMPDIR");
  std::string path =
      absl::StrCat(dir && *dir ? dir : "/tmp", "/lorahub_sp_shim_XXXXXX");
  int fd = mkstemp(path.data());
  if (fd < 0) {
    *error = absl::StrCat("mkstemp ", path, ": ", std::strerror(errno));
    return nullptr;
  }
  void* handle = nullptr;
  bool written = WriteAll(fd, kSpShimBytes, kSpShimSize);
  ::close(fd);
  if (written) {
    handle = dlopen(path.c_str(), kDlopenFlags);
    if (!handle) *error = DlError();
  } else {
    *error = absl::StrCat("writing ", path, ": ", std::strerror(errno));
  }
  ::unlink(path.c_str());
  return handle;
}

template <typename Fn>
bool Bind(void* handle, const char* name, Fn* fn, std::string* missing) {
  *fn = reinterpret_cast<Fn>(dlsym(handle, name));
  if (*fn == nullptr) *missing = name;
  return *fn != nullptr;
}

absl::StatusOr<SpShimApi> Load() {
  void* handle = nullptr;
  std::string where;
  if (const char* path = std::getenv("LORAHUB_SP_SHIM"); path && *path) {
    where = path;
    handle = dlopen(path, kDlopenFlags);
    if (!handle) {
      return absl::InternalError(absl::StrCat(
          "cannot load the SentencePiece shim LORAHUB_SP_SHIM=", path, ": ",
          DlError()));
    }
  } else {
    where = "embedded libsp_shim.so";
    std::string memfd_error, temp_error;
    handle = OpenFromMemfd(&memfd_error);
    if (!handle) handle = OpenFromTempFile(&temp_error);
    if (!handle) {
      return absl::InternalError(absl::StrCat(
          "cannot load the embedded SentencePiece shim (is libsentencepiece.so.0 "
          "installed?): ",
          memfd_error, "; ", temp_error));
    }
  }
  auto abi = reinterpret_cast<int (*)()>(dlsym(handle, "lh_sp_abi_version"));
  if (abi == nullptr || abi() != LH_SP_ABI_VERSION) {
    return absl::InternalError(
        absl::StrCat(where, " is not a SentencePiece shim of ABI version ",
                     LH_SP_ABI_VERSION));
  }
  SpShimApi api;
  std::string missing;
  if (!Bind(handle, "lh_sp_load", &api.load, &missing) ||
      !Bind(handle, "lh_sp_free", &api.free, &missing) ||
      !Bind(handle, "lh_sp_piece_size", &api.piece_size, &missing) ||
      !Bind(handle, "lh_sp_encode", &api.encode, &missing) ||
      !Bind(handle, "lh_sp_decode", &api.decode, &missing) ||
      !Bind(handle, "lh_sp_id_to_piece", &api.id_to_piece, &missing) ||
      !Bind(handle, "lh_sp_is_control", &api.is_control, &missing) ||
      !Bind(handle, "lh_sp_is_unknown", &api.is_unknown, &missing)) {
    return absl::InternalError(
        absl::StrCat(where, " lacks the symbol ", missing));
  }
  // The handle is intentionally never closed: tokenizers may live until exit.
  return api;
}

}  // namespace

absl::StatusOr<const SpShimApi*> GetSpShim() {
  // A function-local static is initialised exactly once, thread-safely.
  static const absl::StatusOr<SpShimApi>* const loaded =
      new absl::StatusOr<SpShimApi>(Load());
  if (!loaded->ok()) return loaded->status();
  return &loaded->value();
}

}  // namespace lorahub::tokenizer::internal
