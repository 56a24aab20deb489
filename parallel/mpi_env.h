// The MPI environment of a switchyard process: initialisation, ranks, and ending the whole job
// when one rank fails, so that no peer waits forever in a collective.
#pragma once

#include <string>

namespace sy {

class MpiEnv {
 public:
  // Initialises MPI (once per process) and sets the rank printed in error messages.
  MpiEnv(int* argc, char*** argv);
  ~MpiEnv();  // MPI_Finalize
  MpiEnv(const MpiEnv&) = delete;
  MpiEnv& operator=(const MpiEnv&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }  // rank among the processes of this node
  int local_size() const { return local_size_; }  // processes of this job on this node
  bool is_root() const { return rank_ == 0; }

  // Prints "switchyard: rank R failed: <message>" and aborts every rank of the job.
  [[noreturn]] static void abort_job(const std::string& message, int code = 1);
  // The top level's error path: in a job of several ranks, abort_job; otherwise print
  // "switchyard: error: <message>" and return the exit code 1.
  static int fail(const std::string& message);

 private:
  int rank_ = 0;
  int size_ = 1;
  int local_rank_ = 0;
  int local_size_ = 1;
};

}  // namespace sy
