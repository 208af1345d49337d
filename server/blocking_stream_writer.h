// BlockingStreamWriter: a server-streaming callback reactor whose messages
// are produced on a worker thread of the subclass (the engine, the store or
// the hub is never waited on in a gRPC callback).
//
// Write() starts one write and blocks the worker until gRPC reports it done:
// at most one write is in flight, and Write() waits for the completion even
// after a cancel, so the worker may call Finish() as soon as Write() returns.
// It returns false once the stream broke (client cancel or failed write).
// Thread-safety: Write()/WaitFor() from one worker thread; the overrides run
// on gRPC's threads.
#ifndef LORAHUB_SERVER_BLOCKING_STREAM_WRITER_H_
#define LORAHUB_SERVER_BLOCKING_STREAM_WRITER_H_

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "grpcpp/grpcpp.h"

namespace lorahub::server {

template <typename Message>
class BlockingStreamWriter : public grpc::ServerWriteReactor<Message> {
 public:
  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok) broken_ = true;
    }
    cv_.notify_all();
  }
  void OnCancel() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      broken_ = true;
    }
    cv_.notify_all();
  }

 protected:
  // Writes `message` and waits for its completion; false if the stream broke.
  bool Write(const Message& message) {
    std::unique_lock<std::mutex> lock(mu_);
    if (broken_) return false;
    message_ = message;
    writing_ = true;
    lock.unlock();  // OnWriteDone may run before StartWrite returns
    this->StartWrite(&message_);
    lock.lock();
    cv_.wait(lock, [this] { return !writing_; });
    return !broken_;
  }

  // Sleeps for `period` or until the stream breaks; false if it broke.
  bool WaitFor(std::chrono::milliseconds period) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, period, [this] { return broken_; });
    return !broken_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool writing_ = false;
  bool broken_ = false;
  Message message_;
};

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_BLOCKING_STREAM_WRITER_H_
