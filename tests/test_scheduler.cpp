// The batch scheduler. Most tests run on FakeEngine, a deterministic engine
// whose logits are a hash of everything its rows saw -- the tokens and, per
// row, whether that row's quantization group was complete when it ran (what
// the quantized caches' keys depend on) -- so a chunk boundary in the wrong
// place changes the tokens, and a run can be compared with the same prompt
// run alone through generate(). The last tests do the same on the real
// stories260K engine (fp16 and kivi-2, whose 128-token key groups make a
// misplaced chunk boundary change tokens; with and without preemption).
// Tolerance everywhere: none; tokens must match exactly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/engine.h"
#include "runtime/generation.h"
#include "runtime/model.h"
#include "runtime/scheduler.h"
#include "runtime/step_plan.h"
#include "tests/test_util.h"

namespace xq {
namespace {

const Model& stories() {
  static std::unique_ptr<Model> model = Model::load(testing::shared_path("models/stories260K.bin"));
  return *model;
}

uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  h *= 0xBF58476D1CE4E5B9ull;
  return h ^ (h >> 31);
}

// Tokens in, hash logits out; counts blocks of 128 tokens like the pool and
// throws PoolExhausted (keeping nothing) when a step would exceed it.
class FakeEngine final : public Engine {
 public:
  // `choose`, when given, names the token each row prefers (a script).
  FakeEngine(int32_t slots, int32_t total_blocks, int32_t context = 512,
             std::function<int32_t(const std::vector<int32_t>&)> choose = {})
      : slots_(static_cast<size_t>(slots)),
        total_blocks_(total_blocks),
        context_(context),
        choose_(std::move(choose)) {}

  struct Step {
    std::vector<int32_t> released;
    std::vector<Segment> segments;  // tokens pointers not kept
  };
  std::vector<Step> steps;
  int32_t max_held = 0;

  void forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
               int32_t first_logit_row) override {
    if (first_logit_row != n - 1) throw Error("fake engine: only the last row's logits");
    forward_batch({Segment{seq, pos0, tokens, n, logits != nullptr}}, logits);
  }
  void forward_batch(const std::vector<Segment>& segments, float* logits) override {
    std::set<int32_t> seen;
    int32_t held = held_blocks();
    for (const Segment& s : segments) {
      if (s.seq < 0 || static_cast<size_t>(s.seq) >= slots_.size() || !seen.insert(s.seq).second)
        throw Error("fake engine: bad or repeated slot");
      const Slot& slot = slots_[static_cast<size_t>(s.seq)];
      if (s.n < 1 || s.pos0 != static_cast<int32_t>(slot.tokens.size()) || s.pos0 + s.n > context_)
        throw Error("fake engine: segment does not continue its sequence");
      for (int32_t i = 0; i < s.n; ++i)
        if (s.tokens[i] < 0 || s.tokens[i] >= vocab()) throw Error("fake engine: bad token");
      held += blocks_for_tokens(s.pos0 + s.n) - blocks_for_tokens(s.pos0);
    }
    if (held > total_blocks_) throw PoolExhausted("fake engine: pool exhausted");
    max_held = std::max(max_held, held);
    Step step;
    for (const Segment& s : segments) {
      step.segments.push_back(s);
      step.segments.back().tokens = nullptr;
      Slot& slot = slots_[static_cast<size_t>(s.seq)];
      const int32_t end = s.pos0 + s.n;
      for (int32_t q = s.pos0; q < end; ++q) {
        const bool group_complete = (q / kBlock + 1) * kBlock <= end;
        const uint64_t prev = slot.hash.empty() ? 1 : slot.hash.back();
        slot.tokens.push_back(s.tokens[q - s.pos0]);
        slot.hash.push_back(mix(
            mix(mix(prev, static_cast<uint64_t>(s.tokens[q - s.pos0])), static_cast<uint64_t>(q)),
            group_complete ? 7 : 3));
      }
      if (!s.wants_logits) continue;
      const uint64_t h = slot.hash.back();
      const int32_t preferred = choose_ ? choose_(slot.tokens) : -1;
      for (int32_t v = 0; v < vocab(); ++v)
        logits[v] = preferred >= 0
                        ? (v == preferred ? 10.0f : 0.0f)
                        : static_cast<float>(mix(h, static_cast<uint64_t>(v)) % 4096) / 256.0f;
      logits += vocab();
    }
    steps.push_back(std::move(step));
  }
  void truncate(int32_t seq, int32_t from) override {
    Slot& slot = slots_.at(static_cast<size_t>(seq));
    slot.tokens.resize(std::min<size_t>(slot.tokens.size(), static_cast<size_t>(from)));
    slot.hash.resize(slot.tokens.size());
  }
  int32_t length(int32_t seq) const override {
    return static_cast<int32_t>(slots_.at(static_cast<size_t>(seq)).tokens.size());
  }
  int32_t max_tokens() const override { return context_; }
  const Model& model() const override { return stories(); }
  std::string cache_description() const override { return "fake"; }
  size_t cache_bytes_in_use() const override { return 0; }
  double cache_fraction_of_fp16() const override { return 1; }
  int32_t sequence_slots() const override { return static_cast<int32_t>(slots_.size()); }
  PoolInfo pool() const override { return {kBlock, total_blocks_, 1, 0}; }
  int32_t blocks_for_tokens(int32_t tokens) const override {
    return (tokens + kBlock - 1) / kBlock;
  }
  int32_t held_blocks() const {
    int32_t held = 0;
    for (const Slot& s : slots_) held += blocks_for_tokens(static_cast<int32_t>(s.tokens.size()));
    return held;
  }

 private:
  static constexpr int32_t kBlock = 128;
  int32_t vocab() const { return stories().config().vocab_size; }
  struct Slot {
    std::vector<int32_t> tokens;
    std::vector<uint64_t> hash;
  };
  std::vector<Slot> slots_;
  int32_t total_blocks_;
  int32_t context_;
  std::function<int32_t(const std::vector<int32_t>&)> choose_;
};

// What one request got, collected from the events; counts its finished events.
struct Outcome {
  std::vector<int32_t> tokens;
  std::string text;
  int finished = 0;
  int tokens_after_finish = 0;
  FinishReason reason = FinishReason::kFailed;
  std::string message;
  Usage usage;
};

void collect(Scheduler& scheduler, std::map<RequestId, Outcome>& out) {
  for (RequestEvent& e : scheduler.take_events()) {
    Outcome& o = out[e.id];
    o.text += e.text;
    if (e.kind == RequestEvent::Kind::kToken) {
      if (o.finished) ++o.tokens_after_finish;
      o.tokens.push_back(e.token);
    } else {
      ++o.finished;
      o.reason = e.reason;
      o.message = e.message;
      o.usage = e.usage;
    }
  }
}

std::vector<int32_t> random_prompt(std::mt19937& rng, int32_t n) {
  std::uniform_int_distribution<int32_t> token(3, 511);  // no BOS/EOS/unk
  std::vector<int32_t> p(static_cast<size_t>(n));
  for (int32_t& t : p) t = token(rng);
  return p;
}

// The tokens generate() gives for the request alone on a fresh engine.
std::vector<int32_t> solo(Engine& engine, const Request& r) {
  GenerationOptions options;
  options.max_new_tokens = r.max_tokens;
  options.sampler = {r.temperature, r.top_k, r.top_p, r.seed.value_or(0)};
  std::vector<int32_t> tokens;
  for (const SampledToken& t : generate(engine, r.prompt, options).tokens)
    tokens.push_back(t.token);
  engine.release(0);
  return tokens;
}

// generate() has no ignore_eos: where it stopped at EOS, the request must
// have sampled that EOS and gone on; the tokens before it must agree.
::testing::AssertionResult MatchesSolo(const std::vector<int32_t>& got,
                                       std::vector<int32_t> expected, const Request& r) {
  const int32_t eos = stories().tokenizer().eos_id();
  if (r.ignore_eos && expected.size() < got.size() &&
      expected.size() < static_cast<size_t>(r.max_tokens)) {
    if (got[expected.size()] != eos)
      return ::testing::AssertionFailure() << "no EOS where the solo run ended";
    expected.push_back(eos);
    expected.resize(std::min(expected.size(), got.size()));
    return std::equal(expected.begin(), expected.end(), got.begin())
               ? ::testing::AssertionSuccess()
               : ::testing::AssertionFailure() << "tokens before the EOS differ";
  }
  if (got == expected) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << got.size() << " tokens vs " << expected.size() << " alone, prompt " << r.prompt.size()
         << ", max_tokens " << r.max_tokens;
}

TEST(StepPlan, SerializeRoundTripKeepsSegmentsPointingIntoTokens) {
  StepPlan plan;
  plan.released = {3, 1};
  const int32_t a[] = {5, 6, 7}, b[] = {9};
  plan.add(0, 0, a, 3, false);
  plan.add(2, 40, b, 1, true);
  StepPlan copy = StepPlan::deserialize(plan.serialize());
  ASSERT_EQ(copy.released, plan.released);
  ASSERT_EQ(copy.segments.size(), 2u);
  EXPECT_EQ(copy.segments[1].seq, 2);
  EXPECT_EQ(copy.segments[1].pos0, 40);
  EXPECT_TRUE(copy.segments[1].wants_logits);
  EXPECT_EQ(copy.segments[0].tokens[2], 7);
  EXPECT_EQ(copy.segments[1].tokens, copy.tokens.data() + 3);
  EXPECT_EQ(copy.logit_rows(), 1);
  StepPlan assigned;
  assigned = copy;
  EXPECT_EQ(assigned.segments[1].tokens, assigned.tokens.data() + 3);
  std::vector<int32_t> flat = plan.serialize();
  flat.pop_back();  // one token short
  EXPECT_THROW(StepPlan::deserialize(flat), Error);
  EXPECT_THROW(StepPlan::deserialize(std::vector<int32_t>{-1}), Error);
  EXPECT_THROW(StepPlan::deserialize(std::vector<int32_t>{0, 1000000}), Error);
}

TEST(Scheduler, InvalidRequestsFailAtOnceWithAReason) {
  FakeEngine engine(2, 3, 512);
  LocalExecutor executor(engine);
  Scheduler scheduler(executor, {});
  auto make = [](std::function<void(Request&)> edit) {
    Request r;
    r.prompt = {1, 50, 60};
    edit(r);
    return r;
  };
  const std::vector<std::pair<Request, std::string>> cases = {
      {make([](Request& r) { r.prompt.clear(); }), "no tokens"},
      {make([](Request& r) { r.max_tokens = 0; }), "max_tokens"},
      {make([](Request& r) { r.temperature = -1; }), "temperature"},
      {make([](Request& r) { r.top_p = 0; }), "top_p"},
      {make([](Request& r) { r.top_p = 1.5f; }), "top_p"},
      {make([](Request& r) { r.top_k = -1; }), "top_k"},
      {make([](Request& r) { r.logprobs = 99; }), "logprobs"},
      {make([](Request& r) { r.stop = {""}; }), "stop"},
      {make([](Request& r) { r.prompt[1] = 512; }), "vocabulary"},
      {make([](Request& r) { r.prompt.assign(512, 5); }), "context"},
      // 3 blocks of 128 tokens: a 400-token prompt never fits.
      {make([](Request& r) { r.prompt.assign(400, 5); }), "pool"},
  };
  for (const auto& [request, word] : cases) {
    const RequestId id = scheduler.submit(request);
    std::vector<RequestEvent> events = scheduler.take_events();
    ASSERT_EQ(events.size(), 1u) << word;
    EXPECT_EQ(events[0].id, id);
    EXPECT_EQ(events[0].reason, FinishReason::kFailed);
    EXPECT_NE(events[0].message.find(word), std::string::npos) << events[0].message;
  }
  EXPECT_TRUE(scheduler.idle());
  EXPECT_THROW(Scheduler(executor, SchedulerOptions{100, 0, 8, AdmissionPolicy::kReserve}), Error);
  EXPECT_THROW(Scheduler(executor, SchedulerOptions{512, 3, 8, AdmissionPolicy::kReserve}), Error);
}

// Prompts of several lengths (some over 128), staggered, with a budget that
// forces chunking: each step stays within the budget, every prefill chunk
// ends at a multiple of 128 or the prompt's end, and every request's tokens
// equal its solo run.
TEST(Scheduler, BudgetChunksAndSoloEquality) {
  for (AdmissionPolicy policy : {AdmissionPolicy::kReserve, AdmissionPolicy::kOptimistic}) {
    FakeEngine engine(4, 16, 512);
    LocalExecutor executor(engine);
    SchedulerOptions options;
    options.max_batch_tokens = 150;
    options.policy = policy;
    Scheduler scheduler(executor, options);
    std::mt19937 rng(7);
    const std::vector<int32_t> lengths = {300, 20, 129, 255, 64, 400, 3, 200};
    std::map<RequestId, Request> requests;
    std::map<RequestId, Outcome> out;
    size_t next = 0;
    for (int step = 0; !scheduler.idle() || next < lengths.size(); ++step) {
      if (step % 3 == 0 && next < lengths.size()) {
        Request r;
        r.prompt = random_prompt(rng, lengths[next++]);
        r.max_tokens = 60;
        r.ignore_eos = next % 2 == 0;
        r.temperature = next % 3 == 0 ? 0.8f : 0.0f;
        r.top_k = 40;
        r.seed = next;
        requests[scheduler.submit(r)] = r;
      }
      scheduler.step();
      collect(scheduler, out);
      ASSERT_LE(scheduler.last_plan().token_count(), options.max_batch_tokens);
    }
    const std::set<int32_t> ends(lengths.begin(), lengths.end());
    for (const FakeEngine::Step& s : engine.steps)
      for (const Segment& seg : s.segments)
        if (seg.n > 1 && seg.pos0 < 400) {
          const int32_t end = seg.pos0 + seg.n;
          EXPECT_TRUE(end % 128 == 0 || ends.count(end)) << "chunk ends at " << end;
        }
    FakeEngine alone(1, 16, 512);
    for (const auto& [id, r] : requests) {
      ASSERT_EQ(out[id].finished, 1);
      EXPECT_TRUE(MatchesSolo(out[id].tokens, solo(alone, r), r)) << "request " << id;
      EXPECT_EQ(out[id].usage.completion_tokens, static_cast<int32_t>(out[id].tokens.size()));
    }
    EXPECT_EQ(scheduler.stats().ledger_blocks, 0);
    EXPECT_EQ(engine.held_blocks(), 0);
  }
}

// Thousands of steps of random submits and cancels with a pool far too small
// (optimistic: preemption happens all the time): every request ends exactly
// once, no token after its end, the ledger stays within the pool (the fake
// engine throws PoolExhausted otherwise, which would fail requests), finished
// requests equal their solo runs, and the pool is empty at the end.
void stress(AdmissionPolicy policy, int64_t* preemptions) {
  FakeEngine engine(6, 4, 512);
  LocalExecutor executor(engine);
  SchedulerOptions options;
  options.max_batch_tokens = 192;
  options.policy = policy;
  Scheduler scheduler(executor, options);
  std::mt19937 rng(policy == AdmissionPolicy::kReserve ? 1 : 2);
  std::map<RequestId, Request> requests;
  std::map<RequestId, Outcome> out;
  std::vector<RequestId> ids;
  for (int step = 0; step < 6000; ++step) {
    if (rng() % 16 == 0) {
      Request r;
      r.prompt = random_prompt(rng, 1 + static_cast<int32_t>(rng() % 250));
      r.max_tokens = 1 + static_cast<int32_t>(rng() % 250);
      r.ignore_eos = rng() % 2;
      r.seed = rng();
      r.temperature = rng() % 2 ? 0.0f : 1.0f;
      const RequestId id = scheduler.submit(r);
      requests[id] = r;
      ids.push_back(id);
    }
    if (rng() % 40 == 0 && !ids.empty()) scheduler.cancel(ids[rng() % ids.size()]);
    scheduler.step();
    collect(scheduler, out);
    const SchedulerStats st = scheduler.stats();
    ASSERT_LE(st.ledger_blocks, st.total_blocks);
    ASSERT_LE(st.reserved_blocks, st.total_blocks);
    ASSERT_LE(engine.held_blocks(), st.total_blocks);
  }
  for (RequestId id : ids) scheduler.cancel(id);
  while (!scheduler.idle()) scheduler.step();
  collect(scheduler, out);
  EXPECT_EQ(scheduler.stats().ledger_blocks, 0);
  EXPECT_EQ(engine.held_blocks(), 0);
  EXPECT_LE(engine.max_held, 4);
  FakeEngine alone(1, 4, 512);
  int compared = 0;
  for (RequestId id : ids) {
    const Outcome& o = out[id];
    ASSERT_EQ(o.finished, 1) << "request " << id;
    ASSERT_EQ(o.tokens_after_finish, 0);
    ASSERT_NE(o.reason, FinishReason::kFailed) << o.message;
    if (o.reason == FinishReason::kCancelled) continue;
    std::vector<int32_t> expected = solo(alone, requests[id]);
    if (o.message == "pool") expected.resize(o.tokens.size());  // stopped early, alone too big
    ASSERT_TRUE(MatchesSolo(o.tokens, expected, requests[id]))
        << "request " << id << ", " << o.message;
    ++compared;
  }
  EXPECT_GT(compared, 50);
  *preemptions = scheduler.stats().preemptions;
}

TEST(Scheduler, OptimisticStressEndsEveryRequestOnceAndPreempts) {
  int64_t preemptions = 0;
  stress(AdmissionPolicy::kOptimistic, &preemptions);
  EXPECT_GT(preemptions, 20);
}

TEST(Scheduler, ReserveStressNeverPreempts) {
  int64_t preemptions = -1;
  stress(AdmissionPolicy::kReserve, &preemptions);
  EXPECT_EQ(preemptions, 0);
}

// 7 decoding sequences use 7 of a 128-token budget; a 300-token prompt needs
// 128 to reach its first boundary, so it waits until the guard gives it a
// chunk, after exactly max_decode_only_steps starved steps.
int32_t steps_until_prefill(int32_t guard) {
  FakeEngine engine(8, 40, 512);
  LocalExecutor executor(engine);
  Scheduler scheduler(executor, SchedulerOptions{128, 8, guard, AdmissionPolicy::kReserve});
  std::mt19937 rng(3);
  for (int i = 0; i < 7; ++i) {
    Request r;
    r.prompt = random_prompt(rng, 10);
    r.max_tokens = 400;
    r.ignore_eos = true;
    scheduler.submit(r);
  }
  for (int i = 0; i < 3; ++i) scheduler.step();
  Request long_prompt;
  long_prompt.prompt = random_prompt(rng, 300);
  scheduler.submit(long_prompt);
  for (int32_t step = 1; step <= 200; ++step) {
    scheduler.step();
    for (const Segment& s : scheduler.last_plan().segments)
      if (s.seq == 7) return step;
  }
  return -1;
}

TEST(Scheduler, StarvationGuardGivesPrefillAChunk) {
  EXPECT_EQ(steps_until_prefill(8), 9);
  EXPECT_EQ(steps_until_prefill(2), 3);
  EXPECT_EQ(steps_until_prefill(1000), -1);  // without the guard it starves
}

TEST(Scheduler, CancelQueuedPrefillingAndRunningEndsOnceAndReleasesTheSlot) {
  FakeEngine engine(2, 8, 512);
  LocalExecutor executor(engine);
  Scheduler scheduler(executor, SchedulerOptions{256, 2, 8, AdmissionPolicy::kReserve});
  std::mt19937 rng(5);
  Request running, prefilling, queued;
  running.prompt = random_prompt(rng, 5);
  running.max_tokens = 100;
  running.ignore_eos = true;
  prefilling.prompt = random_prompt(rng, 300);
  queued.prompt = random_prompt(rng, 5);
  const RequestId a = scheduler.submit(running);
  scheduler.step();  // a prefilled
  const RequestId b = scheduler.submit(prefilling);
  const RequestId c = scheduler.submit(queued);
  scheduler.step();  // a decodes, b gets its first chunk; no slot for c
  std::map<RequestId, Outcome> out;
  collect(scheduler, out);
  EXPECT_TRUE(scheduler.cancel(c));
  EXPECT_TRUE(scheduler.cancel(b));
  EXPECT_TRUE(scheduler.cancel(a));
  EXPECT_FALSE(scheduler.cancel(a));
  EXPECT_FALSE(scheduler.cancel(12345));
  collect(scheduler, out);
  scheduler.step();
  std::vector<int32_t> released = scheduler.last_plan().released;
  std::sort(released.begin(), released.end());
  EXPECT_EQ(released, (std::vector<int32_t>{0, 1}));
  EXPECT_TRUE(scheduler.last_plan().segments.empty());
  EXPECT_TRUE(scheduler.idle());
  collect(scheduler, out);
  for (RequestId id : {a, b, c}) {
    EXPECT_EQ(out[id].finished, 1);
    EXPECT_EQ(out[id].reason, FinishReason::kCancelled);
  }
  EXPECT_EQ(out[a].tokens.size(), 2u);
  EXPECT_TRUE(out[b].tokens.empty());
  EXPECT_EQ(engine.held_blocks(), 0);
}

// A sequence that alone outgrows the pool ends with length "pool" when it
// reaches it, under both policies, instead of waiting forever.
TEST(Scheduler, SequenceLargerThanThePoolEndsWithLengthPool) {
  for (AdmissionPolicy policy : {AdmissionPolicy::kReserve, AdmissionPolicy::kOptimistic}) {
    FakeEngine engine(2, 2, 512);
    LocalExecutor executor(engine);
    Scheduler scheduler(executor, SchedulerOptions{256, 0, 8, policy});
    std::mt19937 rng(9);
    Request r;
    r.prompt = random_prompt(rng, 200);
    r.max_tokens = 300;
    r.ignore_eos = true;
    const RequestId id = scheduler.submit(r);
    std::map<RequestId, Outcome> out;
    for (int i = 0; i < 1000 && !scheduler.idle(); ++i) scheduler.step();
    collect(scheduler, out);
    ASSERT_TRUE(scheduler.idle());
    EXPECT_EQ(out[id].reason, FinishReason::kLength);
    EXPECT_EQ(out[id].message, "pool");
    // 256 tokens fit: the prompt and 56 fed tokens, plus the last sampled one.
    EXPECT_EQ(out[id].tokens.size(), 57u);
  }
}

// The request waiting behind one that outgrows the pool starts in the step
// where that one ends "pool", on the slot it leaves: that slot must be
// released in the same step's plan, before the newcomer's prefill runs on it
// (the fake engine throws for a segment that does not continue its slot, and
// a release in the next plan would also drop the newcomer's cache).
TEST(Scheduler, ARequestAdmittedOnTheSlotOfOneThatEndedPoolStartsOnAnEmptySlot) {
  for (AdmissionPolicy policy : {AdmissionPolicy::kReserve, AdmissionPolicy::kOptimistic}) {
    FakeEngine engine(2, 2, 512);
    LocalExecutor executor(engine);
    Scheduler scheduler(executor, SchedulerOptions{256, 0, 8, policy});
    std::mt19937 rng(9);
    Request big;
    big.prompt = random_prompt(rng, 200);
    big.max_tokens = 300;
    big.ignore_eos = true;
    Request next;
    next.prompt = random_prompt(rng, 60);
    next.max_tokens = 20;
    next.ignore_eos = true;
    const RequestId a = scheduler.submit(big);
    scheduler.step();  // a prefilled alone, holding both blocks
    const RequestId b = scheduler.submit(next);
    std::map<RequestId, Outcome> out;
    for (int i = 0; i < 1000 && !scheduler.idle(); ++i) {
      scheduler.step();
      collect(scheduler, out);
    }
    ASSERT_TRUE(scheduler.idle());
    EXPECT_EQ(out[a].message, "pool");
    ASSERT_EQ(out[b].finished, 1);
    EXPECT_EQ(out[b].reason, FinishReason::kLength) << out[b].message;
    FakeEngine alone(1, 2, 512);
    EXPECT_TRUE(MatchesSolo(out[b].tokens, solo(alone, next), next));
    EXPECT_EQ(engine.held_blocks(), 0);
  }
}

// A scripted engine emits the tokens of a known text; the stop string spans
// token boundaries, text that only looked like a stop string's start is
// released, and nothing from the stop string on is emitted.
TEST(Scheduler, StopStringsAcrossTokens) {
  const Tokenizer& tok = stories().tokenizer();
  const std::string story = "Once upon a time, there was a little dog. He liked a lot of food.";
  const std::vector<int32_t> script = tok.encode(story, false);
  auto run = [&](std::vector<std::string> stop, FinishReason* reason) {
    std::vector<int32_t> prompt = {1, 100};
    FakeEngine engine(1, 8, 512, [&](const std::vector<int32_t>& seen) {
      const size_t i = seen.size() - prompt.size();
      return i < script.size() ? script[i] : tok.eos_id();
    });
    LocalExecutor executor(engine);
    Scheduler scheduler(executor, {});
    Request r;
    r.prompt = prompt;
    r.max_tokens = 200;
    r.stop = std::move(stop);
    const RequestId id = scheduler.submit(r);
    std::map<RequestId, Outcome> out;
    while (!scheduler.idle()) {
      scheduler.step();
      collect(scheduler, out);
    }
    *reason = out[id].reason;
    EXPECT_EQ(out[id].finished, 1);
    return out[id].text;
  };
  FinishReason reason;
  EXPECT_EQ(run({"little dog"}, &reason), "Once upon a time, there was a ");
  EXPECT_EQ(reason, FinishReason::kStop);
  EXPECT_EQ(run({"a lot", "xyz"}, &reason), "Once upon a time, there was a little dog. He liked ");
  EXPECT_EQ(reason, FinishReason::kStop);
  EXPECT_EQ(run({"dog!"}, &reason), tok.decode(script));
  EXPECT_EQ(reason, FinishReason::kEos);
  EXPECT_EQ(run({}, &reason), tok.decode(script));
}

TEST(Scheduler, LogprobsAreLogSoftmaxOfTheRawLogits) {
  FakeEngine engine(1, 8, 512);
  LocalExecutor executor(engine);
  Scheduler scheduler(executor, {});
  Request r;
  r.prompt = {1, 20, 30};
  r.max_tokens = 3;
  r.logprobs = 5;
  r.ignore_eos = true;
  scheduler.submit(r);
  scheduler.step();
  std::vector<RequestEvent> events = scheduler.take_events();
  ASSERT_EQ(events.size(), 1u);
  ASSERT_TRUE(events[0].logprobs.has_value());
  const Logprobs& lp = *events[0].logprobs;
  ASSERT_EQ(lp.top.size(), 5u);
  EXPECT_EQ(lp.top[0].token, events[0].token);  // greedy
  EXPECT_EQ(lp.chosen.logprob, lp.top[0].logprob);
  for (size_t i = 1; i < lp.top.size(); ++i) EXPECT_LE(lp.top[i].logprob, lp.top[i - 1].logprob);
  EXPECT_LT(lp.top[0].logprob, 0.0f);
  const float logits[3] = {1.0f, 2.0f, 3.0f};
  const Logprobs three = logprobs(logits, 3, 0, 3);
  const double total = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  EXPECT_NEAR(three.chosen.logprob, 1.0 - std::log(total), 1e-6);
  EXPECT_EQ(three.top[0].token, 2);
}

// An engine that reports a smaller pool than it has, and fails a step that
// would exceed it: the real engine under a tight budget.
class PoolLimitedEngine final : public Engine {
 public:
  PoolLimitedEngine(TransformerEngine& inner, int32_t total_blocks)
      : inner_(inner), total_blocks_(total_blocks) {}
  void forward(int32_t seq, const int32_t* tokens, int32_t n, int32_t pos0, float* logits,
               int32_t first_logit_row) override {
    inner_.forward(seq, tokens, n, pos0, logits, first_logit_row);
  }
  void forward_batch(const std::vector<Segment>& segments, float* logits) override {
    int32_t held = 0;
    for (int32_t s = 0; s < inner_.sequence_slots(); ++s)
      held += inner_.blocks_for_tokens(inner_.length(s));
    for (const Segment& s : segments)
      held += inner_.blocks_for_step(s.pos0, s.pos0 + s.n) - inner_.blocks_for_tokens(s.pos0);
    if (held > total_blocks_) throw PoolExhausted("pool-limited engine: pool exhausted");
    inner_.forward_batch(segments, logits);
  }
  void truncate(int32_t seq, int32_t from) override { inner_.truncate(seq, from); }
  int32_t length(int32_t seq) const override { return inner_.length(seq); }
  int32_t max_tokens() const override { return inner_.max_tokens(); }
  const Model& model() const override { return inner_.model(); }
  std::string cache_description() const override { return inner_.cache_description(); }
  size_t cache_bytes_in_use() const override { return inner_.cache_bytes_in_use(); }
  double cache_fraction_of_fp16() const override { return inner_.cache_fraction_of_fp16(); }
  int32_t sequence_slots() const override { return inner_.sequence_slots(); }
  PoolInfo pool() const override {
    PoolInfo p = inner_.pool();
    p.total_blocks = total_blocks_;
    return p;
  }
  int32_t blocks_for_tokens(int32_t tokens) const override {
    return inner_.blocks_for_tokens(tokens);
  }
  int32_t blocks_for_step(int32_t from, int32_t to) const override {
    return inner_.blocks_for_step(from, to);
  }

 private:
  TransformerEngine& inner_;
  int32_t total_blocks_;
};

// Real text prompts of 5 to ~300 tokens submitted at staggered steps, greedy:
// each output equals generate() of that prompt alone, exactly.
void real_engine_matches_solo(const std::string& mode, AdmissionPolicy policy, int32_t pool_blocks,
                              bool expect_preemption) {
  const Model& model = stories();
  const std::string text = [] {
    std::ifstream in(testing::shared_path("data/tinystories-valid.txt"));
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }();
  const Tokenizer& tok = model.tokenizer();
  std::vector<Request> requests;
  size_t at = 0;
  for (int32_t words : {2, 20, 55, 90, 30, 120}) {
    // `words` words from a story start, so lengths differ and cross 128.
    size_t end = at;
    for (int32_t w = 0; w < words; ++w) end = text.find(' ', end + 1);
    Request r;
    r.prompt = tok.encode(text.substr(at, end - at), true);
    r.max_tokens = 48;
    r.ignore_eos = true;
    requests.push_back(r);
    at = text.find("\n\n", end) + 2;
  }
  EngineOptions options;
  options.cache_mode = mode;
  options.sequences = 4;
  TransformerEngine inner(model, options);
  if (pool_blocks < 0) {
    // Room for the longest request and half of another: decodes outgrow it.
    size_t longest = 0;
    for (const Request& r : requests) longest = std::max(longest, r.prompt.size());
    pool_blocks = inner.blocks_for_tokens(static_cast<int32_t>(longest) + 48) * 3 / 2;
  }
  PoolLimitedEngine engine(inner, pool_blocks);
  LocalExecutor executor(engine);
  SchedulerOptions sopts;
  sopts.max_batch_tokens = 160;
  sopts.policy = policy;
  Scheduler scheduler(executor, sopts);
  std::map<RequestId, Outcome> out;
  std::vector<RequestId> ids;
  size_t next = 0;
  for (int step = 0; next < requests.size() || !scheduler.idle(); ++step) {
    if (step % 4 == 0 && next < requests.size()) ids.push_back(scheduler.submit(requests[next++]));
    scheduler.step();
    collect(scheduler, out);
  }
  EngineOptions alone_options;
  alone_options.cache_mode = mode;
  TransformerEngine alone(model, alone_options);
  bool crossed = false;
  for (size_t i = 0; i < requests.size(); ++i) {
    crossed |= requests[i].prompt.size() > 128;
    const Outcome& o = out[ids[i]];
    ASSERT_EQ(o.finished, 1);
    ASSERT_NE(o.reason, FinishReason::kFailed) << o.message;
    EXPECT_EQ(o.tokens, solo(alone, requests[i]))
        << mode << " request " << i << " (" << requests[i].prompt.size() << " prompt tokens)";
    EXPECT_EQ(o.text, tok.decode(o.tokens));
  }
  EXPECT_TRUE(crossed);
  if (expect_preemption)
    EXPECT_GT(scheduler.stats().preemptions, 0);
  else
    EXPECT_EQ(scheduler.stats().preemptions, 0);
  EXPECT_EQ(scheduler.stats().ledger_blocks, 0);
}

TEST(SchedulerRealEngine, Fp16StaggeredGreedyEqualsSolo) {
  real_engine_matches_solo("fp16", AdmissionPolicy::kReserve, 16, false);
}

TEST(SchedulerRealEngine, Kivi2StaggeredGreedyEqualsSolo) {
  real_engine_matches_solo("kivi-2", AdmissionPolicy::kReserve, 16, false);
}

TEST(SchedulerRealEngine, Kivi2OptimisticSmallPoolPreemptsAndEqualsSolo) {
  real_engine_matches_solo("kivi-2", AdmissionPolicy::kOptimistic, -1, true);
}

// The reserved slot: one slot beyond max_sequences and its blocks are kept
// for submit_reserved(), which runs at once beside a full replica; public
// requests never get that slot or those blocks.
TEST(Scheduler, ReservedSlotRunsBesideAFullPoolAndIsNeverPublic) {
  // 3 slots, 5 blocks of 128: two public slots, 4 public blocks, 1 reserved.
  FakeEngine engine(3, 5, 512);
  LocalExecutor executor(engine);
  SchedulerOptions options{256, 2, 8, AdmissionPolicy::kReserve};
  options.reserved_slot_tokens = 16;
  Scheduler scheduler(executor, options);
  EXPECT_EQ(scheduler.stats().total_blocks, 4);
  EXPECT_EQ(scheduler.stats().reserved_slot_blocks, 1);
  std::mt19937 rng(11);
  std::vector<RequestId> pub;
  for (int i = 0; i < 3; ++i) {
    Request r;
    r.prompt = random_prompt(rng, 100);
    r.max_tokens = 100;  // 199 tokens at the peak: 2 blocks each, the public pool for two
    r.ignore_eos = true;
    pub.push_back(scheduler.submit(r));
  }
  scheduler.step();
  scheduler.step();
  ASSERT_EQ(scheduler.stats().running, 2);
  ASSERT_EQ(scheduler.stats().waiting, 1);  // no public slot or block left
  Request probe;
  probe.prompt = random_prompt(rng, 3);
  probe.max_tokens = 1;
  probe.ignore_eos = true;
  const RequestId reserved = scheduler.submit_reserved(probe);
  EXPECT_EQ(scheduler.stats().reserved_live, 1);
  std::map<RequestId, Outcome> out;
  collect(scheduler, out);
  scheduler.step();
  // Planned first, on the slot past the public ones, and done in one step.
  ASSERT_FALSE(scheduler.last_plan().segments.empty());
  EXPECT_EQ(scheduler.last_plan().segments[0].seq, 2);
  EXPECT_EQ(scheduler.last_plan().segments[0].n, 3);
  collect(scheduler, out);
  EXPECT_EQ(out[reserved].finished, 1);
  EXPECT_EQ(out[reserved].reason, FinishReason::kLength);
  EXPECT_EQ(out[reserved].tokens.size(), 1u);
  EXPECT_EQ(scheduler.stats().waiting, 1);  // the public one still waits
  EXPECT_EQ(scheduler.stats().reserved_live, 0);
  // Too large for the slot, and a scheduler without one: refused at once.
  Request big = probe;
  big.max_tokens = 20;
  const RequestId refused = scheduler.submit_reserved(big);
  collect(scheduler, out);
  EXPECT_EQ(out[refused].reason, FinishReason::kFailed);
  EXPECT_NE(out[refused].message.find("reserved slot"), std::string::npos) << out[refused].message;
  while (!scheduler.idle()) {
    scheduler.step();
    collect(scheduler, out);
  }
  for (RequestId id : pub) {
    EXPECT_EQ(out[id].finished, 1);
    EXPECT_EQ(out[id].tokens.size(), 100u);
  }
  // No public segment ever ran on the reserved slot, and the pool never
  // held more than the fake engine's 5 blocks (it throws otherwise).
  int reserved_segments = 0;
  for (const FakeEngine::Step& step : engine.steps)
    for (const Segment& seg : step.segments) reserved_segments += seg.seq == 2;
  EXPECT_EQ(reserved_segments, 1);
  EXPECT_EQ(engine.held_blocks(), 0);

  FakeEngine plain_engine(2, 4, 512);
  LocalExecutor plain_executor(plain_engine);
  Scheduler plain(plain_executor, SchedulerOptions{256, 2, 8, AdmissionPolicy::kReserve});
  const RequestId none = plain.submit_reserved(probe);
  std::map<RequestId, Outcome> plain_out;
  collect(plain, plain_out);
  EXPECT_EQ(plain_out[none].reason, FinishReason::kFailed);
  // The reserved slot needs an engine slot of its own.
  SchedulerOptions too_many{256, 2, 8, AdmissionPolicy::kReserve};
  too_many.reserved_slot_tokens = 16;
  EXPECT_THROW(Scheduler(plain_executor, too_many), Error);
}

// A cancelled reserved request gives its slot and blocks back like any other.
TEST(Scheduler, ReservedRequestCancelReleasesItsSlot) {
  FakeEngine engine(2, 4, 512);
  LocalExecutor executor(engine);
  SchedulerOptions options{256, 1, 8, AdmissionPolicy::kReserve};
  options.reserved_slot_tokens = 16;
  Scheduler scheduler(executor, options);
  std::mt19937 rng(3);
  Request probe;
  probe.prompt = random_prompt(rng, 4);
  probe.max_tokens = 8;
  probe.ignore_eos = true;
  const RequestId id = scheduler.submit_reserved(probe);
  scheduler.step();
  EXPECT_TRUE(scheduler.cancel(id));
  scheduler.step();
  EXPECT_EQ(scheduler.last_plan().released, (std::vector<int32_t>{1}));
  EXPECT_TRUE(scheduler.idle());
  EXPECT_EQ(engine.held_blocks(), 0);
  EXPECT_EQ(scheduler.stats().reserved_live, 0);
}

}  // namespace
}  // namespace xq
