// Counts the ATen operators of given names that the dispatcher runs while a
// counter is alive (e.g. aten::constant_pad_nd: MatmulFloat's padding of a
// GEMM's rows; aten::bmm: a fallback where a kernel should have run).
//
// Threading: Threads::kThis counts the constructing thread's operators only;
// Threads::kAll those of every thread (an engine's own thread). One counter
// may be alive at a time in a process (the callback's state is static).
#ifndef LORAHUB_TESTS_MODEL_OP_NAME_COUNTER_H_
#define LORAHUB_TESTS_MODEL_OP_NAME_COUNTER_H_

#include <ATen/record_function.h>

#include <cstdint>
#include <string>
#include <vector>

namespace lorahub::model::testing {

class OpNameCounter {
 public:
  enum class Threads { kThis, kAll };
  explicit OpNameCounter(std::vector<std::string> names,
                         Threads threads = Threads::kThis);
  ~OpNameCounter();
  OpNameCounter(const OpNameCounter&) = delete;
  OpNameCounter& operator=(const OpNameCounter&) = delete;
  // Operators of the names counted so far.
  int64_t count() const;

 private:
  at::CallbackHandle handle_;
};

}  // namespace lorahub::model::testing

#endif  // LORAHUB_TESTS_MODEL_OP_NAME_COUNTER_H_
