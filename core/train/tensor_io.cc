#include "core/train/tensor_io.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <system_error>

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"

namespace lorahub::train {

namespace {

absl::StatusOr<io::HostTensor> ToHost(const at::Tensor& tensor,
                                      at::ScalarType type, io::DType dtype) {
  try {
    auto owned = std::make_shared<at::Tensor>(
        tensor.detach().to(at::kCPU, type).contiguous().clone());
    io::HostTensor host;
    host.dtype = dtype;
    host.shape = owned->sizes().vec();
    host.data = static_cast<const uint8_t*>(owned->data_ptr());
    host.nbytes = owned->numel() * owned->element_size();
    host.owner = owned;
    return host;
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("tensor to host: ", e.what_without_backtrace()));
  }
}

}  // namespace

absl::StatusOr<io::HostTensor> TensorToHostF32(const at::Tensor& tensor) {
  return ToHost(tensor, at::kFloat, io::DType::kF32);
}

absl::StatusOr<io::HostTensor> TensorToHostBF16(const at::Tensor& tensor) {
  return ToHost(tensor, at::kBFloat16, io::DType::kBF16);
}

absl::Status MakeDirs(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir)) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, ": cannot create directory", ec ? ": " + ec.message() : ""));
  }
  return absl::OkStatus();
}

absl::Status WriteTextFile(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::InvalidArgumentError(absl::StrCat(tmp, ": cannot write"));
    out << text;
    out.flush();
    if (!out) return absl::InternalError(absl::StrCat(tmp, ": write failed"));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat(path, ": rename failed"));
  }
  return absl::OkStatus();
}

absl::Status CopyFile(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(from, ": cannot open"));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return WriteTextFile(to, buffer.str());
}

}  // namespace lorahub::train
