// The MPI environment (see mpi_env.h).
#include "parallel/mpi_env.h"

#include <mpi.h>

#include <cstdio>
#include <exception>

#include "kernels/error.h"

namespace sy {

MpiEnv::MpiEnv(int* argc, char*** argv) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) {
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
  }
  // Errors come back as codes; SY_MPI_CHECK turns them into sy::Error.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  MPI_Comm node;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &local_rank_);
  MPI_Comm_size(node, &local_size_);
  MPI_Comm_free(&node);
  set_error_rank(size_ > 1 ? rank_ : -1);
}

MpiEnv::~MpiEnv() {
  // While an exception unwinds, a peer may be waiting in a collective: MPI_Finalize could then
  // block forever. Leave MPI up so the top level can abort the whole job (MpiEnv::fail).
  if (std::uncaught_exceptions() > 0) return;
  int finalised = 0;
  MPI_Finalized(&finalised);
  if (!finalised) MPI_Finalize();
}

void MpiEnv::abort_job(const std::string& message, int code) {
  int rank = 0;
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (initialised) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fflush(stdout);
  std::fprintf(stderr, "switchyard: rank %d failed: %s\n", rank, message.c_str());
  std::fflush(stderr);
  if (initialised) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

int MpiEnv::fail(const std::string& message) {
  int initialised = 0, finalised = 0, size = 1;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  if (initialised && !finalised) MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size > 1) abort_job(message);
  std::fflush(stdout);
  std::fprintf(stderr, "switchyard: error: %s\n", message.c_str());
  return 1;
}

}  // namespace sy
