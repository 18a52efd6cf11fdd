#include "runtime/scheduler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "kernels/error.h"
#include "runtime/text_stream.h"

namespace xq {

std::string request_field_problem(const Request& r) {
  if (r.prompt.empty()) return "the prompt has no tokens";
  if (r.max_tokens <= 0)
    return "max_tokens must be at least 1, got " + std::to_string(r.max_tokens);
  if (!std::isfinite(r.temperature) || r.temperature < 0)
    return "temperature must be a finite number >= 0, got " + std::to_string(r.temperature);
  if (r.top_k < 0) return "top_k must be >= 0 (0: no limit), got " + std::to_string(r.top_k);
  if (!(r.top_p > 0 && r.top_p <= 1))
    return "top_p must be in (0, 1], got " + std::to_string(r.top_p);
  if (r.logprobs < -1 || r.logprobs > kMaxTopLogprobs)
    return "logprobs must be from 0 to " + std::to_string(kMaxTopLogprobs) + " (or absent), got " +
           std::to_string(r.logprobs);
  for (const std::string& s : r.stop)
    if (s.empty()) return "a stop string is empty (it would match before any text)";
  return "";
}

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kFailed:
      return "failed";
  }
  return "failed";
}

const char* admission_policy_name(AdmissionPolicy policy) {
  return policy == AdmissionPolicy::kReserve ? "reserve" : "optimistic";
}

AdmissionPolicy parse_admission_policy(const std::string& name) {
  if (name == "reserve") return AdmissionPolicy::kReserve;
  if (name == "optimistic") return AdmissionPolicy::kOptimistic;
  throw Error("admission policy must be 'reserve' or 'optimistic', got '" + name + "'");
}

struct Scheduler::Sequence {
  Sequence(RequestId id_, Request request_, const Tokenizer& tokenizer, uint64_t seed)
      : id(id_),
        request(std::move(request_)),
        sampler(SamplerOptions{request.temperature, request.top_k, request.top_p, seed}),
        text(tokenizer),
        tokens(request.prompt),
        prompt_tokens(static_cast<int32_t>(request.prompt.size())) {}

  RequestId id;
  Request request;
  Sampler sampler;
  TextStream text;
  std::string decoded;          // whole characters decoded so far
  size_t emitted = 0;           // bytes of `decoded` already sent in events
  std::vector<int32_t> tokens;  // prompt, then every generated token
  int32_t prompt_tokens = 0;
  int32_t generated = 0;
  int32_t max_generated = 0;  // max_tokens within the context
  int32_t cached = 0;         // tokens [0, cached) are in the engine's cache
  int32_t slot = -1;
  int32_t held_blocks = 0;        // by the ledger: blocks_for_tokens of what the plan has run
  int32_t reserved_blocks = 0;    // kReserve
  uint64_t admission = 0;         // larger: admitted more recently
  int64_t planned_step = -1;      // the step whose plan holds a segment of it
  bool resumed = false;           // preempted: goes before every new request
  bool reserved = false;          // runs on the reserved slot
  BlockLedger* ledger = nullptr;  // the share of the pool it draws on
  Clock::time_point submitted, admitted, first_token;
  bool ever_admitted = false, has_first_token = false;

  int32_t target() const { return static_cast<int32_t>(tokens.size()); }
  // A decode step: the one token sampled last is all that is not cached.
  bool decoding() const { return generated > 0 && target() - cached == 1; }
  // The most tokens its cache holds: the prompt and every generated token
  // but the last (which is never fed).
  int32_t peak_tokens() const { return prompt_tokens + max_generated - 1; }
};

Scheduler::Scheduler(StepExecutor& executor, const SchedulerOptions& options)
    : executor_(executor), options_(options) {
  Engine& engine = executor_.engine();
  const PoolInfo pool = engine.pool();
  block_tokens_ = pool.block_tokens;
  total_blocks_ = pool.total_blocks;
  context_ = engine.max_tokens();
  vocab_ = engine.model().config().vocab_size;
  eos_ = engine.model().tokenizer().eos_id();
  if (block_tokens_ < 1 || total_blocks_ < 1)
    throw Error("scheduler: the engine's cache pool has no blocks");
  if (options_.reserved_slot_tokens < 0 || options_.reserved_slot_tokens > context_)
    throw Error("scheduler: reserved slot tokens must be from 0 to the context of " +
                std::to_string(context_) + ", got " +
                std::to_string(options_.reserved_slot_tokens));
  const bool has_reserve = options_.reserved_slot_tokens > 0;
  const int32_t slots = engine.sequence_slots() - (has_reserve ? 1 : 0);
  if (options_.max_sequences == 0) options_.max_sequences = slots;
  if (options_.max_sequences < 1 || options_.max_sequences > slots)
    throw Error("scheduler: max sequences must be from 1 to the engine's " + std::to_string(slots) +
                " sequence slots" + (has_reserve ? " (one more is the reserved slot)" : "") +
                ", got " + std::to_string(options_.max_sequences));
  public_.total = total_blocks_;
  if (has_reserve) {
    // Its largest step: a prefill from empty, or a decode at any length.
    const int32_t n = options_.reserved_slot_tokens;
    reserve_.total = std::max(engine.blocks_for_step(0, n), engine.blocks_for_step(n - 1, n));
    for (int32_t t = 1; t < n; ++t)
      reserve_.total = std::max(reserve_.total, engine.blocks_for_step(t - 1, t));
    public_.total -= reserve_.total;
    if (public_.total < 1)
      throw Error("scheduler: the reserved slot's " + std::to_string(reserve_.total) +
                  " blocks leave none of the pool's " + std::to_string(total_blocks_) +
                  " to other requests");
    reserved_slot_ = options_.max_sequences;
  }
  const int32_t min_budget = std::max(block_tokens_, options_.max_sequences);
  if (options_.max_batch_tokens < min_budget)
    throw Error("scheduler: max batch tokens must be at least " + std::to_string(min_budget) +
                " (a block of " + std::to_string(block_tokens_) +
                " tokens, and one decode token per sequence), got " +
                std::to_string(options_.max_batch_tokens));
  if (options_.max_decode_only_steps < 0)
    throw Error("scheduler: max decode-only steps must be >= 0");
  slot_owner_.assign(static_cast<size_t>(options_.max_sequences), nullptr);
  // A stack popped from the back: slot 0 is used first.
  for (int32_t s = options_.max_sequences - 1; s >= 0; --s) free_slots_.push_back(s);
}

Scheduler::~Scheduler() = default;

std::string Scheduler::engine_problem(const Request& r, const BlockLedger& ledger) const {
  for (size_t i = 0; i < r.prompt.size(); ++i)
    if (r.prompt[i] < 0 || r.prompt[i] >= vocab_)
      return "prompt token " + std::to_string(i) + " is id " + std::to_string(r.prompt[i]) +
             ", outside the vocabulary of " + std::to_string(vocab_);
  const int64_t n = static_cast<int64_t>(r.prompt.size());
  if (n >= context_)
    return "the prompt has " + std::to_string(n) + " tokens; the context holds " +
           std::to_string(context_) + " and at least one must be left to generate";
  // The first generated token is fed only when a second one is wanted.
  const int32_t first_needed = static_cast<int32_t>(r.max_tokens > 1 ? n + 1 : n);
  const int32_t blocks = executor_.engine().blocks_for_tokens(first_needed);
  if (blocks > ledger.total)
    return "the prompt needs " + std::to_string(blocks) + " cache blocks of " +
           std::to_string(block_tokens_) + " tokens; the whole pool holds " +
           std::to_string(ledger.total);
  return "";
}

RequestId Scheduler::submit(Request request) {
  return submit_to(std::move(request), false);
}

RequestId Scheduler::submit_reserved(Request request) {
  return submit_to(std::move(request), true);
}

RequestId Scheduler::fail_at_submit(RequestId id, const Request& request,
                                    const std::string& problem) {
  RequestEvent event;
  event.kind = RequestEvent::Kind::kFinished;
  event.id = id;
  event.reason = FinishReason::kFailed;
  event.message = problem;
  event.usage.prompt_tokens = static_cast<int32_t>(request.prompt.size());
  events_.push_back(std::move(event));
  return id;
}

RequestId Scheduler::submit_to(Request request, bool reserved) {
  const RequestId id = next_id_++;
  const auto now = Clock::now();
  std::string problem;
  std::unique_ptr<Sequence> s;
  BlockLedger& ledger = reserved ? reserve_ : public_;
  try {
    problem = request_field_problem(request);
    if (problem.empty() && reserved) {
      const int64_t peak = static_cast<int64_t>(request.prompt.size()) + request.max_tokens - 1;
      if (reserved_slot_ < 0)
        problem = "the scheduler has no reserved slot";
      else if (peak > options_.reserved_slot_tokens)
        problem = "the prompt and max_tokens need " + std::to_string(peak) +
                  " tokens; the reserved slot holds " +
                  std::to_string(options_.reserved_slot_tokens);
    }
    if (problem.empty()) problem = engine_problem(request, ledger);
    if (problem.empty()) {
      const uint64_t seed = request.seed ? *request.seed : std::random_device{}();
      s = std::make_unique<Sequence>(id, std::move(request), executor_.engine().model().tokenizer(),
                                     seed);
    }
  } catch (const std::exception& e) {
    problem = e.what();
  }
  if (!problem.empty()) return fail_at_submit(id, request, problem);
  s->submitted = now;
  s->max_generated =
      std::min<int32_t>(s->request.max_tokens, context_ - static_cast<int32_t>(s->prompt_tokens));
  s->reserved = reserved;
  s->ledger = &ledger;
  if (reserved) {
    reserved_waiting_.push_back(s.get());
  } else {
    // Behind every preempted request and every request of at least this priority.
    auto at = std::find_if(waiting_.begin(), waiting_.end(), [&](const Sequence* w) {
      return !w->resumed && w->request.priority < s->request.priority;
    });
    waiting_.insert(at, s.get());
  }
  live_.emplace(id, std::move(s));
  return id;
}

int32_t Scheduler::free_blocks(const Sequence& s) const {
  return s.ledger->free();
}

bool Scheduler::cancel(RequestId id) {
  auto it = live_.find(id);
  if (it == live_.end()) return false;
  Sequence& s = *it->second;
  if (s.slot >= 0) {
    release_slot(s);
  } else {
    std::deque<Sequence*>& queue = s.reserved ? reserved_waiting_ : waiting_;
    queue.erase(std::find(queue.begin(), queue.end(), &s));
  }
  finish(s, FinishReason::kCancelled, "");
  return true;
}

bool Scheduler::idle() const {
  return live_.empty() && pending_release_.empty();
}

std::vector<RequestEvent> Scheduler::take_events() {
  std::vector<RequestEvent> out;
  out.swap(events_);
  return out;
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats st;
  st.waiting = static_cast<int32_t>(waiting_.size());
  st.running = static_cast<int32_t>(running_.size());
  for (const Sequence* s : waiting_) st.waiting_tokens += s->target();
  for (const Sequence* s : running_) st.running_tokens += s->cached;
  st.ledger_blocks = public_.held;
  st.reserved_slot_held_blocks = reserve_.held;
  st.reserved_blocks = public_.promised;
  st.total_blocks = public_.total;
  st.reserved_slot_blocks = reserve_.total;
  st.reserved_live = static_cast<int32_t>(reserved_waiting_.size()) + (reserved_running_ ? 1 : 0);
  st.preemptions = preemptions_;
  st.steps = step_count_;
  return st;
}

// Gives the slot back: to the ledger and the free list now, to the engine in
// the next plan (which releases before it runs anything, so the slot may be
// admitted again in that same plan).
void Scheduler::release_slot(Sequence& s) {
  pending_release_.push_back(s.slot);
  if (s.reserved) {
    reserved_running_ = nullptr;
  } else {
    free_slots_.push_back(s.slot);
    slot_owner_[static_cast<size_t>(s.slot)] = nullptr;
    running_.erase(std::find(running_.begin(), running_.end(), &s));
  }
  s.ledger->held -= s.held_blocks;
  s.ledger->promised -= s.reserved_blocks;
  s.held_blocks = 0;
  s.reserved_blocks = 0;
  s.cached = 0;
  s.slot = -1;
}

void Scheduler::finish(Sequence& s, FinishReason reason, const std::string& message) {
  RequestEvent event;
  event.kind = RequestEvent::Kind::kFinished;
  event.id = s.id;
  event.reason = reason;
  event.message = message;
  // Text held back in case it began a stop string is final now; after a
  // stop, everything from the stop string on is dropped.
  if (reason != FinishReason::kStop) event.text = s.decoded.substr(s.emitted) + s.text.finish();
  event.usage.prompt_tokens = s.prompt_tokens;
  event.usage.completion_tokens = s.generated;
  const auto now = Clock::now();
  auto seconds = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };
  if (s.ever_admitted) {
    event.timings.queue_seconds = seconds(s.submitted, s.admitted);
    event.timings.prefill_seconds = seconds(s.admitted, s.has_first_token ? s.first_token : now);
    if (s.has_first_token) event.timings.decode_seconds = seconds(s.first_token, now);
  } else {
    event.timings.queue_seconds = seconds(s.submitted, now);
  }
  events_.push_back(std::move(event));
  live_.erase(s.id);  // s is gone from here on
}

int32_t Scheduler::outstanding_prefill_blocks() const {
  int32_t blocks = 0;
  for (const Sequence* r : running_)
    if (!r->decoding())
      blocks += executor_.engine().blocks_for_tokens(r->target()) - r->held_blocks;
  return blocks;
}

bool Scheduler::admissible(const Sequence& s) const {
  if (free_slots_.empty()) return false;
  Engine& engine = executor_.engine();
  if (options_.policy == AdmissionPolicy::kReserve) {
    const int32_t reserve =
        std::min(engine.blocks_for_tokens(std::max(s.peak_tokens(), s.target())), public_.total);
    return public_.promised + reserve <= public_.total;
  }
  // Its whole prefill (or rebuild) beside what the admitted prefills still
  // need, so that admitted prefills can always finish once decodes leave.
  return engine.blocks_for_tokens(s.target()) <= free_blocks(s) - outstanding_prefill_blocks();
}

void Scheduler::admit(Sequence& s) {
  waiting_.erase(std::find(waiting_.begin(), waiting_.end(), &s));
  s.slot = free_slots_.back();
  free_slots_.pop_back();
  slot_owner_[static_cast<size_t>(s.slot)] = &s;
  s.admission = next_admission_++;
  s.cached = 0;
  s.held_blocks = 0;
  if (options_.policy == AdmissionPolicy::kReserve) {
    s.reserved_blocks = std::min(
        executor_.engine().blocks_for_tokens(std::max(s.peak_tokens(), s.target())), public_.total);
    public_.promised += s.reserved_blocks;
  }
  if (!s.ever_admitted) {
    s.ever_admitted = true;
    s.admitted = Clock::now();
  }
  running_.push_back(&s);
}

void Scheduler::release_slot_in_plan(Sequence& s, StepPlan& plan) {
  const int32_t slot = s.slot;
  release_slot(s);
  // release_slot queued the slot for the next plan; this plan releases it,
  // since the plan being built may admit another sequence to it.
  pending_release_.pop_back();
  plan.released.push_back(slot);
}

void Scheduler::preempt(Sequence& s, StepPlan& plan) {
  release_slot_in_plan(s, plan);
  s.resumed = true;
  waiting_.push_front(&s);
  ++preemptions_;
}

// The end of the next chunk of s from s.cached, at most `limit` (an absolute
// position), or s.cached when no chunk may end there. Chunks reproduce what
// the sequence's queries see when it runs alone: a prompt in one forward
// (chunk ends at multiples of block_tokens or the prompt's end, where the
// prompt part always ends), generated tokens one by one (at each multiple e
// of block_tokens, [e - 1, e) is a chunk of its own: the query at e - 1 is
// the first to see its group complete, and no other query in its group may).
int32_t Scheduler::chunk_end(const Sequence& s, int32_t limit) const {
  const int32_t start = s.cached;
  limit = std::min(limit, s.target());
  if (limit <= start) return start;
  const int32_t n = s.prompt_tokens, b = block_tokens_;
  if (start < n) {
    if (limit >= n) return n;
    const int32_t boundary = limit / b * b;
    return boundary > start ? boundary : start;
  }
  const int32_t next_multiple = (start / b + 1) * b;
  const int32_t cut = next_multiple - 1 > start ? next_multiple - 1 : next_multiple;
  return std::min(limit, cut);
}

bool Scheduler::plan_chunk(StepPlan& plan, Sequence& s, int32_t& budget) {
  Engine& engine = executor_.engine();
  // The most tokens its blocks and the free ones hold, at the step's peak.
  const int32_t room = s.held_blocks + free_blocks(s);
  int32_t fit = s.cached, hi = s.target();
  while (fit < hi) {
    const int32_t mid = fit + (hi - fit + 1) / 2;
    if (engine.blocks_for_step(s.cached, mid) <= room)
      fit = mid;
    else
      hi = mid - 1;
  }
  const int32_t end = chunk_end(s, std::min(fit, s.cached + budget));
  if (end <= s.cached) return false;
  plan.add(s.slot, s.cached, s.tokens.data() + s.cached, end - s.cached, end == s.target());
  planned_.push_back(&s);
  s.planned_step = step_count_;
  budget -= end - s.cached;
  const int32_t held = engine.blocks_for_tokens(end);
  s.ledger->transient += engine.blocks_for_step(s.cached, end) - held;
  s.ledger->held += held - s.held_blocks;
  s.held_blocks = held;
  return true;
}

void Scheduler::plan_decodes(StepPlan& plan, int32_t& budget) {
  Engine& engine = executor_.engine();
  std::vector<Sequence*> decoders;
  for (Sequence* s : running_)
    if (s->decoding() && s->planned_step != step_count_) decoders.push_back(s);
  for (Sequence* s : decoders) {
    if (s->slot < 0) continue;  // preempted for an older one in this loop
    if (budget == 0) break;
    const int32_t need = engine.blocks_for_step(s->cached, s->cached + 1) - s->held_blocks;
    bool runs = true;
    while (need > free_blocks(*s)) {
      if (public_.held == s->held_blocks) {
        // Alone and still too big: the pool can never hold its next token.
        release_slot_in_plan(*s, plan);
        finish(*s, FinishReason::kLength, "pool");
        runs = false;
        break;
      }
      Sequence* victim = nullptr;
      if (options_.policy == AdmissionPolicy::kOptimistic)
        for (auto it = running_.rbegin(); it != running_.rend() && !victim; ++it)
          if ((*it)->planned_step != step_count_ && (*it)->held_blocks > 0) victim = *it;
      if (!victim) {
        runs = false;  // what holds the blocks runs in this step; try again next step
        break;
      }
      preempt(*victim, plan);
      if (victim == s) {
        runs = false;
        break;
      }
    }
    if (runs) plan_chunk(plan, *s, budget);
  }
}

bool Scheduler::plan_prefills(StepPlan& plan, int32_t& budget, int32_t max_chunks) {
  int32_t chunks = 0;
  std::vector<Sequence*> prefilling;
  for (Sequence* s : running_)
    if (!s->decoding() && s->planned_step != step_count_) prefilling.push_back(s);
  for (Sequence* s : prefilling) {
    if (chunks >= max_chunks || budget == 0) return chunks > 0;
    if (plan_chunk(plan, *s, budget)) ++chunks;
  }
  // Admission in queue order: a request that cannot start keeps the ones
  // behind it waiting, so a large request is never overtaken forever.
  while (!waiting_.empty() && chunks < max_chunks && budget > 0) {
    Sequence& s = *waiting_.front();
    if (options_.policy == AdmissionPolicy::kOptimistic &&
        executor_.engine().blocks_for_tokens(s.target()) > public_.total) {
      // A preempted sequence grew past what the pool can rebuild.
      waiting_.pop_front();
      finish(s, FinishReason::kLength, "pool");
      continue;
    }
    if (!admissible(s)) break;
    // Only when its first chunk fits this step's budget.
    if (chunk_end(s, std::min(s.target(), budget)) == 0) break;
    admit(s);
    if (!plan_chunk(plan, s, budget)) break;
    ++chunks;
  }
  return chunks > 0;
}

StepPlan Scheduler::plan_step() {
  StepPlan plan;
  planned_.clear();
  public_.transient = 0;
  reserve_.transient = 0;
  plan.released.swap(pending_release_);
  int32_t budget = options_.max_batch_tokens;
  plan_reserved(plan, budget);
  bool prefill_waiting = !waiting_.empty();
  for (const Sequence* s : running_) prefill_waiting |= !s->decoding();
  bool prefill_ran = false;
  if (prefill_waiting && starved_steps_ >= options_.max_decode_only_steps)
    prefill_ran = plan_prefills(plan, budget, 1);
  plan_decodes(plan, budget);
  prefill_ran |= plan_prefills(plan, budget, std::numeric_limits<int32_t>::max());
  starved_steps_ = prefill_waiting && !prefill_ran ? starved_steps_ + 1 : 0;
  // Under kOptimistic, sequences mid-prefill may hold blocks that none of
  // them can grow past; preempting the youngest lets the others go on.
  if (plan.segments.empty() && running_.size() > 1 &&
      options_.policy == AdmissionPolicy::kOptimistic)
    preempt(*running_.back(), plan);
  return plan;
}

// The reserved slot's request goes first: admitted as soon as the slot is
// free (its ledger always holds it), then one chunk or decode per step.
void Scheduler::plan_reserved(StepPlan& plan, int32_t& budget) {
  if (!reserved_running_ && !reserved_waiting_.empty()) {
    Sequence& s = *reserved_waiting_.front();
    reserved_waiting_.pop_front();
    s.slot = reserved_slot_;
    s.admission = next_admission_++;
    s.cached = 0;
    s.held_blocks = 0;
    if (!s.ever_admitted) {
      s.ever_admitted = true;
      s.admitted = Clock::now();
    }
    reserved_running_ = &s;
  }
  if (!reserved_running_ || budget == 0) return;
  Sequence& s = *reserved_running_;
  // Planned first, with the whole budget (at least a block), so only its
  // own ledger can stop it: it outgrew the slot.
  if (plan_chunk(plan, s, budget)) return;
  release_slot_in_plan(s, plan);
  finish(s, FinishReason::kLength, "pool");
}

void Scheduler::fail_step(const std::string& message) {
  std::vector<Sequence*> failed = planned_;
  for (Sequence* s : failed) {
    if (s->slot >= 0) release_slot(*s);
    finish(*s, FinishReason::kFailed, "engine: " + message);
  }
}

void Scheduler::step() {
  StepPlan plan = plan_step();
  if (plan.empty()) return;
  ++step_count_;
  logits_.resize(static_cast<size_t>(plan.logit_rows()) * static_cast<size_t>(vocab_));
  try {
    executor_.execute(plan, logits_.data());
  } catch (const std::exception& e) {
    fail_step(e.what());
    last_plan_ = std::move(plan);
    return;
  }
  const float* row = logits_.data();
  for (size_t i = 0; i < plan.segments.size(); ++i) {
    const Segment& seg = plan.segments[i];
    Sequence& s = *planned_[i];
    s.cached = seg.pos0 + seg.n;
    if (!seg.wants_logits) continue;
    sample(s, row);
    row += vocab_;
  }
  last_plan_ = std::move(plan);
}

void Scheduler::sample(Sequence& s, const float* logits) {
  const int32_t token = s.sampler.sample(logits, vocab_);
  if (!s.has_first_token) {
    s.has_first_token = true;
    s.first_token = Clock::now();
  }
  if (token == eos_ && !s.request.ignore_eos) {
    release_slot(s);
    finish(s, FinishReason::kEos, "");
    return;
  }
  s.tokens.push_back(token);
  ++s.generated;
  RequestEvent event;
  event.kind = RequestEvent::Kind::kToken;
  event.id = s.id;
  event.token = token;
  if (s.request.logprobs >= 0) event.logprobs = logprobs(logits, vocab_, token, s.request.logprobs);
  const bool stopped = append_text(s, s.text.push(token), event.text);
  events_.push_back(std::move(event));
  if (stopped) {
    release_slot(s);
    finish(s, FinishReason::kStop, "");
  } else if (s.generated == s.max_generated) {
    const bool context_full = s.generated < s.request.max_tokens;
    release_slot(s);
    finish(s, FinishReason::kLength, context_full ? "context" : "");
  }
}

// Adds a decoded piece; `out` gets the text that is now final. True when a
// stop string appeared: the text then ends where it starts.
bool Scheduler::append_text(Sequence& s, const std::string& piece, std::string& out) {
  const size_t old_size = s.decoded.size();
  s.decoded += piece;
  size_t hit = std::string::npos;
  for (const std::string& stop : s.request.stop) {
    // Only a match that uses the new text is new; none starts before
    // `emitted` (that text was released because no stop string could start there).
    const size_t from =
        std::max(s.emitted, old_size >= stop.size() ? old_size - stop.size() + 1 : size_t{0});
    const size_t at = s.decoded.find(stop, from);
    if (at < hit) hit = at;
  }
  if (hit != std::string::npos) {
    out = s.decoded.substr(s.emitted, hit - s.emitted);
    s.decoded.resize(hit);
    s.emitted = hit;
    return true;
  }
  // Hold back the longest tail that could still become a stop string.
  size_t hold = 0;
  for (const std::string& stop : s.request.stop) {
    const size_t longest = std::min(stop.size() - 1, s.decoded.size() - s.emitted);
    for (size_t k = longest; k > hold; --k)
      if (s.decoded.compare(s.decoded.size() - k, k, stop, 0, k) == 0) {
        hold = k;
        break;
      }
  }
  const size_t ready = s.decoded.size() - hold;
  out = s.decoded.substr(s.emitted, ready - s.emitted);
  s.emitted = ready;
  return false;
}

}  // namespace xq
