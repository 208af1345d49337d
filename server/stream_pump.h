// StreamPump: a few threads that start the gRPC writes of generate streams,
// so that the engine thread only queues a stream's next message.
//
// Why: a token's message was written (StartWrite, serialisation and the
// transport's work for it) on the engine thread, about 17 us per token on
// an H200 host: at 64 rows, a millisecond per decoding step in which the
// engine neither launched the next step nor admitted newcomers.
//
// Threading: Post() from any thread; tasks run on the pump's threads in no
// particular order across posts (callers order their own). The destructor
// runs every task posted before it, then joins.
#ifndef LORAHUB_SERVER_STREAM_PUMP_H_
#define LORAHUB_SERVER_STREAM_PUMP_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lorahub::server {

class StreamPump {
 public:
  // `threads` >= 1.
  explicit StreamPump(int threads);
  ~StreamPump();
  StreamPump(const StreamPump&) = delete;
  StreamPump& operator=(const StreamPump&) = delete;

  void Post(std::function<void()> task);

 private:
  void Run();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace lorahub::server

#endif  // LORAHUB_SERVER_STREAM_PUMP_H_
