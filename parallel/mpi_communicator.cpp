#include "parallel/mpi_communicator.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "parallel/fault_text.h"

namespace xq::parallel {

namespace {

using Clock = std::chrono::steady_clock;

// Tags: one per operation, so members that called different operations time
// out (and say so) instead of exchanging the wrong data. The fault notice has
// its own tag, probed while waiting.
constexpr int kTagBase = 100;
constexpr int kFaultTag = 999;
constexpr int kNoticeInts = 3;  // reporter, member it waits for, its operation
constexpr int kNotReported = -2;

int tag_of(MpiCommunicator::Op op) {
  return kTagBase + static_cast<int>(op);
}

std::string mpi_error_string(int status) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(status, text, &length) != MPI_SUCCESS)
    return "MPI error " + std::to_string(status);
  return std::string(text, static_cast<size_t>(length));
}

// Part `index` of n items split over `parts`: the first n % parts parts get one
// more. Same rule as grid.h's even_split (kept local: the communicator does
// not depend on the grid).
size_t part_begin(size_t n, int parts, int index) {
  const size_t p = static_cast<size_t>(parts), i = static_cast<size_t>(index);
  return i * (n / p) + std::min(i, n % p);
}
size_t part_size(size_t n, int parts, int index) {
  return n / static_cast<size_t>(parts) + (static_cast<size_t>(index) < n % parts ? 1 : 0);
}

int wrap(int value, int size) {
  return ((value % size) + size) % size;
}

}  // namespace

const char* op_name(MpiCommunicator::Op op) {
  switch (op) {
    case MpiCommunicator::Op::AllReduceSum:
      return "all_reduce_sum";
    case MpiCommunicator::Op::AllGather:
      return "all_gather";
    case MpiCommunicator::Op::ReduceScatterSum:
      return "reduce_scatter_sum";
    case MpiCommunicator::Op::Broadcast:
      return "broadcast";
    case MpiCommunicator::Op::Send:
      return "send";
    case MpiCommunicator::Op::Recv:
      return "recv";
    case MpiCommunicator::Op::Barrier:
      return "barrier";
  }
  return "unknown operation";
}

void check_mpi(int status, const std::string& operation) {
  if (status != MPI_SUCCESS) throw xq::Error(operation + " failed: " + mpi_error_string(status));
}

std::chrono::milliseconds default_comm_timeout() {
  const char* text = std::getenv("XQ_COMM_TIMEOUT_SECONDS");
  if (text == nullptr || *text == '\0') return std::chrono::seconds(10);
  char* end = nullptr;
  errno = 0;
  const double seconds = std::strtod(text, &end);
  if (errno != 0 || end == text || *end != '\0' || !std::isfinite(seconds) || seconds <= 0 ||
      seconds > 1e6)
    throw xq::Error(
        std::string("XQ_COMM_TIMEOUT_SECONDS must be a positive number of seconds, not \"") + text +
        "\"");
  return std::chrono::milliseconds(std::max<int64_t>(1, std::llround(seconds * 1000)));
}

void abort_job(const std::string& message) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  int world_rank = -1;
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  std::fprintf(stderr, "[world rank %d] error: %s\n", world_rank, message.c_str());
  std::fflush(stderr);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, 1);
  std::_Exit(1);
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, MPI_Comm fault_channel)
    : name_(std::move(name)), timeout_(default_comm_timeout()) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw xq::Error("communicator \"" + name_ + "\": MPI is not initialized");
  const std::string context = " for group \"" + name_ + "\"";
  check_mpi(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup" + context);
  check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler" + context);
  check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank" + context);
  check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size" + context);

  MPI_Group group, world;
  check_mpi(MPI_Comm_group(comm_, &group), "MPI_Comm_group" + context);
  check_mpi(MPI_Comm_group(MPI_COMM_WORLD, &world), "MPI_Comm_group(MPI_COMM_WORLD)");
  std::vector<int> members(static_cast<size_t>(size_));
  for (int i = 0; i < size_; ++i) members[static_cast<size_t>(i)] = i;
  world_ranks_.resize(static_cast<size_t>(size_));
  check_mpi(MPI_Group_translate_ranks(group, size_, members.data(), world, world_ranks_.data()),
            "MPI_Group_translate_ranks" + context);

  notices_ = fault_channel != MPI_COMM_NULL ? fault_channel : comm_;
  check_mpi(MPI_Comm_rank(notices_, &channel_rank_), "MPI_Comm_rank (fault channel)" + context);
  check_mpi(MPI_Comm_size(notices_, &channel_size_), "MPI_Comm_size (fault channel)" + context);
  MPI_Group channel;
  check_mpi(MPI_Comm_group(notices_, &channel), "MPI_Comm_group (fault channel)" + context);
  member_channel_ranks_.resize(static_cast<size_t>(size_));
  check_mpi(MPI_Group_translate_ranks(group, size_, members.data(), channel,
                                      member_channel_ranks_.data()),
            "MPI_Group_translate_ranks (fault channel)" + context);
  for (int r : member_channel_ranks_)
    if (r == MPI_UNDEFINED)
      throw xq::Error("communicator \"" + name_ + "\": its fault channel lacks a member");
  std::vector<int> channel_members(static_cast<size_t>(channel_size_));
  for (int i = 0; i < channel_size_; ++i) channel_members[static_cast<size_t>(i)] = i;
  channel_world_ranks_.resize(static_cast<size_t>(channel_size_));
  check_mpi(MPI_Group_translate_ranks(channel, channel_size_, channel_members.data(), world,
                                      channel_world_ranks_.data()),
            "MPI_Group_translate_ranks (fault channel)" + context);
  MPI_Group_free(&channel);
  MPI_Group_free(&group);
  MPI_Group_free(&world);
}

int MpiCommunicator::member_of_channel_rank(int channel_rank) const {
  for (int m = 0; m < size_; ++m)
    if (member_channel_ranks_[static_cast<size_t>(m)] == channel_rank) return m;
  return -1;
}

std::string MpiCommunicator::who_on_channel(int channel_rank) const {
  const int member = member_of_channel_rank(channel_rank);
  if (member >= 0) return who(member);
  return fault_text::outside_member(channel_world_ranks_[static_cast<size_t>(channel_rank)]);
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized || comm_ == MPI_COMM_NULL) return;
  bool notices_in_flight = false;
  for (MPI_Request& request : notice_requests_) {
    int done = 0;
    if (MPI_Test(&request, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || !done) {
      notices_in_flight = true;
      MPI_Request_free(&request);
    }
  }
  // A notice to a dead peer may never leave; MPI may still read its buffer.
  if (notices_in_flight) static_cast<void>(notice_.release());  // deliberately kept
  cancel_pending();
  MPI_Comm_free(&comm_);
}

int MpiCommunicator::world_rank(int member) const {
  if (member < 0 || member >= size_)
    throw xq::Error("group \"" + name_ + "\" has no rank " + std::to_string(member));
  return world_ranks_[static_cast<size_t>(member)];
}

void MpiCommunicator::set_timeout(std::chrono::milliseconds timeout) {
  if (timeout.count() <= 0) throw xq::Error("communicator timeout must be positive");
  timeout_ = timeout;
}

std::string MpiCommunicator::who(int member) const {
  return fault_text::member(member, world_ranks_[static_cast<size_t>(member)]);
}

void MpiCommunicator::check_usable(Op op) const {
  if (broken_)
    throw xq::Error(who(rank_) + ": " + op_name(op) + " on group \"" + name_ +
                    "\": the group already failed (a rank was lost); end the job");
}

void MpiCommunicator::post_send(Op op, const void* data, size_t bytes, int peer) {
  if (bytes > static_cast<size_t>(INT_MAX))
    throw xq::Error(std::string(op_name(op)) + " on group \"" + name_ + "\": message of " +
                    std::to_string(bytes) + " bytes is larger than one MPI message (2 GiB)");
  Pending pending{MPI_REQUEST_NULL, peer, false, bytes, false};
  check_mpi(
      MPI_Isend(data, static_cast<int>(bytes), MPI_BYTE, peer, tag_of(op), comm_, &pending.request),
      std::string("MPI_Isend in ") + op_name(op) + " on group \"" + name_ + "\" to " + who(peer));
  pending_.push_back(pending);
  bytes_sent_ += bytes;
}

void MpiCommunicator::post_recv(Op op, void* data, size_t bytes, int peer) {
  if (bytes > static_cast<size_t>(INT_MAX))
    throw xq::Error(std::string(op_name(op)) + " on group \"" + name_ + "\": message of " +
                    std::to_string(bytes) + " bytes is larger than one MPI message (2 GiB)");
  Pending pending{MPI_REQUEST_NULL, peer, true, bytes, false};
  // A recv matches the peer's send, so both use the Send tag.
  const int tag = tag_of(op == Op::Recv ? Op::Send : op);
  check_mpi(
      MPI_Irecv(data, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm_, &pending.request),
      std::string("MPI_Irecv in ") + op_name(op) + " on group \"" + name_ + "\" from " + who(peer));
  pending_.push_back(pending);
}

void MpiCommunicator::cancel_pending() {
  for (Pending& pending : pending_) {
    if (pending.done || pending.request == MPI_REQUEST_NULL) continue;
    if (pending.is_recv) MPI_Cancel(&pending.request);
    MPI_Request_free(&pending.request);
  }
  pending_.clear();
}

void MpiCommunicator::wait_all(Op op) {
  const Clock::time_point started = Clock::now();
  const Clock::time_point deadline = started + timeout_;
  const std::string prefix = fault_text::operation(who(rank_), op_name(op), name_);
  // The member this rank is stuck on: a receive that has not arrived, else a
  // send that has not been taken.
  auto waiting_for = [&]() {
    for (const Pending& p : pending_)
      if (!p.done && p.is_recv) return p.peer;
    for (const Pending& p : pending_)
      if (!p.done) return p.peer;
    return -1;
  };
  auto elapsed = [&]() { return std::chrono::duration<double>(Clock::now() - started).count(); };

  auto nap = std::chrono::microseconds(20);
  for (;;) {
    bool all_done = true;
    for (Pending& p : pending_) {
      if (p.done) continue;
      int flag = 0;
      MPI_Status status;
      const int rc = MPI_Test(&p.request, &flag, &status);
      if (rc != MPI_SUCCESS) {
        int error_class = MPI_ERR_OTHER;
        MPI_Error_class(rc, &error_class);
        if (error_class == MPI_ERR_TRUNCATE) {
          broken_ = true;
          cancel_pending();
          throw xq::Error(prefix + ": " + who(p.peer) + " sent more than the " +
                          std::to_string(p.bytes) +
                          " bytes expected (members called different operations or counts)");
        }
        fail(op, p.peer,
             prefix + " failed " + (p.is_recv ? "receiving from " : "sending to ") + who(p.peer) +
                 ": " + mpi_error_string(rc));
      }
      if (!flag) {
        all_done = false;
        continue;
      }
      p.done = true;
      if (p.is_recv) {
        int received = 0;
        MPI_Get_count(&status, MPI_BYTE, &received);
        if (static_cast<size_t>(received) != p.bytes) {
          broken_ = true;
          cancel_pending();
          throw xq::Error(prefix + ": " + who(p.peer) + " sent " + std::to_string(received) +
                          " bytes where " + std::to_string(p.bytes) +
                          " were expected (members called different operations or counts)");
        }
      }
    }
    if (all_done) {
      pending_.clear();
      return;
    }

    int notice = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kFaultTag, notices_, &notice, &status) == MPI_SUCCESS &&
        notice) {
      const int peer = waiting_for();
      fail(op, peer,
           prefix + " stopped after " + fault_text::seconds(std::round(elapsed() * 10) / 10) +
               " waiting for " + who(peer),
           " (" + who_on_channel(status.MPI_SOURCE) + " gave up first)");
    }
    if (Clock::now() >= deadline) {
      const int peer = waiting_for();
      fail(op, peer,
           fault_text::timed_out(prefix, std::chrono::duration<double>(timeout_).count(),
                                 who(peer)));
    }
    // Spin for 100 us (a step between ranks of one node completes in a few
    // microseconds), then sleep in growing naps so that oversubscribed ranks
    // leave the cores to their peers. No sched_yield: next to busy processes
    // it can give away a whole time slice; on the loaded 2-core test machine
    // a 576-float all-reduce over 4 ranks took about twice as long with it.
    if (Clock::now() - started >= std::chrono::microseconds(100)) {
      std::this_thread::sleep_for(nap);
      nap = std::min(nap * 2, std::chrono::microseconds(500));
    }
  }
}

void MpiCommunicator::fail(Op op, int waiting_for, const std::string& event,
                           const std::string& note) {
  broken_ = true;
  cancel_pending();

  // Tell every other rank of the fault channel whom this rank waits for
  // (ranks of the channel from here on).
  const int awaited =
      waiting_for >= 0 ? member_channel_ranks_[static_cast<size_t>(waiting_for)] : waiting_for;
  notice_.reset(new int[kNoticeInts]{channel_rank_, awaited, static_cast<int>(op)});
  for (int rank = 0; rank < channel_size_; ++rank) {
    if (rank == channel_rank_) continue;
    MPI_Request request;
    if (MPI_Isend(notice_.get(), kNoticeInts, MPI_INT, rank, kFaultTag, notices_, &request) ==
        MPI_SUCCESS)
      notice_requests_.push_back(request);
  }

  // Collect the others' notices. Stop early once every rank that has not
  // reported is one that someone waits for (the lost ones), but listen at
  // least briefly so that ranks whose deadlines fall a moment later are heard.
  std::vector<int> waits_for(static_cast<size_t>(channel_size_), kNotReported);
  std::vector<int> their_op(static_cast<size_t>(channel_size_), -1);
  waits_for[static_cast<size_t>(channel_rank_)] = awaited;
  their_op[static_cast<size_t>(channel_rank_)] = static_cast<int>(op);
  const auto shortest = std::chrono::milliseconds(300);
  const auto longest = std::max<std::chrono::milliseconds>(
      shortest, std::min(timeout_ / 2, std::chrono::milliseconds(2000)));
  const Clock::time_point start = Clock::now();
  auto complete = [&]() {
    for (int m = 0; m < channel_size_; ++m) {
      if (waits_for[static_cast<size_t>(m)] != kNotReported) continue;
      bool is_awaited = false;
      for (int w : waits_for) is_awaited = is_awaited || w == m;
      if (!is_awaited) return false;
    }
    return true;
  };
  for (;;) {
    int flag = 0;
    MPI_Status status;
    while (MPI_Iprobe(MPI_ANY_SOURCE, kFaultTag, notices_, &flag, &status) == MPI_SUCCESS && flag) {
      int notice[kNoticeInts];
      if (MPI_Recv(notice, kNoticeInts, MPI_INT, status.MPI_SOURCE, kFaultTag, notices_,
                   MPI_STATUS_IGNORE) != MPI_SUCCESS)
        break;
      const int from = status.MPI_SOURCE;
      if (notice[1] >= -1 && notice[1] < channel_size_) {
        waits_for[static_cast<size_t>(from)] = notice[1];
        their_op[static_cast<size_t>(from)] = notice[2];
      }
    }
    const auto waited = Clock::now() - start;
    if (waited >= longest || (waited >= shortest && complete())) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }

  // Follow "waits for" from the rank this one waits for to one that did not
  // report.
  std::string message = event;
  std::vector<bool> seen(static_cast<size_t>(channel_size_), false);
  int rank = awaited;
  while (rank >= 0 && waits_for[static_cast<size_t>(rank)] != kNotReported &&
         !seen[static_cast<size_t>(rank)]) {
    seen[static_cast<size_t>(rank)] = true;
    const int next = waits_for[static_cast<size_t>(rank)];
    if (next < 0) break;
    message += ", which was waiting for " + who_on_channel(next) + " in " +
               op_name(static_cast<Op>(their_op[static_cast<size_t>(rank)]));
    rank = next;
  }
  if (rank >= 0 && waits_for[static_cast<size_t>(rank)] == kNotReported) {
    message += fault_text::lost(who_on_channel(rank));
    throw LostRank(message + note, member_of_channel_rank(rank), op_name(op),
                   channel_world_ranks_[static_cast<size_t>(rank)]);
  }
  message += fault_text::none_lost();
  throw LostRank(message + note, -1, op_name(op));
}

void MpiCommunicator::all_reduce_sum(float* data, size_t count) {
  check_usable(Op::AllReduceSum);
  const int p = size_, r = rank_;
  if (p == 1 || count == 0) return;
  // Ring: reduce-scatter then all-gather over p chunks. Chunk c is summed once,
  // along the ring, ending at rank c - 1; then copied to everyone.
  const int right = wrap(r + 1, p), left = wrap(r - 1, p);
  scratch_.resize(part_size(count, p, 0));
  for (int step = 0; step + 1 < p; ++step) {
    const int send_chunk = wrap(r - step, p), recv_chunk = wrap(r - step - 1, p);
    const size_t recv_count = part_size(count, p, recv_chunk);
    post_recv(Op::AllReduceSum, scratch_.data(), recv_count * sizeof(float), left);
    post_send(Op::AllReduceSum, data + part_begin(count, p, send_chunk),
              part_size(count, p, send_chunk) * sizeof(float), right);
    wait_all(Op::AllReduceSum);
    float* into = data + part_begin(count, p, recv_chunk);
    for (size_t i = 0; i < recv_count; ++i) into[i] += scratch_[i];
  }
  for (int step = 0; step + 1 < p; ++step) {
    const int send_chunk = wrap(r + 1 - step, p), recv_chunk = wrap(r - step, p);
    post_recv(Op::AllReduceSum, data + part_begin(count, p, recv_chunk),
              part_size(count, p, recv_chunk) * sizeof(float), left);
    post_send(Op::AllReduceSum, data + part_begin(count, p, send_chunk),
              part_size(count, p, send_chunk) * sizeof(float), right);
    wait_all(Op::AllReduceSum);
  }
}

void MpiCommunicator::all_gather(const float* in, size_t count, float* out) {
  check_usable(Op::AllGather);
  const int p = size_, r = rank_;
  float* mine = out + static_cast<size_t>(r) * count;
  if (count > 0 && in != mine) std::memmove(mine, in, count * sizeof(float));
  if (p == 1 || count == 0) return;
  // Ring: at step s pass on the block received at step s - 1 (own block first).
  const int right = wrap(r + 1, p), left = wrap(r - 1, p);
  for (int step = 0; step + 1 < p; ++step) {
    const size_t send_block = static_cast<size_t>(wrap(r - step, p));
    const size_t recv_block = static_cast<size_t>(wrap(r - step - 1, p));
    post_recv(Op::AllGather, out + recv_block * count, count * sizeof(float), left);
    post_send(Op::AllGather, out + send_block * count, count * sizeof(float), right);
    wait_all(Op::AllGather);
  }
}

void MpiCommunicator::reduce_scatter_sum(const float* in, size_t count_per_rank, float* out) {
  check_usable(Op::ReduceScatterSum);
  const int p = size_, r = rank_;
  const size_t n = count_per_rank;
  if (p == 1 || n == 0) {
    if (n > 0) std::memmove(out, in, n * sizeof(float));
    return;
  }
  // Ring: block b starts at rank b + 1 and travels right, each rank adding its
  // own in-block, so it arrives complete at rank b after p - 1 steps.
  const int right = wrap(r + 1, p), left = wrap(r - 1, p);
  scratch_.resize(n);   // partial sum being sent
  scratch2_.resize(n);  // partial sum arriving
  for (int step = 0; step + 1 < p; ++step) {
    const size_t send_block = static_cast<size_t>(wrap(r - step - 1, p));
    const size_t recv_block = static_cast<size_t>(wrap(r - step - 2, p));
    const float* outgoing = step == 0 ? in + send_block * n : scratch_.data();
    post_recv(Op::ReduceScatterSum, scratch2_.data(), n * sizeof(float), left);
    post_send(Op::ReduceScatterSum, outgoing, n * sizeof(float), right);
    wait_all(Op::ReduceScatterSum);
    const float* own = in + recv_block * n;
    for (size_t i = 0; i < n; ++i) scratch_[i] = scratch2_[i] + own[i];
  }
  std::memcpy(out, scratch_.data(), n * sizeof(float));
}

void MpiCommunicator::broadcast(void* data, size_t bytes, int root) {
  check_usable(Op::Broadcast);
  if (root < 0 || root >= size_)
    throw xq::Error("broadcast on group \"" + name_ + "\": no rank " + std::to_string(root));
  const int p = size_;
  if (p == 1 || bytes == 0) return;
  // Binomial tree over ranks relative to the root: receive from the member
  // that differs in the lowest set bit, then pass on to the lower bits.
  const int relative = wrap(rank_ - root, p);
  int mask = 1;
  while (mask < p) {
    if (relative & mask) {
      post_recv(Op::Broadcast, data, bytes, wrap(relative - mask + root, p));
      wait_all(Op::Broadcast);
      break;
    }
    mask <<= 1;
  }
  for (mask >>= 1; mask > 0; mask >>= 1)
    if (relative + mask < p) post_send(Op::Broadcast, data, bytes, wrap(relative + mask + root, p));
  wait_all(Op::Broadcast);
}

void MpiCommunicator::send(const void* data, size_t bytes, int peer) {
  check_usable(Op::Send);
  if (peer < 0 || peer >= size_ || peer == rank_)
    throw xq::Error("send on group \"" + name_ + "\": bad peer " + std::to_string(peer));
  post_send(Op::Send, data, bytes, peer);
  wait_all(Op::Send);
}

void MpiCommunicator::recv(void* data, size_t bytes, int peer) {
  check_usable(Op::Recv);
  if (peer < 0 || peer >= size_ || peer == rank_)
    throw xq::Error("recv on group \"" + name_ + "\": bad peer " + std::to_string(peer));
  post_recv(Op::Recv, data, bytes, peer);
  wait_all(Op::Recv);
}

void MpiCommunicator::barrier() {
  check_usable(Op::Barrier);
  // Dissemination: after round k every rank has heard, directly or not, from
  // the 2^(k+1) ranks before it.
  for (int distance = 1; distance < size_; distance <<= 1) {
    post_recv(Op::Barrier, nullptr, 0, wrap(rank_ - distance, size_));
    post_send(Op::Barrier, nullptr, 0, wrap(rank_ + distance, size_));
    wait_all(Op::Barrier);
  }
}

}  // namespace xq::parallel
