// StreamPump (server/stream_pump.h): tasks run on the pump's threads, all of
// them, also those still queued when the pump is destroyed.
#include "server/stream_pump.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <thread>

namespace lorahub::server {
namespace {

TEST(StreamPumpTest, RunsEveryTaskOnItsThreads) {
  std::atomic<int> ran{0};
  std::mutex mu;
  std::set<std::thread::id> threads;
  {
    StreamPump pump(2);
    for (int i = 0; i < 1000; ++i) {
      pump.Post([&] {
        {
          std::lock_guard<std::mutex> lock(mu);
          threads.insert(std::this_thread::get_id());
        }
        ++ran;
      });
    }
  }  // the destructor drains the queue
  EXPECT_EQ(ran.load(), 1000);
  EXPECT_EQ(threads.count(std::this_thread::get_id()), 0u);
  EXPECT_GE(threads.size(), 1u);
  EXPECT_LE(threads.size(), 2u);
}

TEST(StreamPumpTest, TasksQueuedBehindASlowOneStillRunBeforeDestruction) {
  std::atomic<int> ran{0};
  {
    StreamPump pump(1);
    pump.Post([] { std::this_thread::sleep_for(std::chrono::milliseconds(50)); });
    for (int i = 0; i < 10; ++i) pump.Post([&] { ++ran; });
  }
  EXPECT_EQ(ran.load(), 10);
}

TEST(StreamPumpTest, ATaskMayPostAnother) {
  std::atomic<int> ran{0};
  {
    StreamPump pump(1);
    pump.Post([&] {
      ++ran;
      pump.Post([&] { ++ran; });
    });
    while (ran.load() < 2) std::this_thread::yield();
  }
  EXPECT_EQ(ran.load(), 2);
}

}  // namespace
}  // namespace lorahub::server
