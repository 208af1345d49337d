// ModuleLoader: background threads that bring LoRA modules from disk into
// host memory, so that the engine thread, which owns the device and decodes
// every running row, never waits for a disk read.
//
// Why: loading one flan-t5-large module (r = 16 on q and v) from disk takes
// about 48 ms; on the engine thread that stalled every running row for as
// long, once per module a request named first (twentieth session,
// docs/BENCHMARKS.md). Now a request's modules are loaded here while it waits
// in the queue; the engine admits it once they are in memory, and only the
// host-to-device copy (about 1 ms from pinned memory) stays on its thread.
//
// A load is a call of the `load` function given to the constructor (the
// engine passes AdapterCache::Preload). Loads of the same id that overlap
// share one call and one ticket. A failed load is not retried here: its
// ticket is done all the same, and the engine's own lookup reports the error
// to the request (or finds the module after all).
//
// Thread-safety: Load may be called from any thread. `load` and `on_done`
// run on the loader's threads, several at once, and must be thread-safe.
#ifndef LORAHUB_CORE_SERVING_MODULE_LOADER_H_
#define LORAHUB_CORE_SERVING_MODULE_LOADER_H_

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"

namespace lorahub::serving {

class ModuleLoader {
 public:
  // Becomes done (never undone) when the load it stands for has ended,
  // whether it succeeded or not.
  class Ticket {
   public:
    bool done() const { return done_.load(std::memory_order_acquire); }

   private:
    friend class ModuleLoader;
    std::atomic<bool> done_{false};
  };
  using LoadFn = std::function<absl::Status(const std::string& id)>;

  // Starts `threads` (>= 1) threads. `on_done` (may be empty) runs after
  // each load has ended and its ticket is done.
  ModuleLoader(LoadFn load, std::function<void()> on_done, int threads);
  // Waits for the loads in progress; loads not yet started are dropped and
  // their tickets are marked done.
  ~ModuleLoader();
  ModuleLoader(const ModuleLoader&) = delete;
  ModuleLoader& operator=(const ModuleLoader&) = delete;

  // The ticket of a load of `id`: the one in progress or queued, else a new
  // one, queued. Never blocks on a load.
  std::shared_ptr<const Ticket> Load(const std::string& id);

  // Loads that ended (tests and the engine's exit log).
  int64_t loads_done() const { return loads_done_.load(); }

 private:
  void Run();

  const LoadFn load_;
  const std::function<void()> on_done_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::deque<std::string> queue_;
  // Queued or in progress, by id.
  std::map<std::string, std::shared_ptr<Ticket>> pending_;
  std::atomic<int64_t> loads_done_{0};
  std::vector<std::thread> threads_;
};

}  // namespace lorahub::serving

#endif  // LORAHUB_CORE_SERVING_MODULE_LOADER_H_
