// ObjectiveRunner against the reference path it replaces:
// ScoreCandidates(ComposeLoraHub(stack, W)) on the LoraHub fixtures
// (tests/testdata/ref_tiny: 20 modules r=16 on q,v) and on golden models
// (tests/testdata/t5: gated_untied's m0..m2, and odd_shapes' xattn adapter
// whose rank/alpha patterns give several site shapes, i.e. several compose
// groups). Same losses within 1e-6 relative for one and several candidates,
// chunked rows, reference batch grouping, and short (padded) batches; bad
// calls are refused; on the CPU the runner is eager and says so.
#include "core/model/objective_runner.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/model/fused_ops.h"
#include "core/model/loader.h"
#include "core/model/lora.h"
#include "core/model/query_side_cross.h"
#include "core/model/scorer.h"
#include "core/model/t5_weights.h"
#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

struct Fixture {
  T5Weights base;
  std::vector<LoraAdapter> modules;
  ModuleStack stack;
  std::vector<Example> examples;
};

// s.stack from s.modules.
void StackFixtureModules(Fixture& s) {
  std::vector<const LoraAdapter*> ptrs;
  for (const auto& m : s.modules) ptrs.push_back(&m);
  auto stack = StackModules(s.base, ptrs);
  ASSERT_TRUE(stack.ok()) << stack.status();
  s.stack = *std::move(stack);
}

void LoadModules(Fixture& s, const std::string& model_dir,
                 const std::vector<std::string>& adapter_dirs,
                 const WeightOptions& options = WeightOptions{}) {
  auto base = LoadT5(model_dir, options);
  ASSERT_TRUE(base.ok()) << base.status();
  s.base = *std::move(base);
  for (const std::string& d : adapter_dirs) {
    auto a = LoadLoraAdapter(s.base, d);
    ASSERT_TRUE(a.ok()) << a.status();
    s.modules.push_back(*std::move(a));
  }
  StackFixtureModules(s);
}

void LoadRefTiny(Fixture& s, const std::string& name,
                 const WeightOptions& options = WeightOptions{}) {
  const std::string dir = "tests/testdata/ref_tiny/" + name;
  std::vector<std::string> adapters;
  for (int i = 0; i < 20; ++i) {
    char m[8];
    std::snprintf(m, sizeof m, "m%02d", i);
    adapters.push_back(dir + "/modules/" + m);
  }
  LoadModules(s, dir + "/base", adapters, options);
  auto tok = tokenizer::T5Tokenizer::Create(dir + "/base/spiece.model");
  ASSERT_TRUE(tok.ok()) << tok.status();
  std::ifstream f(dir + "/examples.jsonl");
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    auto j = nlohmann::json::parse(line);
    auto in = (*tok)->Encode(j["input"].get<std::string>());
    auto out = (*tok)->Encode(j["output"].get<std::string>());
    ASSERT_TRUE(in.ok() && out.ok());
    Example e;
    e.input_ids.assign(in->begin(), in->end());
    e.label_ids.assign(out->begin(), out->end());
    s.examples.push_back(std::move(e));
  }
  ASSERT_EQ(s.examples.size(), 5u);
}

// Examples of random ids (eos = 1 last) of varied lengths: inputs of
// min_len to max_len ids before the eos.
std::vector<Example> RandomExamples(int n, int vocab, uint32_t seed,
                                    int min_len = 1, int max_len = 9) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> id(2, vocab - 1), len(min_len, max_len);
  std::vector<Example> out(n);
  for (Example& e : out) {
    for (int i = len(rng); i > 0; --i) e.input_ids.push_back(id(rng));
    e.input_ids.push_back(1);
    for (int i = std::min(len(rng), 9) / 2; i > 0; --i) e.label_ids.push_back(id(rng));
    e.label_ids.push_back(1);
  }
  return out;
}

std::vector<double> RandomWeights(int64_t count, int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1.5, 1.5);
  std::vector<double> w(count * n);
  for (double& x : w) x = u(rng);
  return w;
}

// The reference path: ComposeLoraHub + ScoreCandidates.
std::vector<double> Reference(const Fixture& s, const std::vector<double>& w,
                              int64_t count, const ScoreOptions& opts) {
  at::Tensor weights =
      at::tensor(w, at::kDouble).to(at::kFloat).view({count, s.stack.num_modules});
  auto bank = ComposeLoraHub(s.stack, weights);
  EXPECT_TRUE(bank.ok()) << bank.status();
  std::vector<int64_t> slots;
  for (int64_t c = 0; c < count; ++c) slots.push_back(c);
  auto losses = ScoreCandidates(s.base, &*bank, slots, s.examples, opts);
  EXPECT_TRUE(losses.ok()) << losses.status();
  return losses.ok() ? *losses : std::vector<double>();
}

void ExpectParity(const Fixture& s, int64_t capacity, int64_t count,
                  const ScoreOptions& opts, uint32_t seed) {
  ObjectiveRunnerOptions ro;
  ro.score = opts;
  auto runner = ObjectiveRunner::Create(s.base, s.stack, s.examples, capacity, ro);
  ASSERT_TRUE(runner.ok()) << runner.status();
  EXPECT_FALSE((*runner)->graph_active());
  // Several calls: state from one call must not leak into the next.
  for (int call = 0; call < 3; ++call) {
    const std::vector<double> w =
        RandomWeights(count, s.stack.num_modules, seed + 17 * call);
    auto got = (*runner)->Losses(w, count);
    ASSERT_TRUE(got.ok()) << got.status();
    const std::vector<double> want = Reference(s, w, count, opts);
    ASSERT_EQ(got->size(), want.size());
    for (size_t c = 0; c < want.size(); ++c) {
      EXPECT_TRUE(std::isfinite(want[c]));
      EXPECT_NEAR((*got)[c], want[c], 1e-6 * std::fabs(want[c]))
          << "capacity " << capacity << " count " << count << " call " << call
          << " candidate " << c;
    }
  }
}

class RefTinyTest : public ::testing::TestWithParam<const char*> {};

TEST_P(RefTinyTest, MatchesScoreCandidates) {
  Fixture s;
  LoadRefTiny(s, GetParam());
  if (HasFatalFailure()) return;
  ExpectParity(s, 1, 1, ScoreOptions{}, 1);                // cobyla shape
  ExpectParity(s, 4, 4, ScoreOptions{2, 64}, 2);           // batch groups of 2
  ExpectParity(s, 4, 4, ScoreOptions{0, 3}, 3);            // rows chunked by 3
  ExpectParity(s, 5, 3, ScoreOptions{0, 64}, 4);           // padded short batch
}

INSTANTIATE_TEST_SUITE_P(Fixtures, RefTinyTest,
                         ::testing::Values("tiny_s0", "tiny_s1", "tiny_s2"));

TEST(ObjectiveRunnerGolden, GatedUntied) {
  Fixture s;
  const std::string d = "tests/testdata/t5/gated_untied/";
  LoadModules(s, d + "model", {d + "adapters/m0", d + "adapters/m1", d + "adapters/m2"});
  if (HasFatalFailure()) return;
  s.examples = RandomExamples(4, s.base.config.vocab_size, 5);
  ExpectParity(s, 1, 1, ScoreOptions{}, 11);
  ExpectParity(s, 3, 3, ScoreOptions{3, 5}, 12);
}

TEST(ObjectiveRunnerGolden, OddShapesSeveralGroups) {
  Fixture s;
  const std::string d = "tests/testdata/t5/odd_shapes/";
  // The same adapter twice: modules must share sites and ranks; its rank and
  // alpha patterns give sites of several shapes.
  LoadModules(s, d + "model", {d + "adapters/xattn", d + "adapters/xattn"});
  if (HasFatalFailure()) return;
  s.examples = RandomExamples(3, s.base.config.vocab_size, 6);
  ExpectParity(s, 1, 1, ScoreOptions{}, 21);
  ExpectParity(s, 4, 2, ScoreOptions{2, 4}, 22);
}

// A bf16 model and one candidate (ObjectiveRunnerOptions::merge_single, the
// default), on $LORAHUB_TEST_DEVICE: the runner's losses are those of the
// composed adapter merged into the weights (MergeAdapter) and scored without
// adapters, call after call (each merge starts from the base weights, which
// stay as they were). On the CPU the arithmetic is the same (1e-6); on CUDA
// the runner composes from bf16 factors and merges on the tensor cores
// (2e-3). The loss without the decoder's share of the adapter must differ
// from the wanted one by more than ten times the tolerance, so that a merge
// that missed the decoder's sites fails (H200: with the decoder's merge
// dropped, this test failed). The decoder's merge beside the encoder
// (merge_beside_encoder, the default) gives the bits of the merge in line,
// and so do the merges in stages (pipelined_merge, beside_merge_blocks 3:
// on CUDA each block's composition and merge beside the encoder on 3
// blocks, on the CPU the stages in turn; with the decoder's stage dropped
// this test failed on the CPU).
TEST(ObjectiveRunnerMerged, MatchesMergeAdapterThenScore) {
  auto device = testing::TestDevice();
  ASSERT_TRUE(device.ok()) << device.status();
  Fixture s;
  WeightOptions bf16;
  bf16.dtype = at::kBFloat16;
  bf16.device = *device;
  LoadRefTiny(s, "tiny_s1", bf16);
  if (HasFatalFailure()) return;
  const double tolerance = device->is_cuda() ? 2e-3 : 1e-6;
  const at::Tensor q0 = s.base.encoder[0].self_attn.q.weight.clone();
  ObjectiveRunnerOptions ro;
  ASSERT_TRUE(ro.merge_single);
  ASSERT_TRUE(ro.merge_beside_encoder);
  auto runner = ObjectiveRunner::Create(s.base, s.stack, s.examples, 1, ro);
  ASSERT_TRUE(runner.ok()) << runner.status();
  ro.pipelined_merge = true;  // and on few blocks, each looping over tiles
  ro.beside_merge_blocks = 3;
  auto pipelined = ObjectiveRunner::Create(s.base, s.stack, s.examples, 1, ro);
  ASSERT_TRUE(pipelined.ok()) << pipelined.status();
  ro.pipelined_merge = false;
  ro.beside_merge_blocks = 0;
  ro.merge_beside_encoder = false;
  auto in_line = ObjectiveRunner::Create(s.base, s.stack, s.examples, 1, ro);
  ASSERT_TRUE(in_line.ok()) << in_line.status();
  ro.merge_single = false;
  auto unmerged = ObjectiveRunner::Create(s.base, s.stack, s.examples, 1, ro);
  ASSERT_TRUE(unmerged.ok()) << unmerged.status();
  const int encoder_sites = kSitesPerBlock * s.base.config.num_layers;
  for (int call = 0; call < 3; ++call) {
    SCOPED_TRACE("call " + std::to_string(call));
    const std::vector<double> w = RandomWeights(1, s.stack.num_modules, 40 + call);
    auto got = (*runner)->Losses(w, 1);
    ASSERT_TRUE(got.ok()) << got.status();
    auto merged_in_line = (*in_line)->Losses(w, 1);
    ASSERT_TRUE(merged_in_line.ok()) << merged_in_line.status();
    EXPECT_EQ(*got, *merged_in_line);
    auto merged_pipelined = (*pipelined)->Losses(w, 1);
    ASSERT_TRUE(merged_pipelined.ok()) << merged_pipelined.status();
    EXPECT_EQ(*merged_pipelined, *merged_in_line);
    auto bank = ComposeLoraHub(
        s.stack, at::tensor(w, at::kDouble).to(at::kFloat).view({1, s.stack.num_modules}));
    ASSERT_TRUE(bank.ok()) << bank.status();
    LoraAdapter composed, encoder_only;
    for (size_t site = 0; site < bank->sites.size(); ++site) {
      const SiteBank& sb = bank->sites[site];
      if (!sb.a.defined()) continue;
      const LoraSite one{static_cast<int>(site), sb.a[0], sb.b[0], sb.scale.item<double>()};
      composed.sites.push_back(one);
      if (one.site < encoder_sites) encoder_only.sites.push_back(one);
    }
    const auto score = [&](const LoraAdapter& adapter) {
      auto merged = MergeAdapter(s.base, adapter);
      EXPECT_TRUE(merged.ok()) << merged.status();
      auto loss = ScoreCandidates(*merged, nullptr, {-1}, s.examples, ScoreOptions{});
      EXPECT_TRUE(loss.ok()) << loss.status();
      return loss.ok() ? (*loss)[0] : std::nan("");
    };
    const double want = score(composed);
    EXPECT_NEAR((*got)[0], want, tolerance * std::fabs(want));
    ASSERT_LT(encoder_only.sites.size(), composed.sites.size());
    EXPECT_GT(std::fabs(score(encoder_only) - want), 10 * tolerance * std::fabs(want))
        << "the decoder's sites hardly matter here";
    // The unmerged path rounds differently, not by much.
    auto other = (*unmerged)->Losses(w, 1);
    ASSERT_TRUE(other.ok()) << other.status();
    EXPECT_NEAR((*got)[0], (*other)[0], 2e-2 * std::fabs((*other)[0]));
    EXPECT_NE((*got)[0], (*other)[0]) << "not merged?";
  }
  EXPECT_TRUE(at::equal(s.base.encoder[0].self_attn.q.weight, q0));
}

// The ref_tiny fixture tiny_s2 in bf16 on `device`, with 5 random examples of
// 33 to 60 input ids (long enough to be packed).
void LoadLongExamplesBf16(Fixture& s, c10::Device device) {
  WeightOptions options;
  options.dtype = at::kBFloat16;
  options.device = device;
  LoadRefTiny(s, "tiny_s2", options);
  if (::testing::Test::HasFatalFailure()) return;
  s.examples = RandomExamples(5, s.base.config.vocab_size, 8, 33, 60);
}

// Examples of 33 to 60 tokens score as ScoreCandidates scores them padded,
// for a population (runs of 5 rows per candidate) and for one merged
// candidate, bf16 on $LORAHUB_TEST_DEVICE. On CUDA the runner encodes the
// population's pass without its padding (packed_chunks; its LoRA deltas
// through the packed run kernels over each candidate's tokens) and the
// single candidate's padded; on the CPU both padded. Each loss must also be
// nearer its own candidate's reference than any other candidate's: a row's
// tokens given another slot's adapter would not pass.
TEST(ObjectiveRunnerPacked, LongExamplesMatchScoreCandidates) {
  auto device = testing::TestDevice();
  ASSERT_TRUE(device.ok()) << device.status();
  Fixture s;
  LoadLongExamplesBf16(s, *device);
  if (HasFatalFailure()) return;
  for (int64_t capacity : {int64_t{1}, int64_t{4}}) {
    auto runner =
        ObjectiveRunner::Create(s.base, s.stack, s.examples, capacity, {});
    ASSERT_TRUE(runner.ok()) << runner.status();
    EXPECT_EQ((*runner)->packed_chunks(),
              device->is_cuda() && capacity > 1 ? (*runner)->chunks() : 0)
        << "capacity " << capacity;
    for (int call = 0; call < 2; ++call) {
      const std::vector<double> w =
          RandomWeights(capacity, s.stack.num_modules, 60 + call);
      auto got = (*runner)->Losses(w, capacity);
      ASSERT_TRUE(got.ok()) << got.status();
      const std::vector<double> want = Reference(s, w, capacity, ScoreOptions{});
      ASSERT_EQ(got->size(), want.size());
      for (size_t c = 0; c < want.size(); ++c) {
        SCOPED_TRACE("capacity " + std::to_string(capacity) + " call " +
                     std::to_string(call) + " candidate " + std::to_string(c));
        EXPECT_NEAR((*got)[c], want[c], 2e-2 * std::fabs(want[c]));
        for (size_t other = 0; other < want.size(); ++other) {
          if (other == c) continue;
          EXPECT_LT(std::fabs((*got)[c] - want[c]),
                    std::fabs((*got)[c] - want[other]))
              << "nearer candidate " << other << "'s loss";
        }
      }
    }
  }
}

// `got` within 1e-3 relative of `want`, candidate by candidate, and not all
// the same bits: the path under test ran (the usual one again would give
// equal losses; a single candidate may round to the same loss).
void ExpectNearButNotAllEqual(const std::vector<double>& want,
                              const std::vector<double>& got, size_t count,
                              const std::string& if_all_equal) {
  ASSERT_EQ(want.size(), count);
  ASSERT_EQ(got.size(), count);
  int differing = 0;
  for (size_t c = 0; c < count; ++c) {
    EXPECT_TRUE(std::isfinite(got[c]));
    EXPECT_NEAR(got[c], want[c], 1e-3 * std::fabs(want[c])) << "candidate " << c;
    differing += got[c] != want[c] ? 1 : 0;
  }
  EXPECT_GT(differing, 0) << if_all_equal;
}

// The population pass with the decoder's cross-attention from the query
// side (query_side_cross.h, forced on: the fixture is far below its size
// threshold) against the usual order, bf16 on $LORAHUB_TEST_DEVICE (on the
// CPU through its ATen steps): the losses of 4 candidates agree to 1e-3
// relative, and not all are the same bits (it ran: the usual order again
// would give equal ones; a single candidate may round to the same loss,
// as candidate 0 did on the H200 with the down-projection on the tensor-core
// shrink, whose sums round differently). The runner's passes read the cross
// weights twice as PrepareQuerySideWeights made them when the runner was
// built (with every block's values read from the block in reverse order,
// candidates 0-2 missed by more than 1e-3 on the CPU).
TEST(ObjectiveRunnerQuerySide, LossesMatchTheUsualOrder) {
  auto device = testing::TestDevice();
  ASSERT_TRUE(device.ok()) << device.status();
  Fixture s;
  LoadLongExamplesBf16(s, *device);
  if (HasFatalFailure()) return;
  const std::vector<double> w = RandomWeights(4, s.stack.num_modules, 61);
  std::vector<double> losses[2];
  for (int on : {0, 1}) {
    internal::SetQuerySideCrossForTesting(on);
    auto runner = ObjectiveRunner::Create(s.base, s.stack, s.examples, 4, {});
    ASSERT_TRUE(runner.ok()) << runner.status();
    auto got = (*runner)->Losses(w, 4);
    internal::SetQuerySideCrossForTesting(-1);
    ASSERT_TRUE(got.ok()) << got.status();
    losses[on] = *got;
  }
  ExpectNearButNotAllEqual(losses[0], losses[1], 4, "the same losses: not applied?");
}

// The population pass's encoder attention on the tensor cores
// (mma_attention.cuh, on every launch it fits) against the
// register-tiled kernel, bf16 on CUDA: 64-wide heads (the kernel's) and
// examples of 33 to 60 tokens, with weights and adapters small enough that
// the losses are a smooth function of the arithmetic (on the random bench
// fixture they are not: any rounding change scatters them, BENCHMARKS,
// sixtieth session). 8 candidates' losses agree to 1e-3 relative, and not
// all are the same bits (the kernel ran). CUDA only: elsewhere there is one
// attention.
TEST(ObjectiveRunnerMma, LossesMatchTheRegisterTiledKernel) {
  auto device = testing::TestDevice();
  ASSERT_TRUE(device.ok()) << device.status();
  if (!device->is_cuda()) GTEST_SKIP() << "the tensor-core attention is CUDA's";
  const config::T5Config c = testing::WideHeadsConfig();
  WeightOptions options;
  options.dtype = at::kBFloat16;
  options.device = *device;
  Fixture s;
  auto base = BuildT5Weights(c, testing::RandomT5(c, 31, 0.05), options);
  ASSERT_TRUE(base.ok()) << base.status();
  s.base = *std::move(base);
  // A and B of randn * 0.3 at alpha / r = 0.02: deltas about W_q's scale.
  const config::LoraConfig lora = testing::MakeLoraConfig({"q", "v"}, 16, 0.32);
  for (uint64_t seed : {1, 2, 3, 4}) {
    auto a = BuildLoraAdapter(s.base, lora, testing::RandomAdapter(s.base, lora, seed),
                              "m" + std::to_string(seed));
    ASSERT_TRUE(a.ok()) << a.status();
    s.modules.push_back(*std::move(a));
  }
  StackFixtureModules(s);
  if (HasFatalFailure()) return;
  s.examples = RandomExamples(5, c.vocab_size, 9, 33, 60);
  const std::vector<double> w = RandomWeights(8, s.stack.num_modules, 62);
  std::vector<double> losses[2];
  for (int mma : {0, 1}) {
    SetMmaAttentionModeForTesting(mma == 1 ? 2 : 0);
    auto runner = ObjectiveRunner::Create(s.base, s.stack, s.examples, 8, {});
    const absl::StatusOr<std::vector<double>> got =
        runner.ok() ? (*runner)->Losses(w, 8)
                    : absl::StatusOr<std::vector<double>>(runner.status());
    SetMmaAttentionModeForTesting(-1);
    ASSERT_TRUE(got.ok()) << got.status();
    losses[mma] = *got;
  }
  ExpectNearButNotAllEqual(losses[0], losses[1], 8,
                           "the same losses: the tensor-core kernel did not run?");
}

TEST(ObjectiveRunner, RefusesBadCalls) {
  Fixture s;
  const std::string d = "tests/testdata/t5/gated_untied/";
  LoadModules(s, d + "model", {d + "adapters/m0", d + "adapters/m1"});
  if (HasFatalFailure()) return;
  s.examples = RandomExamples(2, s.base.config.vocab_size, 7);
  ObjectiveRunnerOptions ro;
  EXPECT_FALSE(ObjectiveRunner::Create(s.base, s.stack, s.examples, 0, ro).ok());
  EXPECT_FALSE(ObjectiveRunner::Create(s.base, s.stack, {}, 1, ro).ok());
  std::vector<Example> bad = s.examples;
  bad[0].label_ids.push_back(s.base.config.vocab_size);
  EXPECT_EQ(ObjectiveRunner::Create(s.base, s.stack, bad, 1, ro).status().code(),
            absl::StatusCode::kInvalidArgument);
  ObjectiveRunnerOptions negative_blocks;
  negative_blocks.beside_merge_blocks = -1;
  EXPECT_EQ(
      ObjectiveRunner::Create(s.base, s.stack, s.examples, 1, negative_blocks).status().code(),
      absl::StatusCode::kInvalidArgument);
  auto runner = ObjectiveRunner::Create(s.base, s.stack, s.examples, 2, ro);
  ASSERT_TRUE(runner.ok()) << runner.status();
  EXPECT_EQ((*runner)->graph_status(), "not a CUDA device");
  EXPECT_EQ((*runner)->capacity(), 2);
  EXPECT_FALSE((*runner)->Losses({0.1, 0.2}, 0).ok());
  EXPECT_FALSE((*runner)->Losses({0.1, 0.2, 0.3, 0.4, 0.5, 0.6}, 3).ok());
  EXPECT_FALSE((*runner)->Losses({0.1, 0.2, 0.3}, 2).ok());
  EXPECT_TRUE((*runner)->Losses({0.1, 0.2}, 1).ok());
}

}  // namespace
}  // namespace lorahub::model
