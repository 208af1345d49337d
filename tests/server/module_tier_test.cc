// The module cache's memory tiers: LRU order, byte budgets, pinning by
// reference, RESOURCE_EXHAUSTED when the budget is pinned, and the per-tier
// metrics; then the tiers behind AdapterCache with the real test modules
// (disk -> host -> device) and in a running engine.
#include "core/serving/module_tier.h"

#include <filesystem>
#include <fstream>
#include <future>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <prometheus/registry.h>

#include "absl/strings/match.h"
#include "core/io/safetensors.h"
#include "core/metrics/metrics.h"
#include "core/model/fused_ops.h"
#include "core/model/loader.h"
#include "core/serving/adapter_cache.h"
#include "core/serving/inference_engine.h"

namespace lorahub::serving {
namespace {

using ::testing::ElementsAre;

// An adapter of one site whose factors take exactly `bytes` (fp32).
std::shared_ptr<const model::LoraAdapter> Sized(const std::string& name,
                                                int64_t bytes) {
  model::LoraAdapter a;
  a.name = name;
  model::LoraSite s;
  s.site = 0;
  const int64_t floats = bytes / 4;  // bytes is a multiple of 4 here
  s.a = at::zeros({floats / 2}, at::kFloat);
  s.b = at::zeros({floats - floats / 2}, at::kFloat);
  a.sites.push_back(s);
  return std::make_shared<const model::LoraAdapter>(std::move(a));
}

// Value of one series of the registry, or nullopt.
std::optional<double> Value(prometheus::Registry& registry,
                            const std::string& name, const std::string& tier) {
  for (const auto& family : registry.Collect()) {
    if (family.name != name) continue;
    for (const auto& m : family.metric) {
      for (const auto& l : m.label) {
        if (l.name == "tier" && l.value == tier) {
          if (family.type == prometheus::MetricType::Counter) return m.counter.value;
          return m.gauge.value;
        }
      }
    }
  }
  return std::nullopt;
}

class TierTest : public ::testing::Test {
 protected:
  void SetUp() override {
    registry_ = std::make_shared<prometheus::Registry>();
    auto m = metrics::ServiceMetrics::Create(registry_);
    ASSERT_TRUE(m.ok()) << m.status();
    metrics_ = *std::move(m);
  }
  ModuleTierOptions Options(int64_t budget) {
    ModuleTierOptions o;
    o.name = "cpu";
    o.tier = metrics::CacheTier::kDevice;
    o.byte_budget = budget;
    o.budget_flag = "--device-cache-bytes";
    o.metrics = metrics_.get();
    return o;
  }
  std::optional<double> Metric(const std::string& name,
                               const std::string& tier = "device") {
    return Value(*registry_, name, tier);
  }

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<metrics::ServiceMetrics> metrics_;
};

TEST_F(TierTest, AdapterBytesCountsBothFactors) {
  EXPECT_EQ(ModuleTier::AdapterBytes(*Sized("x", 800)), 800);
}

TEST_F(TierTest, EvictsTheLeastRecentlyUsedFirst) {
  ModuleTier tier(Options(300));
  ASSERT_TRUE(tier.Insert("a", Sized("a", 100)).ok());
  ASSERT_TRUE(tier.Insert("b", Sized("b", 100)).ok());
  ASSERT_TRUE(tier.Insert("c", Sized("c", 100)).ok());
  EXPECT_THAT(tier.Keys(), ElementsAre("c", "b", "a"));
  ASSERT_NE(tier.Lookup("a"), nullptr);  // a is now the most recent
  EXPECT_THAT(tier.Keys(), ElementsAre("a", "c", "b"));
  // d needs 100 more bytes: b (least recently used) goes, not a.
  ASSERT_TRUE(tier.Insert("d", Sized("d", 100)).ok());
  EXPECT_THAT(tier.Keys(), ElementsAre("d", "a", "c"));
  EXPECT_FALSE(tier.Contains("b"));
  EXPECT_EQ(tier.resident_bytes(), 300);
  // A 200-byte entry evicts the two least recent ones.
  ASSERT_TRUE(tier.Insert("e", Sized("e", 200)).ok());
  EXPECT_THAT(tier.Keys(), ElementsAre("e", "d"));
  EXPECT_EQ(tier.resident_bytes(), 300);
  EXPECT_EQ(Metric("lorahub_module_cache_evictions_total"), 3.0);
  EXPECT_EQ(Metric("lorahub_module_cache_resident_bytes"), 300.0);
  EXPECT_EQ(Metric("lorahub_module_cache_hits_total"), 1.0);
}

TEST_F(TierTest, DerivedEntriesAreEvictedBeforeOthers) {
  ModuleTier tier(Options(400));
  ASSERT_TRUE(tier.Insert("m0", Sized("m0", 100)).ok());
  ASSERT_TRUE(tier.Insert("c0", Sized("c0", 100), /*derived=*/true).ok());
  ASSERT_TRUE(tier.Insert("m1", Sized("m1", 100)).ok());
  ASSERT_TRUE(tier.Insert("c1", Sized("c1", 100), /*derived=*/true).ok());
  // m0 is the least recently used, but the compositions go first, oldest
  // first.
  ASSERT_TRUE(tier.Insert("c2", Sized("c2", 100), /*derived=*/true).ok());
  EXPECT_THAT(tier.Keys(), ElementsAre("c2", "c1", "m1", "m0"));
  ASSERT_TRUE(tier.Insert("c3", Sized("c3", 200), /*derived=*/true).ok());
  EXPECT_THAT(tier.Keys(), ElementsAre("c3", "m1", "m0"));
  // Without enough derived bytes, modules go too, least recently used
  // first, after every derived entry.
  ASSERT_TRUE(tier.Insert("m2", Sized("m2", 300)).ok());
  EXPECT_THAT(tier.Keys(), ElementsAre("m2", "m1"));
  EXPECT_EQ(Metric("lorahub_module_cache_evictions_total"), 5.0);  // c0, c1, c2, c3, m0
}

// CheckRoom says what Insert would, without evicting anything.
TEST_F(TierTest, CheckRoomCountsOnlyPinnedEntries) {
  ModuleTier tier(Options(300));
  auto m0 = tier.Insert("m0", Sized("m0", 100));  // held: pinned
  ASSERT_TRUE(m0.ok());
  ASSERT_TRUE(tier.Insert("c0", Sized("c0", 100), /*derived=*/true).ok());
  EXPECT_TRUE(tier.CheckRoom("c1", 200).ok());  // c0 could go
  EXPECT_THAT(tier.Keys(), ElementsAre("c0", "m0"));
  const absl::Status full = tier.CheckRoom("c1", 208);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(full.message(), "100 of the budget of 300")) << full;
  EXPECT_EQ(tier.Insert("c1", Sized("c1", 208)).status().code(), full.code());
  EXPECT_EQ(tier.CheckRoom("huge", 304).code(), absl::StatusCode::kResourceExhausted);
  m0->reset();  // unpinned: all of the budget could be freed
  EXPECT_TRUE(tier.CheckRoom("c1", 300).ok());
}

TEST_F(TierTest, LookupCountsHitsAndMissesAndContainsDoesNot) {
  ModuleTier tier(Options(1000));
  EXPECT_EQ(tier.Lookup("a"), nullptr);
  ASSERT_TRUE(tier.Insert("a", Sized("a", 100)).ok());
  EXPECT_NE(tier.Lookup("a"), nullptr);
  EXPECT_NE(tier.Lookup("a"), nullptr);
  EXPECT_TRUE(tier.Contains("a"));
  EXPECT_FALSE(tier.Contains("b"));
  EXPECT_EQ(Metric("lorahub_module_cache_hits_total"), 2.0);
  EXPECT_EQ(Metric("lorahub_module_cache_misses_total"), 1.0);
  // Other tiers' series are untouched.
  EXPECT_EQ(Metric("lorahub_module_cache_hits_total", "host"), 0.0);
}

TEST_F(TierTest, InsertingAPresentKeyKeepsTheFirstEntry) {
  ModuleTier tier(Options(1000));
  auto first = Sized("a", 100);
  ASSERT_TRUE(tier.Insert("a", first).ok());
  auto again = tier.Insert("a", Sized("a2", 100));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->get(), first.get());
  EXPECT_EQ(tier.resident_bytes(), 100);
}

TEST_F(TierTest, AnEntryLargerThanTheBudgetIsRefusedNamingTheFlag) {
  ModuleTier tier(Options(100));
  auto r = tier.Insert("big", Sized("big", 200));
  ASSERT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "--device-cache-bytes"))
      << r.status();
  EXPECT_EQ(tier.size(), 0u);
  EXPECT_EQ(Metric("lorahub_module_cache_resident_bytes"), 0.0);
}

TEST_F(TierTest, PinnedEntriesAreNeverEvicted) {
  ModuleTier tier(Options(200));
  auto a = tier.Insert("a", Sized("a", 100));
  ASSERT_TRUE(a.ok());
  std::shared_ptr<const model::LoraAdapter> pin = *a;  // a request holds a
  a = absl::UnknownError("dropped");
  ASSERT_TRUE(tier.Insert("b", Sized("b", 100)).ok());
  ASSERT_NE(tier.Lookup("b"), nullptr);  // b is more recent than a...
  // ...but a is pinned, so c evicts b.
  EXPECT_TRUE(tier.Pinned("a"));
  EXPECT_FALSE(tier.Pinned("b"));
  ASSERT_TRUE(tier.Insert("c", Sized("c", 100)).ok());
  EXPECT_THAT(tier.Keys(), ElementsAre("c", "a"));
  EXPECT_FALSE(tier.Erase("a"));  // pinned: stays
  EXPECT_TRUE(tier.Contains("a"));
  pin.reset();
  EXPECT_FALSE(tier.Pinned("a"));
  ASSERT_TRUE(tier.Insert("d", Sized("d", 100)).ok());
  EXPECT_THAT(tier.Keys(), ElementsAre("d", "c"));  // a went once unpinned
}

TEST_F(TierTest, ABudgetTakenByPinnedEntriesIsResourceExhausted) {
  ModuleTier tier(Options(200));
  auto a = tier.Insert("a", Sized("a", 100));
  auto b = tier.Insert("b", Sized("b", 100));
  ASSERT_TRUE(a.ok() && b.ok());
  auto c = tier.Insert("c", Sized("c", 100));
  ASSERT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(absl::StrContains(c.status().message(), "pinned")) << c.status();
  EXPECT_TRUE(absl::StrContains(c.status().message(), "cpu")) << c.status();
  EXPECT_THAT(tier.Keys(), ElementsAre("b", "a"));
  EXPECT_EQ(tier.resident_bytes(), 200);
  EXPECT_EQ(Metric("lorahub_module_cache_evictions_total"), 0.0);
  // One request ends: its entry becomes evictable and c fits.
  b = absl::UnknownError("released");
  ASSERT_TRUE(tier.Insert("c", Sized("c", 100)).ok());
  EXPECT_THAT(tier.Keys(), ElementsAre("c", "a"));
  EXPECT_EQ(Metric("lorahub_module_cache_evictions_total"), 1.0);
}

TEST_F(TierTest, TiersSharingALabelSumTheirResidentBytes) {
  {
    ModuleTier d0(Options(1000));
    ModuleTier d1(Options(1000));
    ASSERT_TRUE(d0.Insert("a", Sized("a", 100)).ok());
    ASSERT_TRUE(d1.Insert("a", Sized("a", 200)).ok());
    EXPECT_EQ(Metric("lorahub_module_cache_resident_bytes"), 300.0);
    EXPECT_TRUE(d0.Erase("a"));
    EXPECT_EQ(Metric("lorahub_module_cache_resident_bytes"), 200.0);
  }
  EXPECT_EQ(Metric("lorahub_module_cache_resident_bytes"), 0.0);
}

// AdapterCache over the real test modules.
const char kCase[] = "tests/testdata/t5/gated_untied";

class TieredCacheTest : public TierTest {
 protected:
  static void SetUpTestSuite() {
    auto w = model::LoadT5(std::string(kCase) + "/model", {});
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = new std::shared_ptr<const model::T5Weights>(
        std::make_shared<const model::T5Weights>(*std::move(w)));
  }
  static void TearDownTestSuite() { delete weights_; }

  static ModuleResolver Resolver() {
    return [](const std::string& id) -> absl::StatusOr<ModuleLocation> {
      if (id != "m0" && id != "m1" && id != "m2") {
        return absl::NotFoundError("module '" + id + "' not found");
      }
      return ModuleLocation{std::string(kCase) + "/adapters/" + id, id};
    };
  }
  // Bytes of one test module (they all have the same shapes).
  static int64_t ModuleBytes() {
    auto a = model::LoadLoraAdapter(**weights_, std::string(kCase) + "/adapters/m0");
    EXPECT_TRUE(a.ok()) << a.status();
    return a.ok() ? ModuleTier::AdapterBytes(*a) : 0;
  }
  std::shared_ptr<ModuleTier> Host(int64_t budget) {
    ModuleTierOptions o = Options(budget);
    o.name = "host";
    o.tier = metrics::CacheTier::kHost;
    o.budget_flag = "--host-cache-bytes";
    return std::make_shared<ModuleTier>(o);
  }

  static std::shared_ptr<const model::T5Weights>* weights_;
};
std::shared_ptr<const model::T5Weights>* TieredCacheTest::weights_ = nullptr;

TEST_F(TieredCacheTest, ModulesGoFromDiskToHostToDevice) {
  const int64_t one = ModuleBytes();
  ASSERT_GT(one, 0);
  auto host = Host(10 * one);
  // The device tier holds one module.
  AdapterCache cache(weights_->get(), Resolver(), host, Options(one));
  auto m0 = cache.GetModule("m0");
  ASSERT_TRUE(m0.ok()) << m0.status();
  EXPECT_EQ((*m0)->name, "m0");
  EXPECT_TRUE(host->Contains("sha:m0"));
  EXPECT_TRUE(cache.device_tier().Contains("sha:m0"));
  EXPECT_EQ(Metric("lorahub_module_cache_misses_total", "device"), 1.0);
  EXPECT_EQ(Metric("lorahub_module_cache_misses_total", "host"), 1.0);
  // The same adapter as loading the directory directly; on the host its
  // factors lie in one buffer (one copy to a device), in site order.
  auto direct = model::LoadLoraAdapter(**weights_, std::string(kCase) + "/adapters/m0");
  ASSERT_TRUE(direct.ok());
  ModuleTier::Adapter on_host = host->Lookup("sha:m0");
  ASSERT_NE(on_host, nullptr);
  ASSERT_EQ((*m0)->sites.size(), direct->sites.size());
  ASSERT_EQ(on_host->sites.size(), direct->sites.size());
  int64_t offset = 0;
  for (size_t i = 0; i < direct->sites.size(); ++i) {
    EXPECT_TRUE(at::equal((*m0)->sites[i].a, direct->sites[i].a));
    EXPECT_TRUE(at::equal((*m0)->sites[i].b, direct->sites[i].b));
    EXPECT_EQ((*m0)->sites[i].scaling, direct->sites[i].scaling);
    const model::LoraSite& h = on_host->sites[i];
    EXPECT_TRUE(at::equal(h.a, direct->sites[i].a));
    EXPECT_TRUE(at::equal(h.b, direct->sites[i].b));
    EXPECT_EQ(h.a.storage().data(), on_host->sites[0].a.storage().data());
    EXPECT_EQ(h.a.storage_offset(), offset);
    offset += h.a.numel();
    EXPECT_EQ(h.b.storage_offset(), offset);
    offset += h.b.numel();
  }
  on_host.reset();
  m0 = absl::UnknownError("request done");
  // m1 evicts m0 from the device, not from the host.
  ASSERT_TRUE(cache.GetModule("m1").ok());
  EXPECT_FALSE(cache.device_tier().Contains("sha:m0"));
  EXPECT_TRUE(host->Contains("sha:m0"));
  EXPECT_EQ(Metric("lorahub_module_cache_evictions_total", "device"), 1.0);
  // m0 again: a device miss served by the host tier.
  ASSERT_TRUE(cache.GetModule("m0").ok());
  EXPECT_EQ(Metric("lorahub_module_cache_hits_total", "host"), 2.0);  // and the Lookup above
  EXPECT_EQ(Metric("lorahub_module_cache_misses_total", "host"), 2.0);
  EXPECT_EQ(Metric("lorahub_module_cache_resident_bytes", "host"), 2.0 * one);
  EXPECT_EQ(Metric("lorahub_module_cache_resident_bytes", "device"), 1.0 * one);
  // And a device hit.
  ASSERT_TRUE(cache.GetModule("m0").ok());
  EXPECT_EQ(Metric("lorahub_module_cache_hits_total", "device"), 1.0);
}

TEST_F(TieredCacheTest, AModuleInUseIsPinnedAndTheNextOneIsRefused) {
  const int64_t one = ModuleBytes();
  AdapterCache cache(weights_->get(), Resolver(), Host(10 * one), Options(one));
  auto m0 = cache.GetModule("m0");  // held: a request in flight
  ASSERT_TRUE(m0.ok());
  auto m1 = cache.GetModule("m1");
  ASSERT_EQ(m1.status().code(), absl::StatusCode::kResourceExhausted) << m1.status();
  EXPECT_TRUE(absl::StrContains(m1.status().message(), "--device-cache-bytes"));
  EXPECT_TRUE(cache.device_tier().Contains("sha:m0"));
  // A composition also needs room next to its modules.
  AdapterSpec spec;
  spec.module_ids = {"m0"};
  spec.weights = {0.5};
  EXPECT_EQ(cache.Get(spec).status().code(), absl::StatusCode::kResourceExhausted);
  m0 = absl::UnknownError("done");
  EXPECT_TRUE(cache.GetModule("m1").ok());
}

// A stream of distinct compositions over a pool of modules, two at a time,
// on a device tier with room for the pool and one composition: each new
// composition evicts the previous one, never a module the next one needs
// (plain LRU evicted the module the last composition did not use: a host
// copy for every composition).
TEST_F(TieredCacheTest, CompositionsDoNotEvictModules) {
  const int64_t one = ModuleBytes();
  AdapterCache cache(weights_->get(), Resolver(), Host(10 * one), Options(4 * one));
  for (const char* m : {"m0", "m1", "m2"}) ASSERT_TRUE(cache.GetModule(m).ok());
  const std::vector<std::vector<std::string>> pairs = {{"m0", "m1"}, {"m1", "m2"}, {"m2", "m0"}};
  for (int i = 0; i < 9; ++i) {
    AdapterSpec spec;
    spec.module_ids = pairs[i % 3];
    spec.weights = {0.5 + 0.01 * i, -0.3};
    ASSERT_TRUE(cache.Get(spec).ok()) << "composition " << i;
  }
  for (const char* key : {"sha:m0", "sha:m1", "sha:m2"}) {
    EXPECT_TRUE(cache.device_tier().Contains(key)) << key;
  }
  EXPECT_EQ(Metric("lorahub_module_cache_hits_total", "host"), 0.0);  // no module came back
  EXPECT_EQ(Metric("lorahub_module_cache_evictions_total", "device"), 8.0);
}

// A composition resolves each of its modules once (every resolve is a
// store lookup on the engine thread), hit or miss.
TEST_F(TieredCacheTest, ACompositionResolvesEachModuleOnce) {
  int resolves = 0;
  ModuleResolver counting = [&resolves](const std::string& id) {
    ++resolves;
    return Resolver()(id);
  };
  AdapterCache cache(weights_->get(), counting, Host(10 * ModuleBytes()), Options(1 << 30));
  AdapterSpec spec;
  spec.module_ids = {"m0", "m1", "m2"};
  spec.weights = {0.5, 0.3, 0.2};
  ASSERT_TRUE(cache.Get(spec).ok());  // modules loaded, composed
  EXPECT_EQ(resolves, 3);
  ASSERT_TRUE(cache.Get(spec).ok());  // the composition found
  EXPECT_EQ(resolves, 6);
}

// Modules that cannot be composed are refused as such (INVALID_ARGUMENT)
// even while the device tier has no room for a composition: a waiting
// request would otherwise wait for room, then fail anyway.
TEST_F(TieredCacheTest, MismatchedModulesAreRefusedBeforeWaitingForRoom) {
  // "mq": m0 with its q factors only.
  const std::string dir = ::testing::TempDir() + "/mq";
  std::filesystem::create_directories(dir);
  const std::string m0 = std::string(kCase) + "/adapters/m0";
  auto tensors = io::ReadSafetensorsFile(m0 + "/adapter_model.safetensors");
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  io::TensorMap q_only;
  for (const auto& [name, t] : *tensors) {
    if (absl::StrContains(name, ".q.")) q_only.emplace(name, t);
  }
  ASSERT_FALSE(q_only.empty());
  ASSERT_TRUE(io::WriteSafetensorsFile(dir + "/adapter_model.safetensors", q_only, {}).ok());
  std::ifstream in(m0 + "/adapter_config.json");
  std::string config((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t at = config.find("\"target_modules\"");
  ASSERT_NE(at, std::string::npos);
  const size_t open = config.find('[', at), close = config.find(']', at);
  config.replace(open, close - open + 1, "[\"q\"]");
  std::ofstream(dir + "/adapter_config.json") << config;
  ModuleResolver resolver = [dir](const std::string& id) -> absl::StatusOr<ModuleLocation> {
    if (id == "mq") return ModuleLocation{dir, "mq"};
    return Resolver()(id);
  };
  const int64_t one = ModuleBytes();
  AdapterCache cache(weights_->get(), resolver, Host(10 * one), Options(2 * one));
  auto mq = cache.GetModule("mq");  // held, as by a request in flight
  ASSERT_TRUE(mq.ok()) << mq.status();
  auto m1 = cache.GetModule("m1");  // held too: no room for a composition
  ASSERT_TRUE(m1.ok()) << m1.status();
  AdapterSpec spec;
  spec.weights = {0.5, 0.5};
  spec.module_ids = {"m0", "m1"};
  EXPECT_EQ(cache.Get(spec).status().code(), absl::StatusCode::kResourceExhausted);
  spec.module_ids = {"m1", "mq"};
  const absl::Status mismatched = cache.Get(spec).status();
  EXPECT_EQ(mismatched.code(), absl::StatusCode::kInvalidArgument) << mismatched;
}

// Mix gives a LoraHub composition (or one module) as its modules' flat
// buffers and weights under Get's content key, pinning the modules while
// held and keeping no composition; nullptr where only Get composes (other
// methods, more modules than a slot sum takes, no modules); Get's errors
// for the modules.
TEST_F(TieredCacheTest, AMixIsTheModulesBuffersUnderTheCompositionsKey) {
  const int64_t one = ModuleBytes();
  AdapterCache cache(weights_->get(), Resolver(), Host(10 * one), Options(10 * one));
  AdapterSpec spec;
  spec.module_ids = {"m0", "m1", "m2"};
  spec.weights = {0.5, -0.3, 0.8};
  auto mix = cache.Mix(spec);
  ASSERT_TRUE(mix.ok()) << mix.status();
  ASSERT_NE(*mix, nullptr);
  const model::ModuleMix& m = **mix;
  ASSERT_EQ(m.modules.size(), 3u);
  ASSERT_EQ(m.flats.size(), 3u);
  EXPECT_EQ(m.weights, spec.weights);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(m.modules[i]->name, spec.module_ids[i]);
    const at::Tensor flat = model::FlatFactors(*m.modules[i]);
    ASSERT_TRUE(flat.defined());
    EXPECT_EQ(m.flats[i].data_ptr(), flat.data_ptr());
    EXPECT_EQ(m.flats[i].numel(), flat.numel());
    EXPECT_TRUE(cache.device_tier().Pinned("sha:" + spec.module_ids[i]));
  }
  EXPECT_EQ(cache.size(), 3u);  // the modules: no composition kept
  // Get's composition of the same spec is keyed as the mix is.
  ASSERT_TRUE(cache.Get(spec).ok());
  EXPECT_EQ(cache.device_tier().Keys().front(), m.key);
  // One module alone: weight 1.
  AdapterSpec single;
  single.module_ids = {"m1"};
  auto one_mix = cache.Mix(single);
  ASSERT_TRUE(one_mix.ok() && *one_mix != nullptr) << one_mix.status();
  EXPECT_EQ((*one_mix)->weights, std::vector<double>({1.0}));
  EXPECT_NE((*one_mix)->key, m.key);
  // Where only Get composes.
  AdapterSpec ties = spec;
  ties.method = "ties";
  ties.density = 0.5;
  AdapterSpec many;
  for (int i = 0; i <= model::kMaxSliceSumTerms; ++i) {
    many.module_ids.push_back("m" + std::to_string(i % 3));
    many.weights.push_back(0.1);
  }
  const AdapterSpec base_model;
  for (const AdapterSpec* s : std::vector<const AdapterSpec*>{&ties, &many, &base_model}) {
    auto none = cache.Mix(*s);
    ASSERT_TRUE(none.ok()) << none.status();
    EXPECT_EQ(*none, nullptr);
  }
  AdapterSpec unknown;
  unknown.module_ids = {"m0", "nope"};
  unknown.weights = {1, 1};
  EXPECT_EQ(cache.Mix(unknown).status().code(), absl::StatusCode::kNotFound);
  mix->reset();
  one_mix->reset();
  for (const char* key : {"sha:m0", "sha:m1", "sha:m2"}) {
    EXPECT_FALSE(cache.device_tier().Pinned(key)) << key;
  }
}

TEST_F(TieredCacheTest, WithoutAHostTierModulesGoStraightToTheDevice) {
  AdapterCache cache(weights_->get(), Resolver(), nullptr, Options(1 << 30));
  ASSERT_TRUE(cache.WarmHost("m2").ok());
  EXPECT_TRUE(cache.OnDevice(ModuleLocation{"ignored", "m2"}));
  EXPECT_EQ(cache.GetModule("nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Metric("lorahub_module_cache_misses_total", "host"), 0.0);
}

TEST_F(TieredCacheTest, ARequestInFlightPinsItsAdapterInTheEngine) {
  const int64_t one = ModuleBytes();
  EngineOptions o;
  o.max_new_tokens = 64;
  o.host_tier = Host(10 * one);
  o.device_cache_bytes = one;
  auto engine = InferenceEngine::Start(*weights_, Resolver(), o, metrics_.get());
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto run = [&](const std::string& module) {
    std::promise<GenerateOutcome> done;
    GenerateRequest r;
    r.input_ids = {5, 6, 7, 1};
    r.adapter.module_ids = {module};
    r.params.max_new_tokens = 4;
    r.on_done = [&done](GenerateOutcome out) { done.set_value(std::move(out)); };
    EXPECT_TRUE((*engine)->Submit(std::move(r)).ok());
    return done.get_future().get();
  };
  EXPECT_TRUE(run("m0").status.ok());
  EXPECT_TRUE((*engine)->adapters().device_tier().Contains("sha:m0"));
  // Outside a request, the job's hold pins m0 (as a compose job does):
  // a request for m1 cannot get room on the device.
  auto pin = (*engine)->adapters().GetModule("m0");
  ASSERT_TRUE(pin.ok());
  GenerateOutcome refused = run("m1");
  EXPECT_EQ(refused.status.code(), absl::StatusCode::kResourceExhausted)
      << refused.status;
  pin = absl::UnknownError("job done");
  EXPECT_TRUE(run("m1").status.ok());
  EXPECT_TRUE((*engine)->adapters().device_tier().Contains("sha:m1"));
  EXPECT_FALSE((*engine)->adapters().device_tier().Contains("sha:m0"));
  EXPECT_TRUE(o.host_tier->Contains("sha:m0"));
}

}  // namespace
}  // namespace lorahub::serving
