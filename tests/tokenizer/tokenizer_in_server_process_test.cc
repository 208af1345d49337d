// The SentencePiece/protobuf clash (FACTS.md) is a process-level problem, so
// this test is a process like the server: it links and *uses* gRPC, protobuf
// 3.21 and LibTorch before and after loading the tokenizer, and checks the ids
// against the spm_encode golden file.
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <google/protobuf/struct.pb.h>
#include <grpcpp/grpcpp.h>

#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "tests/tokenizer/golden.h"

namespace lorahub::tokenizer {
namespace {

TEST(TokenizerInServerProcessTest, WorksAlongsideProtobufGrpcAndTorch) {
  // protobuf 3.21 is initialised and used first: the order that made an
  // in-process libsentencepiece abort on Load().
  google::protobuf::Struct message;
  (*message.mutable_fields())["k"].set_string_value("v");
  std::string wire = message.SerializeAsString();
  ASSERT_FALSE(wire.empty());
  EXPECT_FALSE(grpc::Version().empty());
  at::Tensor ones = at::ones({2, 2});
  EXPECT_EQ(ones.sum().item<float>(), 4.0f);

  auto tokenizer = T5Tokenizer::Create(testing::kModelPath);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  int checked = 0;
  for (const testing::GoldenLine& line : testing::ReadGolden()) {
    if (line.text == "<extra_id_0>") continue;
    auto ids = (*tokenizer)->Encode(line.text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    std::vector<int> expected = line.ids;
    expected.push_back(1);
    at::Tensor tensor = at::tensor(*ids);  // what the encoder is fed
    ASSERT_EQ(tensor.numel(), static_cast<int64_t>(expected.size()));
    for (size_t i = 0; i < expected.size(); ++i) {
      EXPECT_EQ(tensor[i].item<int>(), expected[i]) << line.text;
    }
    ++checked;
  }
  EXPECT_GE(checked, 15);

  // protobuf still works after the shim is loaded.
  google::protobuf::Struct parsed;
  ASSERT_TRUE(parsed.ParseFromString(wire));
  EXPECT_EQ(parsed.fields().at("k").string_value(), "v");
}

}  // namespace
}  // namespace lorahub::tokenizer
