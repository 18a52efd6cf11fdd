// Communicator over NCCL for device buffers: the same interface as
// MpiCommunicator, for GPUs. Built only with the CUDA backend and NCCL
// (XQ_HAVE_NCCL).
//
// Every pointer passed in is device memory on this rank's device. Each call
// first orders itself after the work that produced its buffers (an event on
// the work stream, set_work_stream; without one, the whole device is
// synchronized), enqueues on stream() and returns once that stream has
// finished it, like the MPI implementation, so results are ready when it
// returns. Waits poll the stream and NCCL's asynchronous error against the
// group's timeout (MpiCommunicator::timeout, XQ_COMM_TIMEOUT_SECONDS).
//
// On timeout or an NCCL error the NCCL communicator is aborted (which
// unblocks its kernels). NCCL does not say which peer failed to arrive, so
// the rank then asks the group's MPI communicator, whose barrier has a
// deadline and follows the chain of waits across the grid's fault channel
// (see MpiCommunicator) to the rank that really died; LostRank is thrown with
// the MPI communicator's wording (parallel/fault_text.h): "...; lost rank R
// (world rank W)". A survivor thus takes two timeouts to give up (one more
// for each group the chain of waits crosses).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <string>

#include "parallel/mpi_communicator.h"

namespace xq::parallel {

// Turns a failed NCCL / CUDA call into xq::Error naming the call and the reason.
void check_nccl(ncclResult_t status, const std::string& operation);
void check_cuda(cudaError_t status, const std::string& operation);

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `group`'s ranks: its rank 0 creates the NCCL unique id and
  // broadcasts it over `group` (MPI, with its timeout); then every rank joins
  // on CUDA device `device`. `group` must outlive this communicator (names,
  // world ranks and the timeout come from it).
  NcclCommunicator(MpiCommunicator& group, int device);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return group_.rank(); }
  int size() const override { return group_.size(); }
  int world_rank(int member) const override { return group_.world_rank(member); }
  const std::string& name() const override { return group_.name(); }

  void all_reduce_sum(float* data, size_t count) override;
  void all_gather(const float* in, size_t count, float* out) override;
  void reduce_scatter_sum(const float* in, size_t count_per_rank, float* out) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void send(const void* data, size_t bytes, int peer) override;
  void recv(void* data, size_t bytes, int peer) override;
  void barrier() override;
  // NCCL does not report its traffic; this counts what its ring algorithms
  // send per rank (all_reduce 2 (p-1)/p of the data, all_gather and
  // reduce_scatter (p-1) blocks, broadcast one copy on all but one rank).
  uint64_t bytes_sent() const override { return bytes_sent_; }

  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
  // The stream (a cudaStream_t; null: none) whose work writes and reads the
  // buffers given to this communicator: each call waits on the device for
  // what was enqueued there before it, instead of synchronizing the device.
  void set_work_stream(void* stream) { work_stream_ = static_cast<cudaStream_t>(stream); }

 private:
  void check_usable(const char* op) const;
  // Makes stream() wait for the work the buffers come from (see above).
  void order_after_work(const char* op);
  // Finishes an NCCL call made on a non-blocking communicator (ncclInProgress)
  // and then waits for the stream, both against the group's timeout.
  void complete(ncclResult_t status, const char* op);
  // Marks the group broken, aborts NCCL, finds the lost rank over MPI and
  // throws LostRank; `event` is what happened here (fault_text wording).
  [[noreturn]] void fail(const char* op, const std::string& event);
  std::string prefix(const char* op) const;

  MpiCommunicator& group_;
  int device_ = 0;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaStream_t work_stream_ = nullptr;
  cudaEvent_t work_done_ = nullptr;
  float* barrier_word_ = nullptr;
  uint64_t bytes_sent_ = 0;
  bool broken_ = false;
};

}  // namespace xq::parallel
