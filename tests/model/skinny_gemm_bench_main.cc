// Microbenchmark (not a test): the skinny GEMM kernel against cuBLAS at
// flan-t5-large's decoder shapes, each op captured 50 times into one CUDA
// graph and replayed (the way a decode step runs them), on cuda:0. Prints one
// line per (rows, N, K): microseconds per op for cuBLAS with bf16 and fp32
// outputs (at::matmul; BmmFloatInto), the kernel with each split
// of K and its own pick, and the pick's weight bandwidth in TB/s.
//
//   skinny_gemm_bench [--reps N]
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "core/model/cuda_graph.h"
#include "core/model/fused_ops.h"

namespace lorahub::model {
namespace {

constexpr int kOpsPerGraph = 50;

// Microseconds per op of `op` replayed `reps` times in a graph of
// kOpsPerGraph ops; -1 where it cannot be captured or does not run. `out`:
// what the op writes, dropped before the capture (nothing allocated outside
// the graph is freed during it).
double TimeOp(c10::Device device, const std::function<bool()>& op,
              at::Tensor* out, int reps) {
  bool ran = true;
  auto graph = CaptureCudaGraph(
      device,
      [&] {
        for (int i = 0; i < kOpsPerGraph; ++i) ran = ran && op();
        return absl::OkStatus();
      },
      /*warmup=*/2, [&] { *out = at::Tensor(); });
  if (!graph.ok() || !ran) return -1;
  for (int i = 0; i < 3; ++i) (void)(*graph)->Replay();
  SynchronizeDevice(device);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) {
    if (!(*graph)->Replay().ok()) return -1;
  }
  SynchronizeDevice(device);
  const double s = std::chrono::duration<double>(
                       std::chrono::steady_clock::now() - start)
                       .count();
  return 1e6 * s / (static_cast<double>(reps) * kOpsPerGraph);
}

int Main(int argc, char** argv) {
  int reps = 40;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: skinny_gemm_bench [--reps N]\n");
      return 2;
    }
  }
  if (!CudaGraphsCompiled() || reps < 1) {
    std::fprintf(stderr, "needs the CUDA build and --reps >= 1\n");
    return 2;
  }
  const c10::Device device(c10::kCUDA, 0);
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(device);
  struct Shape { int64_t n, k; const char* what; };
  const std::vector<Shape> shapes = {{3072, 1024, "self q,k,v"},
                                     {1024, 1024, "o, cross q"},
                                     {5632, 1024, "wi_0,wi_1"},
                                     {1024, 2816, "wo"}};
  std::printf("%4s %5s %5s %-11s %8s %8s %8s %8s %8s %8s %8s %8s %6s\n", "M",
              "N", "K", "", "cublas", "cub_f32", "split1", "split2",
              "split4", "split8", "pick", "pick_bf", "TB/s");
  for (int64_t m : {1, 20, 32, 64, 128}) {
    for (const Shape& s : shapes) {
      const at::Tensor x = at::randn({m, s.k}, bf16);
      const at::Tensor w = at::randn({s.n, s.k}, bf16);
      at::Tensor y;
      const at::Tensor out32 = at::empty({1, m, s.n}, bf16.dtype(at::kFloat));
      const double cublas =
          TimeOp(device, [&] { y = at::matmul(x, w.t()); return true; }, &y, reps);
      const double cublas_f32 = TimeOp(
          device,
          [&] {
            return BmmFloatInto(x.unsqueeze(0), w.t().unsqueeze(0), out32);
          },
          &y, reps);
      double split_us[4];
      for (int i = 0; i < 4; ++i) {
        const int split = 1 << i;
        split_us[i] = TimeOp(
            device, [&] { return SkinnyGemm(x, w, at::kFloat, split, &y); },
            &y, reps);
      }
      const double pick = TimeOp(
          device, [&] { return SkinnyGemm(x, w, at::kFloat, 0, &y); }, &y,
          reps);
      const double pick_bf = TimeOp(
          device, [&] { return SkinnyGemm(x, w, at::kBFloat16, 0, &y); },
          &y, reps);
      const double bytes = 2.0 * static_cast<double>(s.n * s.k + m * s.k);
      std::printf(
          "%4lld %5lld %5lld %-11s %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f "
          "%8.2f %6.2f\n",
          static_cast<long long>(m), static_cast<long long>(s.n),
          static_cast<long long>(s.k), s.what, cublas, cublas_f32, split_us[0],
          split_us[1], split_us[2], split_us[3], pick, pick_bf,
          pick > 0 ? bytes / (pick * 1e-6) / 1e12 : 0.0);
    }
  }
  return 0;
}

}  // namespace
}  // namespace lorahub::model

int main(int argc, char** argv) { return lorahub::model::Main(argc, argv); }
