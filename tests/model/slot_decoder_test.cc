// StaticDecoder's row slots (CreateSlots: continuous batching) against one
// eager DecodeStep decoder per row on tiny random models: rows that join at
// different steps, with their own prompt lengths and adapters (or none),
// slots reused by later rows, the decoder grown under running rows, the
// adapter bank changing under running rows, and bad inputs.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/model/cuda_graph.h"
#include "core/model/lora.h"
#include "core/model/slot_bank.h"
#include "core/model/static_decoder.h"
#include "core/model/t5_forward.h"
#include "core/model/t5_weights.h"
#include "gtest/gtest.h"
#include "tests/model/tiny_t5.h"

namespace lorahub::model {
namespace {

// One request decoded alone by the eager DecodeStep: the reference.
struct Reference {
  std::vector<int64_t> prompt;
  int adapter = -1;  // index into the test's adapters, -1: none
  EncoderOutput enc;
  DecoderCache cache;
  RowAdapters rows;
  std::unique_ptr<AdapterBank> bank;
  int64_t slot_row = -1;  // its row slot in the decoder
  int64_t steps = 0;
};

class SlotDecoderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = testing::GatedConfig();
    auto device = testing::TestDevice();
    ASSERT_TRUE(device.ok()) << "LORAHUB_TEST_DEVICE: " << device.status();
    WeightOptions o;
    o.device = *device;
    auto w = BuildT5Weights(config_, testing::RandomT5(config_, 23, 0.6), o);
    ASSERT_TRUE(w.ok()) << w.status();
    base_ = *w;
    // The second adapter adapts sites the first does not (o, wo): loading
    // it widens the resident bank under running rows.
    const std::vector<std::vector<std::string>> targets = {
        {"q", "v"}, {"q", "k", "v", "o", "wo"}, {"q", "v"}};
    for (size_t i = 0; i < targets.size(); ++i) {
      auto cfg = testing::MakeLoraConfig(targets[i], 4, 16);
      auto a = BuildLoraAdapter(base_, cfg,
                                testing::RandomAdapter(base_, cfg, 40 + i),
                                "a" + std::to_string(i));
      ASSERT_TRUE(a.ok()) << a.status();
      adapters_.push_back(std::make_shared<LoraAdapter>(*a));
    }
    slot_bank_ = std::make_unique<SlotBank>(base_, 4);
  }

  // Encodes `r`'s prompt ([1, S]) with its adapter, alone.
  void Prepare(Reference& r, int64_t capacity) {
    const int64_t s = static_cast<int64_t>(r.prompt.size());
    at::Tensor ids = at::tensor(r.prompt, at::kLong).view({1, s});
    at::Tensor mask = at::ones({1, s}, at::kLong);
    if (r.adapter >= 0) {
      auto bank = MakeAdapterBank(base_, {adapters_[r.adapter].get()});
      ASSERT_TRUE(bank.ok()) << bank.status();
      r.bank = std::make_unique<AdapterBank>(*bank);
      auto rows = MakeRowAdapters(base_, r.bank.get(), {0});
      ASSERT_TRUE(rows.ok()) << rows.status();
      r.rows = *rows;
    }
    auto enc =
        Encode(base_, ids.to(base_.device), mask.to(base_.device), r.rows);
    ASSERT_TRUE(enc.ok()) << enc.status();
    r.enc = *enc;
    auto cache = InitDecoderCache(base_, r.enc, r.rows, capacity);
    ASSERT_TRUE(cache.ok()) << cache.status();
    r.cache = *std::move(cache);
  }

  // Puts `r` into row slot `slot_row` of `d`: its adapter acquired in the
  // slot bank, the decoder given the resident bank, its encoder output (the
  // same prompt, encoded with the bank's slot) loaded.
  void Admit(StaticDecoder& d, Reference& r, int64_t slot_row) {
    r.slot_row = slot_row;
    r.steps = 0;
    std::vector<int64_t> slots = {-1};
    if (r.adapter >= 0) {
      auto slot = slot_bank_->Acquire(adapters_[r.adapter]);
      ASSERT_TRUE(slot.ok()) << slot.status();
      slots = {*slot};
      ASSERT_TRUE(d.SetAdapterBank(&slot_bank_->resident()).ok());
    }
    const AdapterBank* bank =
        r.adapter >= 0 ? &slot_bank_->resident() : nullptr;
    auto rows = MakeRowAdapters(base_, bank, slots);
    ASSERT_TRUE(rows.ok()) << rows.status();
    const int64_t s = static_cast<int64_t>(r.prompt.size());
    at::Tensor ids = at::tensor(r.prompt, at::kLong).view({1, s});
    auto enc = Encode(base_, ids.to(base_.device),
                      at::ones({1, s}, at::kLong).to(base_.device), *rows);
    ASSERT_TRUE(enc.ok()) << enc.status();
    // Every admission through the hook a side stream joins at: called once,
    // with the row's keys and values and the inputs the writes read.
    int joins = 0;
    absl::Status st = d.LoadRows(
        {slot_row}, *enc, *rows, [&](const std::vector<at::Tensor>& crossing) {
          ++joins;
          ASSERT_EQ(crossing.size(), 4u);
          EXPECT_EQ(crossing[0].dim(), 6);
          EXPECT_EQ(crossing[0].size(2), 1);  // [2, L, rows, H, S, d]
          EXPECT_EQ(crossing[0].size(4), s);
          EXPECT_TRUE(crossing[1].is_same(enc->mask_bias));
          EXPECT_TRUE(crossing[2].is_same(rows->slots));
        });
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_EQ(joins, 1);
  }

  // Token of request `id` at its step `s` (the start token at 0).
  int64_t TokenAt(int64_t id, int64_t s) const {
    return s == 0 ? config_.decoder_start_token_id
                  : (3 + 5 * s + 11 * id) % config_.vocab_size;
  }

  // One decoder step (of the leading `rows` slots; 0: all): every running
  // reference consumes its next token in both decoders and their logits
  // must agree. `logits` (if given): the step's, on the CPU.
  void StepAll(StaticDecoder& d, std::vector<Reference*> running,
               const std::string& where, int64_t rows = 0,
               at::Tensor* logits = nullptr) {
    std::vector<int64_t> ids(static_cast<size_t>(d.batch_size()),
                             config_.pad_token_id);
    for (size_t i = 0; i < running.size(); ++i) {
      ids[running[i]->slot_row] =
          TokenAt(static_cast<int64_t>(running[i] - refs_), running[i]->steps);
    }
    auto got = d.Step(at::tensor(ids, at::kLong).to(base_.device), rows);
    ASSERT_TRUE(got.ok()) << got.status();
    const at::Tensor all = got->to(at::kCPU).to(at::kDouble);
    if (logits != nullptr) *logits = all;
    for (Reference* r : running) {
      const int64_t id = static_cast<int64_t>(r - refs_);
      auto want = DecodeStep(
          base_, r->cache,
          at::full({1}, TokenAt(id, r->steps), at::kLong).to(base_.device),
          r->rows);
      ASSERT_TRUE(want.ok()) << want.status();
      const at::Tensor w = want->to(at::kCPU).to(at::kDouble)[0];
      const at::Tensor g = all[r->slot_row];
      ASSERT_TRUE(at::isfinite(g).all().item<bool>());
      const double scale = std::max(1.0, w.abs().max().item<double>());
      EXPECT_LE((g - w).abs().max().item<double>(), 1e-5 * scale)
          << where << ": request " << id << " step " << r->steps;
      ++r->steps;
    }
  }

  config::T5Config config_;
  T5Weights base_;
  std::vector<std::shared_ptr<LoraAdapter>> adapters_;
  std::unique_ptr<SlotBank> slot_bank_;
  Reference refs_[5];
};

TEST_F(SlotDecoderTest, RowsJoiningAtDifferentStepsMatchDecodeStep) {
  const int64_t capacity = 6;
  auto d = StaticDecoder::CreateSlots(base_, {4, capacity, 8}, true);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE((*d)->row_slots());
  refs_[0].prompt = {5, 9, 13, 2, 1};
  refs_[0].adapter = 0;
  refs_[1].prompt = {7, 1};
  refs_[1].adapter = -1;
  refs_[2].prompt = {30, 31, 32, 33, 34, 35, 36, 1};
  refs_[2].adapter = 2;
  refs_[3].prompt = {12, 1};
  refs_[3].adapter = 0;  // the resident adapter of request 0: no copy
  for (Reference& r : refs_) {
    if (!r.prompt.empty()) Prepare(r, capacity);
  }
  Admit(**d, refs_[0], 2);
  StepAll(**d, {&refs_[0]}, "one row");
  if (base_.device.is_cuda() && CudaGraphsCompiled()) {
    EXPECT_TRUE((*d)->graph_active()) << (*d)->graph_status();
  }
  StepAll(**d, {&refs_[0]}, "one row");
  Admit(**d, refs_[1], 0);
  Admit(**d, refs_[2], 3);
  for (int i = 0; i < 3; ++i) {
    StepAll(**d, {&refs_[0], &refs_[1], &refs_[2]}, "three rows");
  }
  // Request 0 has used 5 of 6 positions; request 3 takes request 1's slot.
  const int64_t copies = slot_bank_->copies();
  Admit(**d, refs_[3], 0);
  EXPECT_EQ(slot_bank_->copies(), copies);
  StepAll(**d, {&refs_[0], &refs_[2], &refs_[3]}, "slot reused");
  StepAll(**d, {&refs_[2], &refs_[3]}, "row 0 ended");
  // A free slot past its capacity keeps stepping without harm.
  for (int i = 0; i < 2; ++i) {
    StepAll(**d, {&refs_[3]}, "last row");
  }
  if (base_.device.is_cuda() && CudaGraphsCompiled()) {
    EXPECT_TRUE((*d)->graph_active()) << (*d)->graph_status();
  }
}

TEST_F(SlotDecoderTest, GrowingAndANewBankKeepTheRunningRows) {
  auto d = StaticDecoder::CreateSlots(base_, {3, 4, 4}, true);
  ASSERT_TRUE(d.ok()) << d.status();
  refs_[0].prompt = {5, 9, 1};
  refs_[0].adapter = 0;
  refs_[1].prompt = {30, 31, 32, 33, 34, 35, 1};  // longer than 4
  refs_[1].adapter = 1;  // adds sites: the resident bank changes
  const int64_t capacity = 9;
  for (int i = 0; i < 2; ++i) Prepare(refs_[i], capacity);
  Admit(**d, refs_[0], 1);
  StepAll(**d, {&refs_[0]}, "before growing");
  StepAll(**d, {&refs_[0]}, "before growing");
  // Too long a prompt for the decoder: refused until it grows.
  {
    auto rows = MakeRowAdapters(base_, nullptr, {-1});
    ASSERT_TRUE(rows.ok());
    EXPECT_EQ((*d)->LoadRows({0}, refs_[1].enc, *rows).code(),
              absl::StatusCode::kInvalidArgument);
  }
  ASSERT_TRUE((*d)->Grow(capacity, 8).ok());
  EXPECT_EQ((*d)->capacity(), capacity);
  EXPECT_EQ((*d)->encoder_length(), 8);
  StepAll(**d, {&refs_[0]}, "grown");
  Admit(**d, refs_[1], 2);
  for (int i = 0; i < 4; ++i) {
    StepAll(**d, {&refs_[0], &refs_[1]}, "after the new bank");
  }
  if (base_.device.is_cuda() && CudaGraphsCompiled()) {
    EXPECT_TRUE((*d)->graph_active()) << (*d)->graph_status();
  }
}

// Steps of the leading slots only (Step's rows; the serving engine's light
// load): the rows there match DecodeStep, a row past them keeps its logits
// and position, and goes on where it was once the steps take its slot
// again; a graph for each count of slots stepped.
TEST_F(SlotDecoderTest, StepsOfTheLeadingSlotsLeaveTheRestAsTheyWere) {
  EXPECT_EQ(StaticDecoder::StepRows(1, 128), 8);
  EXPECT_EQ(StaticDecoder::StepRows(8, 128), 8);
  EXPECT_EQ(StaticDecoder::StepRows(9, 128), 16);
  EXPECT_EQ(StaticDecoder::StepRows(100, 128), 128);
  EXPECT_EQ(StaticDecoder::StepRows(129, 256), 256);
  EXPECT_EQ(StaticDecoder::StepRows(3, 4), 4);
  EXPECT_EQ(StaticDecoder::StepRows(18, 20), 20);
  EXPECT_EQ(StaticDecoder::StepRows(0, 20), 20);  // every slot
  const int64_t capacity = 8;
  auto d = StaticDecoder::CreateSlots(base_, {20, capacity, 8}, true);
  ASSERT_TRUE(d.ok()) << d.status();
  refs_[0].prompt = {5, 9, 13, 2, 1};
  refs_[0].adapter = 0;
  refs_[1].prompt = {7, 1};
  refs_[2].prompt = {30, 31, 32, 33, 34, 35, 36, 1};
  refs_[2].adapter = 2;
  for (int i = 0; i < 3; ++i) Prepare(refs_[i], capacity);
  Admit(**d, refs_[0], 1);
  Admit(**d, refs_[1], 3);
  Admit(**d, refs_[2], 17);
  at::Tensor before, after;
  StepAll(**d, {&refs_[0], &refs_[1], &refs_[2]}, "every slot", 0, &before);
  for (int i = 0; i < 3; ++i) {
    StepAll(**d, {&refs_[0], &refs_[1]}, "the first 8 slots", 4, &after);
  }
  EXPECT_TRUE(at::equal(after[17], before[17])) << "slot 17 was stepped";
  // Slot 17 goes on from its second step, the others from their fifth.
  for (int i = 0; i < 2; ++i) {
    StepAll(**d, {&refs_[0], &refs_[1], &refs_[2]}, "18 of 20 slots", 18);
  }
  EXPECT_EQ(refs_[2].steps, 3);
  if (base_.device.is_cuda() && CudaGraphsCompiled()) {
    EXPECT_EQ((*d)->graphs(), 2) << (*d)->graph_status();  // 20 and 8 slots
  }
}

// set_capture_every_count: the first step captures a graph for each count
// of slots a step may take (8, 16 and 20 of 20), and the steps of any count
// after it match DecodeStep as above.
TEST_F(SlotDecoderTest, CapturingEveryCountAtTheFirstStepKeepsTheSteps) {
  const int64_t capacity = 8;
  auto d = StaticDecoder::CreateSlots(base_, {20, capacity, 8}, true);
  ASSERT_TRUE(d.ok()) << d.status();
  (*d)->set_capture_every_count(true);
  refs_[0].prompt = {5, 9, 13, 2, 1};
  refs_[0].adapter = 0;
  refs_[1].prompt = {30, 31, 32, 33, 34, 35, 36, 1};
  refs_[1].adapter = 2;
  for (int i = 0; i < 2; ++i) Prepare(refs_[i], capacity);
  Admit(**d, refs_[0], 1);
  StepAll(**d, {&refs_[0]}, "the first 8 slots", 1);
  const bool graphs = base_.device.is_cuda() && CudaGraphsCompiled();
  if (graphs) EXPECT_EQ((*d)->graphs(), 3) << (*d)->graph_status();
  Admit(**d, refs_[1], 17);
  for (int i = 0; i < 3; ++i) {
    StepAll(**d, {&refs_[0], &refs_[1]}, "18 of 20 slots", 18);
  }
  if (graphs) EXPECT_EQ((*d)->graphs(), 3) << (*d)->graph_status();
}

// CaptureNextCount: each call captures the fewest slots' count without a
// graph (8, 16, then all 20), between the steps of a running row, which go
// on as the reference's; then false. On the CPU (no graphs) false at once.
TEST_F(SlotDecoderTest, CapturingTheNextCountKeepsTheSteps) {
  const int64_t capacity = 8;
  auto d = StaticDecoder::CreateSlots(base_, {20, capacity, 8}, true);
  ASSERT_TRUE(d.ok()) << d.status();
  refs_[0].prompt = {5, 9, 13, 2, 1};
  refs_[0].adapter = 0;
  Prepare(refs_[0], capacity);
  Admit(**d, refs_[0], 1);
  const bool graphs = base_.device.is_cuda() && CudaGraphsCompiled();
  StepAll(**d, {&refs_[0]}, "the first 8 slots", 1);
  if (!graphs) {
    EXPECT_FALSE((*d)->CaptureNextCount());
    return;
  }
  EXPECT_EQ((*d)->graphs(), 1) << (*d)->graph_status();
  for (int64_t want = 2; want <= 3; ++want) {
    EXPECT_TRUE((*d)->CaptureNextCount());
    EXPECT_EQ((*d)->graphs(), want) << (*d)->graph_status();
    StepAll(**d, {&refs_[0]}, "the first 8 slots", 1);
  }
  EXPECT_FALSE((*d)->CaptureNextCount());
  StepAll(**d, {&refs_[0]}, "the first 8 slots", 1);
  EXPECT_EQ((*d)->graphs(), 3) << (*d)->graph_status();
}

TEST_F(SlotDecoderTest, BadInputsAreErrors) {
  EXPECT_EQ(StaticDecoder::CreateSlots(base_, {0, 4, 4}, true).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(StaticDecoder::CreateSlots(base_, {2, 4, 0}, true).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto d = StaticDecoder::CreateSlots(base_, {2, 4, 4}, true);
  ASSERT_TRUE(d.ok()) << d.status();
  refs_[0].prompt = {5, 9, 1};
  refs_[0].adapter = 0;
  Prepare(refs_[0], 4);
  auto none = MakeRowAdapters(base_, nullptr, {-1});
  ASSERT_TRUE(none.ok());
  StaticDecoder& sd = **d;
  bool joined = false;  // no hook for rows that are refused
  EXPECT_EQ(sd.LoadRows({2}, refs_[0].enc, *none,
                        [&](const std::vector<at::Tensor>&) { joined = true; })
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(joined);
  EXPECT_EQ(sd.LoadRows({-1}, refs_[0].enc, *none).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(sd.LoadRows({0, 1}, refs_[0].enc, *none).code(),
            absl::StatusCode::kInvalidArgument);  // one row, two slots
  // An adapter bank the decoder was not given.
  EXPECT_EQ(sd.LoadRows({0}, refs_[0].enc, refs_[0].rows).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(sd.Rebind(refs_[0].enc, *none).code(),
            absl::StatusCode::kFailedPrecondition);
  // The decoder of one position for all rows has no row slots.
  StaticDecoderOptions so;
  so.capacity = 4;
  auto shared = StaticDecoder::Create(base_, refs_[0].enc, *none, so);
  ASSERT_TRUE(shared.ok()) << shared.status();
  EXPECT_EQ((*shared)->LoadRows({0}, refs_[0].enc, *none).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*shared)->Grow(8, 8).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*shared)->SetAdapterBank(nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  // Nothing above changed the slots decoder: it still decodes.
  ASSERT_TRUE(sd.LoadRows({1}, refs_[0].enc, *none).ok());
  const at::Tensor starts =
      at::full({2}, config_.decoder_start_token_id, at::kLong).to(base_.device);
  // Steps of fewer slots than none or more than there are, also for a
  // decoder without row slots.
  EXPECT_EQ(sd.Step(starts, -1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(sd.Step(starts, 3).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*shared)->Step(at::full({1}, config_.decoder_start_token_id,
                                     at::kLong).to(base_.device), 2)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  auto step = sd.Step(starts);
  ASSERT_TRUE(step.ok()) << step.status();
}

}  // namespace
}  // namespace lorahub::model
