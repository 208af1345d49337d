// CachedModuleResolver over a real store (a SQLite file): repeated lookups
// reach the store once; the store's module writes (insert, update, delete)
// are seen at the next lookup; answers older than max_age are asked again;
// errors are not remembered.
#include "core/serving/cached_module_resolver.h"

#include <string>

#include "absl/time/time.h"
#include "core/store/store.h"
#include "gtest/gtest.h"
#include "tests/store/store_test_util.h"

namespace lorahub::serving {
namespace {

using store::ModuleRecord;
using store::Store;

class CachedModuleResolverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto opened = Store::Open(store::testing::OptionsFor(dir_.File("store.db")));
    ASSERT_TRUE(opened.ok()) << opened.status();
    store_ = *std::move(opened);
    ASSERT_TRUE(store_->InsertModule(Module("m1", "/modules/m1", "aa")).ok());
    CachedResolverOptions options;
    options.version = [this] { return store_->module_version(); };
    options.now = [this] { return now_; };
    resolver_ = CachedModuleResolver(
        [this](const std::string& id) -> absl::StatusOr<ModuleLocation> {
          ++store_lookups_;
          absl::StatusOr<ModuleRecord> r = store_->GetModule(id);
          if (!r.ok()) return r.status();
          return ModuleLocation{r->local_path, r->weights_sha256};
        },
        options);
  }

  static ModuleRecord Module(const std::string& id, const std::string& path,
                             const std::string& sha) {
    ModuleRecord m;
    m.id = id;
    m.source = store::ModuleSource::kLocal;
    m.local_path = path;
    m.weights_sha256 = sha;
    m.rank = 16;
    m.targets = {"q", "v"};
    return m;
  }

  std::string PathOf(const std::string& id) {
    absl::StatusOr<ModuleLocation> loc = resolver_(id);
    return loc.ok() ? loc->dir : std::string(absl::StatusCodeToString(loc.status().code()));
  }

  store::testing::TempDir dir_;
  std::unique_ptr<Store> store_;
  absl::Time now_ = absl::FromUnixSeconds(1000);
  int store_lookups_ = 0;
  ModuleResolver resolver_;
};

TEST_F(CachedModuleResolverTest, RepeatedLookupsReachTheStoreOnce) {
  for (int i = 0; i < 5; ++i) EXPECT_EQ(PathOf("m1"), "/modules/m1");
  EXPECT_EQ(store_lookups_, 1);
  const absl::StatusOr<ModuleLocation> loc = resolver_("m1");
  ASSERT_TRUE(loc.ok());
  EXPECT_EQ(loc->weights_sha256, "aa");
}

TEST_F(CachedModuleResolverTest, StoreWritesAreSeenAtTheNextLookup) {
  EXPECT_EQ(PathOf("m1"), "/modules/m1");
  ASSERT_TRUE(store_->UpdateModule(Module("m1", "/modules/m1-v2", "bb")).ok());
  EXPECT_EQ(PathOf("m1"), "/modules/m1-v2");
  EXPECT_EQ(store_lookups_, 2);
  ASSERT_TRUE(store_->DeleteModule("m1").ok());
  EXPECT_EQ(PathOf("m1"), "NOT_FOUND");
  // Errors are not remembered: a module registered afterwards is found.
  EXPECT_EQ(PathOf("m2"), "NOT_FOUND");
  ASSERT_TRUE(store_->InsertModule(Module("m2", "/modules/m2", "cc")).ok());
  EXPECT_EQ(PathOf("m2"), "/modules/m2");
  EXPECT_EQ(PathOf("m2"), "/modules/m2");
  EXPECT_EQ(store_lookups_, 5);
}

TEST_F(CachedModuleResolverTest, OldAnswersAreAskedAgain) {
  EXPECT_EQ(PathOf("m1"), "/modules/m1");
  now_ += absl::Milliseconds(999);
  EXPECT_EQ(PathOf("m1"), "/modules/m1");
  EXPECT_EQ(store_lookups_, 1);
  now_ += absl::Milliseconds(1);  // one second after the answer
  EXPECT_EQ(PathOf("m1"), "/modules/m1");
  EXPECT_EQ(store_lookups_, 2);
}

}  // namespace
}  // namespace lorahub::serving
