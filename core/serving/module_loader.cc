#include "core/serving/module_loader.h"

#include <algorithm>
#include <exception>
#include <utility>

namespace lorahub::serving {

ModuleLoader::ModuleLoader(LoadFn load, std::function<void()> on_done, int threads)
    : load_(std::move(load)), on_done_(std::move(on_done)) {
  for (int i = 0; i < std::max(threads, 1); ++i) {
    threads_.emplace_back([this] { Run(); });
  }
}

ModuleLoader::~ModuleLoader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : threads_) t.join();
  // Nobody runs the queued loads now; whoever holds their tickets must not
  // wait for them.
  for (auto& [id, ticket] : pending_) ticket->done_.store(true, std::memory_order_release);
}

std::shared_ptr<const ModuleLoader::Ticket> ModuleLoader::Load(const std::string& id) {
  std::shared_ptr<Ticket> ticket;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pending_.find(id);
    if (it != pending_.end()) return it->second;
    ticket = std::make_shared<Ticket>();
    pending_.emplace(id, ticket);
    queue_.push_back(id);
  }
  cv_.notify_one();
  return ticket;
}

void ModuleLoader::Run() {
  for (;;) {
    std::string id;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      id = std::move(queue_.front());
      queue_.pop_front();
    }
    // The status is dropped on purpose: the engine's lookup reports it.
    try {
      (void)load_(id);
    } catch (const std::exception&) {
      // As for a failed load: the engine's lookup tries again and reports.
    }
    std::shared_ptr<Ticket> ticket;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pending_.find(id);
      ticket = std::move(it->second);
      pending_.erase(it);
    }
    ticket->done_.store(true, std::memory_order_release);
    ++loads_done_;
    if (on_done_) on_done_();
  }
}

}  // namespace lorahub::serving
