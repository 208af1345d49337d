// ModuleLoader: overlapping loads of one id share a call and a ticket;
// tickets end done whatever happens to their load.
#include "core/serving/module_loader.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/status.h"

namespace lorahub::serving {
namespace {

// Loads that block until the test opens the gate, counting calls per id.
class GatedLoads {
 public:
  ModuleLoader::LoadFn Fn() {
    return [this](const std::string& id) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++calls_[id];
      }
      started_.fetch_add(1);
      gate_.wait();
      if (id == "bad") return absl::NotFoundError("no module 'bad'");
      if (id == "throws") throw std::runtime_error("load threw");
      return absl::OkStatus();
    };
  }
  void Open() { open_.set_value(); }
  int Calls(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_[id];
  }
  void WaitStarted(int n) {
    while (started_.load() < n) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }

 private:
  std::promise<void> open_;
  std::shared_future<void> gate_ = open_.get_future().share();
  std::mutex mu_;
  std::map<std::string, int> calls_;
  std::atomic<int> started_{0};
};

void WaitDone(const ModuleLoader::Ticket& t) {
  for (int i = 0; i < 10000 && !t.done(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

TEST(ModuleLoaderTest, OverlappingLoadsShareOneCallAndTicket) {
  GatedLoads loads;
  std::atomic<int> notified{0};
  ModuleLoader loader(loads.Fn(), [&] { notified.fetch_add(1); }, 2);
  auto a = loader.Load("m0");
  auto b = loader.Load("m0");
  auto bad = loader.Load("bad");
  auto throws = loader.Load("throws");
  EXPECT_EQ(a, b);
  loads.WaitStarted(2);
  EXPECT_FALSE(a->done());
  loads.Open();
  for (const auto* t : {a.get(), bad.get(), throws.get()}) {
    WaitDone(*t);
    EXPECT_TRUE(t->done());
  }
  EXPECT_EQ(loads.Calls("m0"), 1);
  // Failed and throwing loads end their tickets too.
  EXPECT_EQ(loads.Calls("bad"), 1);
  EXPECT_EQ(loads.Calls("throws"), 1);
  while (loader.loads_done() < 3) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(notified.load(), 3);
  // A load of an id whose last load ended is a new load.
  auto again = loader.Load("m0");
  EXPECT_NE(again, a);
  WaitDone(*again);
  EXPECT_EQ(loads.Calls("m0"), 2);
}

TEST(ModuleLoaderTest, DestructionEndsQueuedTickets) {
  GatedLoads loads;
  std::shared_ptr<const ModuleLoader::Ticket> running, queued;
  std::thread opener;
  {
    ModuleLoader loader(loads.Fn(), {}, 1);
    running = loader.Load("m0");
    loads.WaitStarted(1);
    queued = loader.Load("m1");
    opener = std::thread([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      loads.Open();
    });
  }  // waits for m0's load; m1's never starts
  opener.join();
  EXPECT_TRUE(running->done());
  EXPECT_TRUE(queued->done());
  EXPECT_EQ(loads.Calls("m1"), 0);
}

}  // namespace
}  // namespace lorahub::serving
