#include "tests/model/op_name_counter.h"

#include <atomic>
#include <cstdlib>
#include <memory>
#include <utility>

namespace lorahub::model::testing {
namespace {

// The live counter's names (set before its callback is added, cleared after
// it is removed) and count.
std::vector<std::string>* names = nullptr;
std::atomic<int64_t> counted{0};

std::unique_ptr<at::ObserverContext> OnStart(const at::RecordFunction& fn) {
  for (const std::string& name : *names) {
    if (name == fn.name()) ++counted;
  }
  return nullptr;
}

}  // namespace

OpNameCounter::OpNameCounter(std::vector<std::string> op_names,
                             Threads threads) {
  if (names != nullptr) std::abort();  // one counter at a time
  names = new std::vector<std::string>(std::move(op_names));
  counted = 0;
  const auto callback = at::RecordFunctionCallback(&OnStart).scopes(
      {at::RecordScope::FUNCTION});
  handle_ = threads == Threads::kAll ? at::addGlobalCallback(callback)
                                     : at::addThreadLocalCallback(callback);
}

OpNameCounter::~OpNameCounter() {
  at::removeCallback(handle_);
  delete names;
  names = nullptr;
}

int64_t OpNameCounter::count() const { return counted.load(); }

}  // namespace lorahub::model::testing
