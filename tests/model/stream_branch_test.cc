// StreamBranch (cuda_graph.h): work queued on the branch runs after what the
// current stream had queued at Open, beside what that stream queues next,
// and before what it queues after Join, eagerly and inside a captured CUDA
// graph, at either priority; a mark orders another branch after the work
// marked. Runs on $LORAHUB_TEST_DEVICE (tiny_t5.h; default cpu, where there
// is no branch).
#include <ATen/ATen.h>

#include <memory>

#include "absl/status/status.h"
#include "core/model/cuda_graph.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

constexpr int64_t kN = 1024;

// A chain of GEMMs, long enough on a GPU that work not ordered after it
// would read what it writes before it is written.
at::Tensor Chain(const at::Tensor& x, const at::Tensor& w) {
  at::Tensor y = x;
  for (int i = 0; i < 16; ++i) y = at::tanh(at::matmul(y, w) * (1.0 / kN));
  return y;
}

class StreamBranchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << "LORAHUB_TEST_DEVICE: " << device.status();
    device_ = *device;
  }
  at::Tensor Random(uint64_t seed) {
    at::manual_seed(seed);
    return at::randn({kN, kN}).to(device_);
  }
  // Main's chain, the branch's chain over its result, main's own work
  // beside it, their sum: the branch's order as one stream would run it.
  static at::Tensor InLine(const at::Tensor& x, const at::Tensor& w) {
    const at::Tensor first = Chain(x, w);
    return Chain(first * 2 + 1, w) + x * 3;
  }
  at::Tensor Branched(StreamBranch& branch, const at::Tensor& x, const at::Tensor& w) {
    const at::Tensor first = Chain(x, w);
    branch.Open();
    const at::Tensor on_branch = Chain(first * 2 + 1, w);
    branch.Close();
    const at::Tensor beside = x * 3;
    branch.Join();
    branch.RecordUse(on_branch);
    return on_branch + beside;
  }

  // Marks: `marked` runs two chains, marking the first's end; `reader`, a
  // second branch, waits for that mark only and reads the first chain.
  static at::Tensor MarkedInLine(const at::Tensor& x, const at::Tensor& w) {
    const at::Tensor first = Chain(x, w);
    return Chain(first * 2 + 1, w) + Chain(first - 1, w);
  }
  at::Tensor Marked(StreamBranch& marked, StreamBranch& reader, const at::Tensor& x,
                    const at::Tensor& w) {
    marked.Open();
    const at::Tensor first = Chain(x, w);
    marked.Mark(0);
    const at::Tensor rest = Chain(first * 2 + 1, w);
    marked.Close();
    reader.Open();
    marked.WaitForMark(0);
    const at::Tensor read = Chain(first - 1, w);
    reader.Close();
    reader.Join();
    marked.Join();
    marked.RecordUse(rest);
    reader.RecordUse(read);
    return rest + read;
  }

  // The same GEMMs on two streams; a misordered read is off by O(1).
  static bool Same(const at::Tensor& got, const at::Tensor& want) {
    return at::allclose(got, want, /*rtol=*/1e-5, /*atol=*/1e-6);
  }

  c10::Device device_ = c10::Device(c10::kCPU);
};

TEST_F(StreamBranchTest, OnCudaDevicesOnly) {
  EXPECT_EQ(MakeStreamBranch(c10::Device(c10::kCPU), false), nullptr);
  EXPECT_EQ(MakeStreamBranch(device_, true) != nullptr,
            device_.is_cuda() && CudaGraphsCompiled());
}

// Each call's inputs are new and the values in line come after the branched
// ones, so memory a misordered read could find holds another call's values.
TEST_F(StreamBranchTest, OrdersEagerWorkBothWays) {
  if (!device_.is_cuda()) GTEST_SKIP() << "a branch needs a CUDA device";
  const at::Tensor w = Random(1);
  uint64_t seed = 2;
  for (bool high_priority : {false, true}) {
    SCOPED_TRACE(high_priority ? "high priority" : "default priority");
    auto branch = MakeStreamBranch(device_, high_priority);
    ASSERT_NE(branch, nullptr);
    for (int call = 0; call < 3; ++call) {
      const at::Tensor x = Random(seed++);
      const at::Tensor got = Branched(*branch, x, w).cpu();
      EXPECT_TRUE(Same(got, InLine(x, w).cpu())) << "call " << call;
    }
  }
}

// Captured with the branch, replayed on new inputs: the graph keeps the
// branch's order.
TEST_F(StreamBranchTest, CapturedAsAGraphBranch) {
  if (!device_.is_cuda()) GTEST_SKIP() << "CUDA graphs need a CUDA device";
  auto branch = MakeStreamBranch(device_, true);
  ASSERT_NE(branch, nullptr);
  const at::Tensor x = Random(3), w = Random(4);
  at::Tensor out;
  auto graph = CaptureCudaGraph(
      device_,
      [&] {
        out = Branched(*branch, x, w);
        return absl::OkStatus();
      },
      /*warmup=*/1);
  ASSERT_TRUE(graph.ok()) << graph.status();
  for (uint64_t seed : {5, 6}) {
    x.copy_(Random(seed));
    ASSERT_TRUE((*graph)->Replay().ok());
    const at::Tensor got = out.cpu();
    EXPECT_TRUE(Same(got, InLine(x, w).cpu())) << "seed " << seed;
  }
}

// A mark orders another branch after the marked branch's work up to it,
// eagerly and captured.
TEST_F(StreamBranchTest, MarksOrderAnotherBranch) {
  if (!device_.is_cuda()) GTEST_SKIP() << "a branch needs a CUDA device";
  auto marked = MakeStreamBranch(device_, false, /*marks=*/1);
  auto reader = MakeStreamBranch(device_, true);
  ASSERT_NE(marked, nullptr);
  ASSERT_NE(reader, nullptr);
  EXPECT_THROW(marked->Mark(0), c10::Error) << "closed";
  const at::Tensor w = Random(7);
  for (uint64_t seed : {8, 9}) {
    const at::Tensor x = Random(seed);
    EXPECT_TRUE(Same(Marked(*marked, *reader, x, w).cpu(), MarkedInLine(x, w).cpu()))
        << "eager, seed " << seed;
  }
  const at::Tensor x = Random(10);
  at::Tensor out;
  auto graph = CaptureCudaGraph(
      device_,
      [&] {
        out = Marked(*marked, *reader, x, w);
        return absl::OkStatus();
      },
      /*warmup=*/1);
  ASSERT_TRUE(graph.ok()) << graph.status();
  for (uint64_t seed : {11, 12}) {
    x.copy_(Random(seed));
    ASSERT_TRUE((*graph)->Replay().ok());
    EXPECT_TRUE(Same(out.cpu(), MarkedInLine(x, w).cpu())) << "captured, seed " << seed;
  }
}

}  // namespace
}  // namespace lorahub::model
