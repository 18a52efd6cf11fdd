// An iteration-level batch scheduler (continuous batching): every step() plans
// one batch over all admitted requests -- one decode token for each running
// sequence, then chunks of the prompts being prefilled with what is left of
// the token budget -- runs it through a StepExecutor, samples each request
// with its own sampler and queues the events.
//
// How a server drives it, from one thread (the scheduler is not thread-safe;
// other threads hand their submissions and cancellations to that thread):
//
//   Scheduler scheduler(executor, options);
//   RequestId id = scheduler.submit(request);   // never throws for a bad request
//   while (!scheduler.idle()) {                  // or forever, submitting as requests come
//     scheduler.step();
//     for (RequestEvent& e : scheduler.take_events()) route(e);  // by e.id
//   }
//
// Events are a queue drained by take_events() (not callbacks), so the server
// decides when and where to deliver them and the scheduler never runs server
// code in the middle of a step. Every request gets token events, then exactly
// one finished event -- also a request that was invalid (failed at submit()),
// cancelled, or failed in the engine -- after which its id is unknown.
//
// Exactness. A request's tokens do not depend on what runs beside it: the
// engine computes every row independently of the batch, each request samples
// with its own seeded sampler, and prefill chunks end only at multiples of the
// pool's block_tokens (the quantization group) or at the prompt's end, so each
// query sees the cache as it does when the prompt runs alone in one forward.
// A preempted sequence is rebuilt from its tokens with chunks that reproduce
// what prefill and decode saw (chunk_end() in the .cpp), never re-sampled.
//
// Memory. The scheduler keeps its own ledger of the pool's blocks
// (Engine::blocks_for_tokens of each sequence's cached tokens) and never plans
// a step the pool cannot hold, so forward_batch never throws PoolExhausted.
//   kReserve (default): a request is admitted only when the pool can hold its
//     prompt plus max_tokens (within the context) beside every admitted
//     request's reservation; a started request never waits for memory.
//   kOptimistic: admitted when the pool holds what its prefill needs now; when
//     a decoding sequence needs a block and none is free, the most recently
//     admitted running sequence is preempted: its blocks are released, it goes
//     back to the front of the queue and is later rebuilt from its prompt and
//     the tokens it already generated, emitting nothing twice.
// Reserved slot (SchedulerOptions::reserved_slot_tokens > 0): one sequence
// slot beyond max_sequences and the blocks of that many tokens are set aside
// for requests given to submit_reserved() (a server's health probe), so they
// never wait behind a full replica and public requests can never take them.
// The reserved pool has its own ledger; its request is planned first.
// Nothing waits forever: a sequence that alone needs more than the whole pool
// (its reservation is capped at the pool) finishes with reason length and
// message "pool" when it cannot grow.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "runtime/request.h"
#include "runtime/step_plan.h"

namespace xq {

enum class AdmissionPolicy { kReserve, kOptimistic };

// "reserve" / "optimistic"; parse_admission_policy throws xq::Error for other names.
const char* admission_policy_name(AdmissionPolicy policy);
AdmissionPolicy parse_admission_policy(const std::string& name);

struct SchedulerOptions {
  // Tokens one step runs at most (decode tokens plus prefill chunks). At
  // least the pool's block_tokens (a prefill chunk may need that many to
  // reach its next boundary) and the sequence count (every decode fits).
  int32_t max_batch_tokens = 512;
  // Sequences admitted at once; 0: the engine's sequence slots.
  int32_t max_sequences = 0;
  // After this many steps in a row in which waiting prefills got no chunk,
  // the next step plans one prefill chunk before the decodes.
  int32_t max_decode_only_steps = 8;
  AdmissionPolicy policy = AdmissionPolicy::kReserve;
  // 0: no reserved slot. N > 0: the engine's slot max_sequences (so it needs
  // max_sequences + 1 slots) and blocks for a sequence of N tokens are kept
  // for submit_reserved(); public requests see the pool less those blocks.
  int32_t reserved_slot_tokens = 0;
};

// A snapshot for metrics and tests.
// Counts are of public requests unless named otherwise.
struct SchedulerStats {
  int32_t waiting = 0;               // submitted, not admitted (preempted ones included)
  int32_t running = 0;               // holding a sequence slot
  int64_t waiting_tokens = 0;        // tokens the waiting requests must (re)build
  int64_t running_tokens = 0;        // tokens the running sequences have in the cache
  int32_t ledger_blocks = 0;         // blocks the admitted sequences hold by the ledger
  int32_t reserved_blocks = 0;       // kReserve: blocks promised to admitted requests
  int32_t total_blocks = 0;          // the pool public requests share (less the reserved slot's)
  int32_t reserved_slot_blocks = 0;  // set aside for submit_reserved()
  int32_t reserved_slot_held_blocks = 0;  // of which its request holds now
  int32_t reserved_live = 0;              // reserved requests not yet finished
  int64_t preemptions = 0;
  int64_t steps = 0;  // steps that ran a plan
};

class Scheduler {
 public:
  // Throws xq::Error for options the engine cannot honour.
  Scheduler(StepExecutor& executor, const SchedulerOptions& options);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a request and returns its id. An invalid request (see
  // request_field_problem, plus: a token id outside the vocabulary, a prompt
  // that leaves no room in the context, a prompt the whole pool cannot hold)
  // gets its failed event at once, with the reason as the message.
  RequestId submit(Request request);
  // The same on the reserved slot (SchedulerOptions::reserved_slot_tokens);
  // reserved requests run one at a time, in submission order. Also failed at
  // once when there is no reserved slot or the request's prompt plus
  // max_tokens exceeds its tokens.
  RequestId submit_reserved(Request request);
  // Ends a waiting or running request with reason cancelled (its finished
  // event is queued now; its slot goes back in the next step's plan). False
  // when the id is unknown or already finished.
  bool cancel(RequestId id);
  // Plans one step, runs it and samples. Does nothing when idle. An engine
  // error fails the requests of that step (finished events with the
  // message); it is not thrown.
  void step();
  // No request left and no slot still to release.
  bool idle() const;
  // The events queued since the last call, in the order they happened.
  std::vector<RequestEvent> take_events();

  SchedulerStats stats() const;
  // The plan the last step() ran (for tests and tracing).
  const StepPlan& last_plan() const { return last_plan_; }
  const SchedulerOptions& options() const { return options_; }

 private:
  struct Sequence;
  using Clock = std::chrono::steady_clock;
  // A ledger over a share of the pool: the public one, or the reserved slot's.
  struct BlockLedger {
    int32_t total = 0;      // blocks of this share
    int32_t held = 0;       // blocks its admitted sequences hold
    int32_t transient = 0;  // held only while the planned step runs
    int32_t promised = 0;   // kReserve: promised to its admitted requests
    int32_t free() const { return total - held - transient; }
  };

  RequestId submit_to(Request request, bool reserved);
  RequestId fail_at_submit(RequestId id, const Request& request, const std::string& problem);
  void plan_reserved(StepPlan& plan, int32_t& budget);

  std::string engine_problem(const Request& request, const BlockLedger& ledger) const;
  StepPlan plan_step();
  void plan_decodes(StepPlan& plan, int32_t& budget);
  bool plan_prefills(StepPlan& plan, int32_t& budget, int32_t max_chunks);
  bool plan_chunk(StepPlan& plan, Sequence& s, int32_t& budget);
  int32_t chunk_end(const Sequence& s, int32_t limit) const;
  bool admissible(const Sequence& s) const;
  void admit(Sequence& s);
  void preempt(Sequence& s, StepPlan& plan);
  void release_slot(Sequence& s);
  // release_slot while a plan is being built: `plan` releases the slot.
  void release_slot_in_plan(Sequence& s, StepPlan& plan);
  void sample(Sequence& s, const float* logits);
  bool append_text(Sequence& s, const std::string& piece, std::string& out);
  void finish(Sequence& s, FinishReason reason, const std::string& message);
  void fail_step(const std::string& message);
  // Free by the sequence's ledger, less what the steps planned so far hold
  // only while they run (runtime/cache.h, blocks_for_step).
  int32_t free_blocks(const Sequence& s) const;
  int32_t outstanding_prefill_blocks() const;

  StepExecutor& executor_;
  SchedulerOptions options_;
  int32_t block_tokens_ = 0;
  int32_t total_blocks_ = 0;
  int32_t context_ = 0;
  int32_t vocab_ = 0;
  int32_t eos_ = -1;

  RequestId next_id_ = 1;
  uint64_t next_admission_ = 1;
  int64_t step_count_ = 0;
  int64_t preemptions_ = 0;
  int32_t starved_steps_ = 0;  // steps in a row where waiting prefills got nothing
  // `transient`: blocks the planned step holds beyond its sequences' end
  // counts until its last layer has run (window pages not yet given back);
  // reset per plan.
  BlockLedger public_, reserve_;
  int32_t reserved_slot_ = -1;  // the engine slot of the reserved ledger; -1: none

  std::unordered_map<RequestId, std::unique_ptr<Sequence>> live_;
  std::deque<Sequence*> waiting_;
  std::vector<Sequence*> running_;  // public, holding a slot, in admission order
  std::deque<Sequence*> reserved_waiting_;
  Sequence* reserved_running_ = nullptr;  // on the reserved slot
  std::vector<Sequence*> slot_owner_;     // by slot
  std::vector<int32_t> free_slots_;       // a stack
  std::vector<int32_t> pending_release_;  // slots for the next plan's `released`
  std::vector<Sequence*> planned_;        // by segment of the plan being built
  std::vector<float> logits_;
  std::vector<RequestEvent> events_;
  StepPlan last_plan_;
};

}  // namespace xq
