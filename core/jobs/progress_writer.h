// ProgressWriter: a running compose job's progress, written to the store one
// objective call at a time.
//
// Why: a progress write is a store transaction (about 0.8 ms on a 2-core
// host), and the compose worker wrote one per evaluation: a CMA-ES
// generation of 64 candidates, one scoring pass on a GPU (about 50 ms), was
// followed by 64 transactions. Here the evaluations of one objective call
// are buffered (Add) and written together, one transaction, in the next
// call or when the search ends (Flush); then the store is asked whether the
// job's cancel was requested. A sequential optimizer (COBYLA) still writes
// once per evaluation. On a device the compose worker's thread writes while
// the engine thread runs the next evaluation (compose_worker.h); a separate
// writer thread had measured slower on the 2-core host (5.2-6.7 against
// 4.2-4.4 ms an evaluation of the tiny fixture, the write competing with the
// CPU scoring for the cores).
//
// Ownership: the store is borrowed and must outlive the writer. Not
// thread-safe: one thread (the compose worker's) per writer.
#ifndef LORAHUB_CORE_JOBS_PROGRESS_WRITER_H_
#define LORAHUB_CORE_JOBS_PROGRESS_WRITER_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/store/store.h"

namespace lorahub::jobs {

class ProgressWriter {
 public:
  ProgressWriter(store::Store* store, std::string job_id)
      : store_(store), job_id_(std::move(job_id)) {}

  // Buffers one evaluation: the job's progress after it and its "progress"
  // event payload (JSON).
  void Add(const store::JobProgress& progress, std::string event_payload_json);
  // Writes what Add buffered (nothing to write: OK at once), in one
  // transaction, then polls the job's cancel request. The store's error
  // otherwise; the buffer is emptied either way.
  absl::Status Flush();
  // True once a Flush found a cancel request in the store.
  bool cancel_requested() const { return cancel_; }

 private:
  store::Store* const store_;
  const std::string job_id_;
  std::vector<std::string> payloads_;  // buffered, oldest first
  store::JobProgress latest_;          // the progress after the last one
  bool cancel_ = false;
};

}  // namespace lorahub::jobs

#endif  // LORAHUB_CORE_JOBS_PROGRESS_WRITER_H_
