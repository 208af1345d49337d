// The teacher-forced decoder as one persistent kernel (fused_ops.h
// PersistentDecoder) against the engine's unfused decoder blocks, on a
// random model of flan-t5-large's decoder shape (d_model 1024, 16 heads of
// 64, d_ff 2816; two blocks each side, a small vocabulary). CUDA only: it
// skips on the CPU (LORAHUB_TEST_DEVICE=cuda runs it).
//
// DecodeFull takes the kernel for at most 16 rows (5 examples x 3 positions,
// and other shapes); one example more takes the unfused blocks. The two must
// give the same logits for the kernel's examples up to fp32 sums in another
// order (which may move a bf16 rounding by one step here and there): no
// further from each other than a few times the unfused blocks' own change
// with one example more again (other cuBLAS kernels, other sum orders), or
// 1% (max) and 0.1% (mean) of the largest logit. The kernel must run (its
// user scope counted) for its rows and not for the others.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

std::atomic<int64_t> g_kernel_scopes{0};

// Counts "lorahub::persistent_decoder" scopes while alive.
class ScopeCounter {
 public:
  ScopeCounter() {
    g_kernel_scopes = 0;
    handle_ = at::addGlobalCallback(
        at::RecordFunctionCallback(
            [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
              if (std::string(fn.name()) == "lorahub::persistent_decoder") ++g_kernel_scopes;
              return nullptr;
            })
            .scopes({at::RecordScope::USER_SCOPE}));
  }
  ~ScopeCounter() { at::removeCallback(handle_); }

 private:
  at::CallbackHandle handle_;
};

config::T5Config LargeDecoderConfig() {
  config::T5Config c = testing::GatedConfig();
  c.d_model = 1024;
  c.d_kv = 64;
  c.num_heads = 16;
  c.d_ff = 2816;
  c.num_layers = 2;
  c.num_decoder_layers = 2;
  c.dense_act_fn = "gelu_new";
  c.is_gated_act = true;
  return c;
}

// (examples the kernel takes, decoder positions): the objective's 5 x 3
// rows; longer labels (the cross-attention's queries in more than one pass,
// the self-attention's keys up to 16).
class PersistentDecoderTest
    : public ::testing::TestWithParam<std::pair<int64_t, int64_t>> {};

TEST_P(PersistentDecoderTest, MatchesTheUnfusedBlocks) {
  auto device = testing::TestDevice();
  ASSERT_TRUE(device.ok()) << device.status();
  if (!device->is_cuda()) GTEST_SKIP() << "CUDA only (LORAHUB_TEST_DEVICE=cuda)";
  // The kernel is opt-in (fused_ops.h); the switch is read at its first use.
  setenv("LORAHUB_PERSISTENT_DECODER", "1", /*overwrite=*/1);
  const config::T5Config c = LargeDecoderConfig();
  WeightOptions options;
  options.dtype = at::kBFloat16;
  options.device = *device;
  auto w = BuildT5Weights(c, testing::RandomT5(c, 11, /*scale=*/0.05), options);
  ASSERT_TRUE(w.ok()) << w.status();

  // The kernel's examples and two more, of 36-72 tokens (padded to 72).
  const auto [kernel_examples, positions] = GetParam();
  const int64_t examples = kernel_examples + 2, length = 72;
  ASSERT_LE(kernel_examples * positions, 16);
  ASSERT_GT((kernel_examples + 1) * positions, 16);
  at::Tensor ids = at::randint(2, c.vocab_size, {examples, length},
                               at::detail::createCPUGenerator(5), at::kLong);
  at::Tensor mask = at::ones({examples, length}, at::kLong);
  for (int64_t b = 0; b < examples; ++b) {
    mask[b].narrow(0, length - 6 * b, 6 * b).zero_();
  }
  at::Tensor decoder_ids = at::randint(2, c.vocab_size, {examples, positions},
                                       at::detail::createCPUGenerator(6), at::kLong);
  ids = ids.to(*device);
  mask = mask.to(*device);
  decoder_ids = decoder_ids.to(*device);

  const RowAdapters none;
  auto logits_for = [&](int64_t rows, int64_t* scopes) -> at::Tensor {
    auto enc = Encode(*w, ids.narrow(0, 0, rows), mask.narrow(0, 0, rows), none);
    EXPECT_TRUE(enc.ok()) << enc.status();
    if (!enc.ok()) return at::Tensor();
    ScopeCounter counter;
    auto logits = DecodeFull(*w, decoder_ids.narrow(0, 0, rows), *enc, none);
    EXPECT_TRUE(logits.ok()) << logits.status();
    *scopes = g_kernel_scopes;
    return logits.ok() ? logits->to(at::kCPU).to(at::kDouble) : at::Tensor();
  };
  int64_t fused_scopes = 0, unfused_scopes = 0, more_scopes = 0;
  const at::Tensor fused = logits_for(kernel_examples, &fused_scopes);
  const at::Tensor unfused = logits_for(kernel_examples + 1, &unfused_scopes);
  const at::Tensor more = logits_for(examples, &more_scopes);
  ASSERT_TRUE(fused.defined() && unfused.defined() && more.defined());
  EXPECT_EQ(fused_scopes, 1) << "at most 16 rows should take the persistent kernel";
  EXPECT_EQ(unfused_scopes, 0) << "more than 16 rows are more than it takes";
  EXPECT_EQ(more_scopes, 0) << "more than 16 rows are more than it takes";

  const at::Tensor ref = unfused.narrow(0, 0, kernel_examples);
  const at::Tensor floor = (more.narrow(0, 0, kernel_examples) - ref).abs();
  const double scale = ref.abs().max().item<double>();
  const double err = (fused - ref).abs().max().item<double>();
  const double mean_err = (fused - ref).abs().mean().item<double>();
  const double floor_err = floor.max().item<double>();
  const double floor_mean = floor.mean().item<double>();
  std::printf(
      "%lld x %lld rows: logits max |ref| %.4g; |fused - unfused| max %.4g, mean %.4g; the "
      "unfused blocks with two examples more: max %.4g, mean %.4g\n",
      static_cast<long long>(kernel_examples), static_cast<long long>(positions), scale, err,
      mean_err, floor_err, floor_mean);
  EXPECT_GT(scale, 0.5);  // the logits are not degenerate
  EXPECT_LT(err, std::max(4 * floor_err, 1e-2 * scale));
  EXPECT_LT(mean_err, std::max(4 * floor_mean, 1e-3 * scale));
}

INSTANTIATE_TEST_SUITE_P(Shapes, PersistentDecoderTest,
                         ::testing::Values(std::make_pair(int64_t{5}, int64_t{3}),
                                           std::make_pair(int64_t{3}, int64_t{5}),
                                           std::make_pair(int64_t{1}, int64_t{16})));

}  // namespace
}  // namespace lorahub::model
