// One group of ranks that exchange tensors: a tensor-parallel group, a pipeline
// column, or the whole world. The sharded forward pass talks to this interface
// only, so the same code runs over MPI with host buffers (MpiCommunicator, what
// every test runs) and over NCCL with device buffers (NcclCommunicator).
//
// Every member must call the collectives in the same order with the same
// counts; a member that does not (dead, stalled, or on a different call) makes
// the others fail with LostRank within the communicator's timeout instead of
// hanging. A communicator that has thrown is broken: every later call throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "kernels/error.h"

namespace xq {

// A peer did not deliver in time (or MPI reported it failed). The message names
// the group, the operation, this rank and the lost rank, with world ranks, so
// it can be printed as is; the caller is expected to end the job (abort_job).
class LostRank : public xq::Error {
 public:
  LostRank(const std::string& message, int lost_rank, std::string operation,
           int lost_world_rank = -1)
      : xq::Error(message),
        lost_rank_(lost_rank),
        lost_world_rank_(lost_world_rank),
        operation_(std::move(operation)) {}
  // Group rank of the member that did not respond; -1 when every member that
  // was waited on answered (ranks waiting on each other: mismatched calls) or
  // when the lost rank is outside this group (found through a shared fault
  // channel, see MpiCommunicator).
  int lost_rank() const { return lost_rank_; }
  // World rank of the lost rank; -1 when none is lost.
  int lost_world_rank() const { return lost_world_rank_; }
  const std::string& operation() const { return operation_; }

 private:
  int lost_rank_;
  int lost_world_rank_;
  std::string operation_;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // World rank of group member `member`: errors name both, because a group
  // rank alone does not say which process (or GPU) to look at.
  virtual int world_rank(int member) const = 0;
  virtual const std::string& name() const = 0;

  // data[i] = Σ over members of data[i]; every member ends with identical bits
  // (each element is summed once, in one order, then copied), so replicated
  // activations stay replicated.
  virtual void all_reduce_sum(float* data, size_t count) = 0;
  // out[r * count + i] = member r's in[i]. `in` may be out + rank() * count.
  virtual void all_gather(const float* in, size_t count, float* out) = 0;
  // out[i] = Σ over members of in[rank() * count_per_rank + i]; `in` holds
  // size() * count_per_rank values. in and out must not overlap.
  virtual void reduce_scatter_sum(const float* in, size_t count_per_rank, float* out) = 0;
  // Root's `bytes` bytes at `data` end up at `data` on every member.
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  // Point-to-point, for pipeline stages. send returns when `data` may be
  // reused; like MPI_Send it may wait for the matching recv, so two members
  // that both send to each other first can time out on large messages.
  // recv needs exactly `bytes` bytes from `peer`.
  virtual void send(const void* data, size_t bytes, int peer) = 0;
  virtual void recv(void* data, size_t bytes, int peer) = 0;
  virtual void barrier() = 0;

  // Payload bytes this member has put on the wire through this communicator
  // since it was created (its own sends only; zero-byte synchronization
  // messages count 0). Lets a benchmark check traffic against a formula.
  virtual uint64_t bytes_sent() const = 0;
};

// The group of one: what a single process's engine runs over. Collectives are
// the identity (all_reduce_sum leaves data as it is, all_gather copies), so
// the one forward pass needs no special case for "not parallel"; there is no
// peer to send to or receive from, and asking for one throws xq::Error.
class SingleProcessCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int world_rank(int) const override { return 0; }
  const std::string& name() const override { return name_; }
  void all_reduce_sum(float*, size_t) override {}
  void all_gather(const float* in, size_t count, float* out) override;
  void reduce_scatter_sum(const float* in, size_t count_per_rank, float* out) override;
  void broadcast(void*, size_t, int) override {}
  void send(const void*, size_t, int peer) override;
  void recv(void*, size_t, int peer) override;
  void barrier() override {}
  uint64_t bytes_sent() const override { return 0; }

 private:
  std::string name_ = "single process";
};

// Payload bytes `rank` sends in a ring all-reduce of `count` floats over `size`
// ranks (reduce-scatter then all-gather over chunks split as evenly as
// possible): every chunk but two, 2 (size - 1) / size of the data on average.
// What both implementations count, and what a benchmark can predict.
inline uint64_t ring_all_reduce_bytes_sent(size_t count, int size, int rank) {
  if (size <= 1 || count == 0) return 0;
  const size_t p = static_cast<size_t>(size);
  auto chunk = [&](size_t c) { return count / p + (c < count % p ? 1 : 0); };
  const size_t r = static_cast<size_t>(rank);
  return (2 * count - chunk((r + 1) % p) - chunk((r + 2) % p)) * sizeof(float);
}

}  // namespace xq
