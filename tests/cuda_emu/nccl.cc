// NCCL on the CUDA emulator: the NCCL entry points parallel/nccl_communicator.cc calls, served over
// MPI, so that the NCCL communicator (and a model whose device collectives go through it) runs in
// every build. Each emulated rank has a device of its own (SY_CUDA_EMU_DEVICES, runtime.cc).
//
// A collective is host work enqueued on its stream (emu::submit_host): it runs at once, or is
// recorded when the stream is captured and runs at each launch of the graph, as NCCL's kernels
// do. Between ncclGroupStart and ncclGroupEnd the calls are collected and run as one piece of work
// at ncclGroupEnd: non-blocking MPI operations for all of them, then one wait, so that grouped
// sends and receives, and one reduce or broadcast per root, cannot deadlock.
//
// What it holds the caller to, as NCCL does: communicators span the whole MPI world when made
// from a unique id (ncclCommSplit makes smaller ones), buffers are device memory, and calls on an
// aborted communicator fail. Reductions cover the 8-, 32- and 64-bit types (no 16-bit floats).
// SY_CUDA_EMU_NCCL_REFUSE_IN_GROUP (while set) refuses every call of a group after its first.
// SY_CUDA_EMU_NCCL_FAIL_AFTER=N makes every communicator report an asynchronous remote error
// (ncclCommGetAsyncError) once N collectives have run in this process: a peer that failed.
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tests/cuda_emu/emu.h"

struct ncclComm {
  MPI_Comm mpi = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
  int device = 0;
  bool aborted = false;
};

namespace {

enum class Kind { kAllReduce, kReduce, kBroadcast, kAllGather, kReduceScatter, kSend, kRecv };

// One collective or point-to-point call, as NCCL was given it.
struct Call {
  Kind kind;
  const void* send = nullptr;
  void* recv = nullptr;
  size_t count = 0;
  ncclDataType_t type = ncclInt8;
  ncclRedOp_t op = ncclSum;
  int root = 0;  // root of reduce / broadcast, peer of send / recv
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
};

thread_local int t_group_depth = 0;
thread_local std::vector<Call> t_group;
thread_local std::string t_last_error;
long g_collectives_run = 0;

ncclResult_t error(ncclResult_t rc, const std::string& why) {
  t_last_error = "emulated NCCL: " + why;
  return rc;
}

long fail_after() {
  static const long n = [] {
    const char* v = std::getenv("SY_CUDA_EMU_NCCL_FAIL_AFTER");
    return v != nullptr ? std::atol(v) : -1L;
  }();
  return n;
}

size_t type_size(ncclDataType_t t) {
  switch (t) {
    case ncclInt8:
    case ncclUint8:
    case ncclFloat8e4m3:
    case ncclFloat8e5m2:
      return 1;
    case ncclFloat16:
    case ncclBfloat16:
      return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32:
      return 4;
    default:
      return 8;
  }
}

// The MPI type that reduces like `t`; MPI_DATATYPE_NULL for the types MPI cannot reduce.
MPI_Datatype reducible(ncclDataType_t t) {
  switch (t) {
    case ncclInt8:
      return MPI_INT8_T;
    case ncclUint8:
      return MPI_UINT8_T;
    case ncclInt32:
      return MPI_INT32_T;
    case ncclUint32:
      return MPI_UINT32_T;
    case ncclInt64:
      return MPI_INT64_T;
    case ncclUint64:
      return MPI_UINT64_T;
    case ncclFloat32:
      return MPI_FLOAT;
    case ncclFloat64:
      return MPI_DOUBLE;
    default:
      return MPI_DATATYPE_NULL;
  }
}

MPI_Op mpi_op(ncclRedOp_t op) {
  switch (op) {
    case ncclSum:
      return MPI_SUM;
    case ncclProd:
      return MPI_PROD;
    case ncclMax:
      return MPI_MAX;
    case ncclMin:
      return MPI_MIN;
    default:
      return MPI_OP_NULL;
  }
}

bool is_device(const void* p) {
  cudaPointerAttributes attr{};
  return cudaPointerGetAttributes(&attr, p) == cudaSuccess && attr.type == cudaMemoryTypeDevice;
}

// Starts the MPI operations of `c`; buffers that alias in ways MPI forbids go through `tmp`,
// copied to their destination by finish().
void start(const Call& c, std::vector<MPI_Request>& reqs, std::vector<std::vector<char>>& tmp) {
  const ncclComm& comm = *c.comm;
  const size_t bytes = c.count * type_size(c.type);
  MPI_Request r = MPI_REQUEST_NULL;
  const MPI_Datatype red = reducible(c.type);
  const int n = static_cast<int>(c.count);
  switch (c.kind) {
    case Kind::kAllReduce:
      MPI_Iallreduce(c.send == c.recv ? MPI_IN_PLACE : c.send, c.recv, n, red, mpi_op(c.op),
                     comm.mpi, &r);
      break;
    case Kind::kReduce:
      MPI_Ireduce(comm.rank == c.root && c.send == c.recv ? MPI_IN_PLACE : c.send, c.recv, n, red,
                  mpi_op(c.op), c.root, comm.mpi, &r);
      break;
    case Kind::kBroadcast:
      if (comm.rank == c.root && c.send != c.recv) std::memmove(c.recv, c.send, bytes);
      MPI_Ibcast(c.recv, static_cast<int>(bytes), MPI_BYTE, c.root, comm.mpi, &r);
      break;
    case Kind::kAllGather: {
      const bool in_place = c.send == static_cast<char*>(c.recv) + comm.rank * bytes;
      MPI_Iallgather(in_place ? MPI_IN_PLACE : c.send, static_cast<int>(bytes), MPI_BYTE, c.recv,
                     static_cast<int>(bytes), MPI_BYTE, comm.mpi, &r);
      break;
    }
    case Kind::kReduceScatter: {
      tmp.emplace_back(bytes);
      MPI_Ireduce_scatter_block(c.send, tmp.back().data(), n, red, mpi_op(c.op), comm.mpi, &r);
      break;
    }
    case Kind::kSend:
      MPI_Isend(c.send, static_cast<int>(bytes), MPI_BYTE, c.root, 0, comm.mpi, &r);
      break;
    case Kind::kRecv:
      MPI_Irecv(c.recv, static_cast<int>(bytes), MPI_BYTE, c.root, 0, comm.mpi, &r);
      break;
  }
  reqs.push_back(r);
}

// Runs `calls` together (one group) and waits for all of them.
cudaError_t run(const std::vector<Call>& calls) {
  std::vector<MPI_Request> reqs;
  std::vector<std::vector<char>> tmp;
  tmp.reserve(calls.size());
  for (const Call& c : calls) start(c, reqs, tmp);
  MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE);
  size_t next = 0;
  for (const Call& c : calls)
    if (c.kind == Kind::kReduceScatter) {
      std::memcpy(c.recv, tmp[next].data(), tmp[next].size());
      ++next;
    }
  g_collectives_run += static_cast<long>(calls.size());
  return cudaSuccess;
}

ncclResult_t enqueue(std::vector<Call> calls) {
  if (calls.empty()) return ncclSuccess;
  const cudaStream_t stream = calls.front().stream;
  for (const Call& c : calls)
    if (c.stream != stream)
      return error(ncclInvalidUsage, "a group on several streams is not emulated");
  const cudaError_t e =
      sy::emu::submit_host("NCCL collective", stream, [calls] { return run(calls); });
  if (e != cudaSuccess) return error(ncclUnhandledCudaError, cudaGetErrorString(e));
  return ncclSuccess;
}

ncclResult_t add(Call c) {
  if (c.comm == nullptr) return error(ncclInvalidArgument, "null communicator");
  if (c.comm->aborted) return error(ncclInvalidUsage, "the communicator was aborted");
  if (c.count > static_cast<size_t>(INT32_MAX) / 8)
    return error(ncclInvalidArgument, "count " + std::to_string(c.count) + " too large");
  const bool reduces =
      c.kind == Kind::kAllReduce || c.kind == Kind::kReduce || c.kind == Kind::kReduceScatter;
  if (reduces && (reducible(c.type) == MPI_DATATYPE_NULL || mpi_op(c.op) == MPI_OP_NULL))
    return error(ncclInvalidArgument, "reduction of this type or op is not emulated");
  const bool has_root = c.kind == Kind::kReduce || c.kind == Kind::kBroadcast ||
                        c.kind == Kind::kSend || c.kind == Kind::kRecv;
  if (has_root && (c.root < 0 || c.root >= c.comm->size))
    return error(ncclInvalidArgument, "root or peer " + std::to_string(c.root) + " outside " +
                                          std::to_string(c.comm->size) + " ranks");
  if (c.count > 0) {
    const bool needs_recv =
        c.kind != Kind::kSend && !(c.kind == Kind::kReduce && c.comm->rank != c.root);
    if ((c.kind != Kind::kRecv && !is_device(c.send)) || (needs_recv && !is_device(c.recv)))
      return error(ncclInvalidArgument, "a buffer is not device memory");
  }
  if (t_group_depth > 0) {
    if (!t_group.empty() && std::getenv("SY_CUDA_EMU_NCCL_REFUSE_IN_GROUP") != nullptr)
      return error(ncclInternalError, "a call refused (SY_CUDA_EMU_NCCL_REFUSE_IN_GROUP)");
    t_group.push_back(c);
    return ncclSuccess;
  }
  return enqueue({c});
}

}  // namespace

extern "C" {

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "no error";
    case ncclUnhandledCudaError:
      return "unhandled cuda error";
    case ncclSystemError:
      return "unhandled system error";
    case ncclInternalError:
      return "internal error";
    case ncclInvalidArgument:
      return "invalid argument";
    case ncclInvalidUsage:
      return "invalid usage";
    case ncclRemoteError:
      return "remote process exited or there was a network error";
    case ncclInProgress:
      return "NCCL operation in progress";
    default:
      return "unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t) {
  return t_last_error.c_str();
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  std::memset(id, 0, sizeof(*id));
  std::strncpy(id->internal, "sy-cuda-emu-nccl", sizeof(id->internal) - 1);
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  int world = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  if (std::strncmp(id.internal, "sy-cuda-emu-nccl", sizeof(id.internal)) != 0)
    return error(ncclInvalidArgument, "a unique id ncclGetUniqueId did not make");
  if (nranks != world)
    return error(ncclInvalidUsage, "a communicator of " + std::to_string(nranks) +
                                       " ranks from a unique id; only the whole MPI world of " +
                                       std::to_string(world) + " is emulated");
  if (rank < 0 || rank >= nranks) return error(ncclInvalidArgument, "rank outside the world");
  auto* c = new ncclComm;
  MPI_Comm_split(MPI_COMM_WORLD, 0, rank, &c->mpi);
  c->rank = rank;
  c->size = nranks;
  cudaGetDevice(&c->device);
  *comm = c;
  return ncclSuccess;
}

ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t* newcomm,
                           ncclConfig_t*) {
  if (comm == nullptr || comm->aborted) return error(ncclInvalidUsage, "split of no communicator");
  MPI_Comm sub = MPI_COMM_NULL;
  MPI_Comm_split(comm->mpi, color == NCCL_SPLIT_NOCOLOR ? MPI_UNDEFINED : color, key, &sub);
  if (sub == MPI_COMM_NULL) {
    *newcomm = nullptr;
    return ncclSuccess;
  }
  auto* c = new ncclComm;
  c->mpi = sub;
  MPI_Comm_rank(sub, &c->rank);
  MPI_Comm_size(sub, &c->size);
  c->device = comm->device;
  *newcomm = c;
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (comm == nullptr) return ncclSuccess;
  if (comm->mpi != MPI_COMM_NULL) MPI_Comm_free(&comm->mpi);
  delete comm;
  return ncclSuccess;
}

// An aborted communicator is freed without the collective MPI_Comm_free: its peers may be gone.
ncclResult_t ncclCommAbort(ncclComm_t comm) {
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async_error) {
  if (comm == nullptr) return error(ncclInvalidArgument, "null communicator");
  const bool failed = fail_after() >= 0 && g_collectives_run >= fail_after();
  *async_error = failed ? ncclRemoteError : ncclSuccess;
  if (failed) t_last_error = "emulated NCCL: a peer failed (SY_CUDA_EMU_NCCL_FAIL_AFTER)";
  return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  if (comm == nullptr) return error(ncclInvalidArgument, "null communicator");
  *count = comm->size;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  if (comm == nullptr) return error(ncclInvalidArgument, "null communicator");
  *rank = comm->rank;
  return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
  ++t_group_depth;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  if (t_group_depth == 0) return error(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
  if (--t_group_depth > 0) return ncclSuccess;
  std::vector<Call> calls;
  calls.swap(t_group);
  return enqueue(std::move(calls));
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  return add({Kind::kAllReduce, send, recv, count, type, op, 0, comm, stream});
}

ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type,
                        ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream) {
  return add({Kind::kReduce, send, recv, count, type, op, root, comm, stream});
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type,
                           int root, ncclComm_t comm, cudaStream_t stream) {
  return add({Kind::kBroadcast, send, recv, count, type, ncclSum, root, comm, stream});
}

ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclComm_t comm, cudaStream_t stream) {
  return add({Kind::kAllGather, send, recv, count, type, ncclSum, 0, comm, stream});
}

ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t count, ncclDataType_t type,
                               ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  return add({Kind::kReduceScatter, send, recv, count, type, op, 0, comm, stream});
}

ncclResult_t ncclSend(const void* send, size_t count, ncclDataType_t type, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  return add({Kind::kSend, send, nullptr, count, type, ncclSum, peer, comm, stream});
}

ncclResult_t ncclRecv(void* recv, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  return add({Kind::kRecv, nullptr, recv, count, type, ncclSum, peer, comm, stream});
}

}  // extern "C"
