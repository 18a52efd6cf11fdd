// Communicator over MPI for host buffers.
//
// The collectives are built from non-blocking point-to-point messages (rings, a
// binomial tree, a dissemination barrier) rather than MPI's own collectives,
// because a blocking MPI call cannot be interrupted: with one dead or stalled
// rank, MPI_Allreduce waits forever (Open MPI's shared-memory transport never
// notices a dead peer). Here every rank waits on named peers with a deadline,
// so on timeout it knows whom it was waiting for.
//
// On timeout (or an MPI error on a request) the rank tells every member which
// peer it was waiting for (a small notice on a reserved tag), listens briefly
// for the others' notices, and follows the chain "A waits for B, B waits for
// C" to the member that did not report: the lost rank. Ranks still waiting in
// this communicator see the first notice and join at once, so all of them name
// the same lost rank, not just their ring neighbour. Then LostRank is thrown;
// the caller ends the job with abort_job.
// Communicators of one Grid share a fault channel (a duplicate of the grid's
// world): notices go to every rank of the grid, so a rank stuck in its TP group
// behind a member that is itself stuck in a pipeline column follows the chain
// across groups to the rank that really died, instead of blaming the living
// member it waits for.
//
// One thread per communicator: MPI is initialized without thread support.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/communicator.h"

namespace xq::parallel {

// Turns a failed MPI call into xq::Error naming the call and MPI's reason.
void check_mpi(int status, const std::string& operation);

// XQ_COMM_TIMEOUT_SECONDS when set (a positive number), else 10 s. Throws
// xq::Error on a malformed value rather than silently using the default.
std::chrono::milliseconds default_comm_timeout();

// Prints "[world rank R] error: <message>" to stderr and calls MPI_Abort on
// MPI_COMM_WORLD, which makes mpirun end every rank. For errors no rank can
// recover from, LostRank above all.
[[noreturn]] void abort_job(const std::string& message);

class MpiCommunicator final : public Communicator {
 public:
  // Collective over `comm`: duplicates it, so these messages never match
  // anyone else's, and sets MPI_ERRORS_RETURN on the duplicate so a failing
  // peer gives an error code instead of aborting wherever MPI can tell.
  // `comm` stays the caller's. `name` (e.g. "tp0") appears in every error.
  // Fault notices travel on `fault_channel` when given (a communicator that
  // contains every member, shared with other communicators and outliving this
  // one), else on this communicator's own duplicate.
  MpiCommunicator(MPI_Comm comm, std::string name, MPI_Comm fault_channel = MPI_COMM_NULL);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int world_rank(int member) const override;
  const std::string& name() const override { return name_; }

  void all_reduce_sum(float* data, size_t count) override;
  void all_gather(const float* in, size_t count, float* out) override;
  void reduce_scatter_sum(const float* in, size_t count_per_rank, float* out) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void send(const void* data, size_t bytes, int peer) override;
  void recv(void* data, size_t bytes, int peer) override;
  void barrier() override;
  uint64_t bytes_sent() const override { return bytes_sent_; }

  // How long one wait on peers may last before the peer is declared lost.
  void set_timeout(std::chrono::milliseconds timeout);
  std::chrono::milliseconds timeout() const { return timeout_; }
  // True once a call has failed (LostRank, mismatched counts): every later
  // call throws.
  bool failed() const { return broken_; }
  // The duplicated communicator, e.g. to bootstrap NCCL over the same ranks.
  MPI_Comm comm() const { return comm_; }

  enum class Op : int { AllReduceSum, AllGather, ReduceScatterSum, Broadcast, Send, Recv, Barrier };

 private:
  struct Pending {
    MPI_Request request;
    int peer;
    bool is_recv;
    size_t bytes;  // expected, for receives
    bool done;
  };

  void check_usable(Op op) const;
  void post_send(Op op, const void* data, size_t bytes, int peer);
  void post_recv(Op op, void* data, size_t bytes, int peer);
  // Waits for every posted request with the deadline; throws LostRank.
  void wait_all(Op op);
  // Marks the group broken, agrees with the other members on the lost rank
  // (see above) and throws LostRank; `event` says what happened here, `note`
  // ends the message.
  [[noreturn]] void fail(Op op, int waiting_for, const std::string& event,
                         const std::string& note = "");
  void cancel_pending();
  std::string who(int member) const;
  // A rank of the fault channel: who(member) for members, else its world rank.
  std::string who_on_channel(int channel_rank) const;
  int member_of_channel_rank(int channel_rank) const;  // -1: not a member

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string name_;
  int rank_ = 0, size_ = 1;
  std::vector<int> world_ranks_;
  // Where fault notices travel: comm_, or a channel shared by a grid.
  MPI_Comm notices_ = MPI_COMM_NULL;
  int channel_rank_ = 0, channel_size_ = 1;
  std::vector<int> member_channel_ranks_;  // per member
  std::vector<int> channel_world_ranks_;   // per channel rank
  std::chrono::milliseconds timeout_;
  uint64_t bytes_sent_ = 0;
  bool broken_ = false;
  std::vector<Pending> pending_;
  std::vector<float> scratch_, scratch2_;
  // Fault notices sent to the other members; kept alive until destruction
  // because a lost peer may never receive them.
  std::unique_ptr<int[]> notice_;
  std::vector<MPI_Request> notice_requests_;
};

const char* op_name(MpiCommunicator::Op op);

}  // namespace xq::parallel
