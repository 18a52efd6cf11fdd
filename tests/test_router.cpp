// The coordinator's pure parts: routing policies on synthetic loads, the
// circuit breaker on a synthetic clock, the admission queue's order, limits
// and retry-after estimate.
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "launch/serve/admission_queue.h"
#include "launch/serve/circuit_breaker.h"
#include "launch/serve/router.h"

namespace xq::serve {
namespace {

RouteCandidate candidate(std::string id, int64_t free_bytes, int64_t queued_tokens = 0,
                         int64_t unreported_tokens = 0, double bytes_per_token = 1000) {
  RouteCandidate c;
  c.id = std::move(id);
  c.free_cache_bytes = free_bytes;
  c.queued_tokens = queued_tokens;
  c.unreported_tokens = unreported_tokens;
  c.bytes_per_token = bytes_per_token;
  return c;
}

TEST(RoutingPolicyNames, ParseEveryNameAndRejectOthers) {
  for (RoutingPolicy p : {RoutingPolicy::kLeastLoad, RoutingPolicy::kPowerOfTwo,
                          RoutingPolicy::kRoundRobin, RoutingPolicy::kSession}) {
    const auto parsed = parse_routing_policy(routing_policy_name(p));
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(*parsed, p);
  }
  EXPECT_FALSE(parse_routing_policy("fastest").has_value());
  EXPECT_FALSE(parse_routing_policy("").has_value());
  EXPECT_FALSE(parse_routing_policy("Least-Load").has_value());
}

TEST(LeastLoad, PicksTheMostFreeBytes) {
  Router router(1);
  const std::vector<RouteCandidate> eligible = {
      candidate("a", 5'000'000), candidate("b", 9'000'000), candidate("c", 7'000'000)};
  EXPECT_EQ(router.pick(RoutingPolicy::kLeastLoad, eligible, ""), 1);
}

TEST(LeastLoad, SubtractsQueuedAndUnreportedTokens) {
  Router router(1);
  // b has the most free bytes but 5000 tokens waiting at 1000 bytes each:
  // 9e6 - 5e6 = 4e6 headroom, less than a's 5e6 and c's 7e6 - 1e6 = 6e6.
  const std::vector<RouteCandidate> eligible = {candidate("a", 5'000'000),
                                                candidate("b", 9'000'000, 3000, 2000),
                                                candidate("c", 7'000'000, 0, 1000)};
  EXPECT_EQ(headroom_bytes(eligible[1]), 4'000'000);
  EXPECT_EQ(router.pick(RoutingPolicy::kLeastLoad, eligible, ""), 2);
}

TEST(LeastLoad, TiesGoToFewerQueuedTokens) {
  Router router(1);
  // Same headroom (free - waiting * bytes_per_token), different waits.
  const std::vector<RouteCandidate> eligible = {candidate("a", 6'000'000, 2000, 0, 1000),
                                                candidate("b", 4'000'000, 0, 0, 1000),
                                                candidate("c", 5'000'000, 1000, 0, 1000)};
  EXPECT_EQ(router.pick(RoutingPolicy::kLeastLoad, eligible, ""), 1);
}

TEST(RoutingPolicies, EmptyEligibleSetPicksNothing) {
  Router router(1);
  for (RoutingPolicy p : {RoutingPolicy::kLeastLoad, RoutingPolicy::kPowerOfTwo,
                          RoutingPolicy::kRoundRobin, RoutingPolicy::kSession})
    EXPECT_EQ(router.pick(p, {}, "key"), -1);
}

TEST(RoundRobin, CyclesThroughTheReplicasInIdOrder) {
  Router router(1);
  // Given out of order, and with very different loads (which it ignores).
  const std::vector<RouteCandidate> eligible = {candidate("r2", 1), candidate("r0", 9'000'000),
                                                candidate("r1", 5)};
  std::vector<std::string> chosen;
  for (int i = 0; i < 7; ++i)
    chosen.push_back(eligible[router.pick(RoutingPolicy::kRoundRobin, eligible, "")].id);
  EXPECT_EQ(chosen, (std::vector<std::string>{"r0", "r1", "r2", "r0", "r1", "r2", "r0"}));
}

TEST(RoundRobin, SkipsAReplicaThatLeftAndResumesAfterTheLastChosen) {
  Router router(1);
  std::vector<RouteCandidate> eligible = {candidate("r0", 1), candidate("r1", 1),
                                          candidate("r2", 1)};
  EXPECT_EQ(eligible[router.pick(RoutingPolicy::kRoundRobin, eligible, "")].id, "r0");
  eligible.erase(eligible.begin() + 1);  // r1 saturated
  EXPECT_EQ(eligible[router.pick(RoutingPolicy::kRoundRobin, eligible, "")].id, "r2");
  EXPECT_EQ(eligible[router.pick(RoutingPolicy::kRoundRobin, eligible, "")].id, "r0");
}

TEST(PowerOfTwo, NeverPicksTheWorseOfTwo) {
  Router router(12345);
  // With two replicas both are always drawn, so the less loaded must win.
  const std::vector<RouteCandidate> two = {candidate("busy", 1'000), candidate("idle", 9'000)};
  for (int i = 0; i < 200; ++i) EXPECT_EQ(router.pick(RoutingPolicy::kPowerOfTwo, two, ""), 1);
  // With four, the most loaded can never win a pair; every other one can.
  const std::vector<RouteCandidate> four = {candidate("a", 4'000), candidate("b", 1'000),
                                            candidate("c", 3'000), candidate("d", 2'000)};
  std::map<int, int> counts;
  for (int i = 0; i < 4000; ++i) ++counts[router.pick(RoutingPolicy::kPowerOfTwo, four, "")];
  EXPECT_EQ(counts.count(1), 0u) << "the worst replica was picked";
  // Uniform pairs: the best wins 3 of 6 pairs (half), the 2nd 2/6, the 3rd
  // 1/6. 4000 draws: standard deviation below 32, so +-200 is > 6 sigma.
  EXPECT_NEAR(counts[0], 2000, 200);
  EXPECT_NEAR(counts[2], 1333, 200);
  EXPECT_NEAR(counts[3], 667, 200);
}

TEST(Session, SameKeySameReplicaAndNoKeyIsLeastLoad) {
  Router router(1);
  std::vector<RouteCandidate> eligible;
  for (int i = 0; i < 4; ++i) {
    eligible.push_back(candidate("replica-" + std::to_string(i), 1'000 * (i + 1)));
    router.add_member(eligible.back().id);
  }
  std::set<std::string> used;
  for (int k = 0; k < 100; ++k) {
    const std::string key = "user-" + std::to_string(k);
    const int first = router.pick(RoutingPolicy::kSession, eligible, key);
    ASSERT_GE(first, 0);
    used.insert(eligible[first].id);
    // Loads change between requests; the key still finds the same replica.
    std::vector<RouteCandidate> changed = eligible;
    for (RouteCandidate& c : changed) c.free_cache_bytes = 7'000 - c.free_cache_bytes;
    for (int repeat = 0; repeat < 3; ++repeat)
      EXPECT_EQ(router.pick(RoutingPolicy::kSession, changed, key), first) << key;
  }
  EXPECT_EQ(used.size(), 4u) << "100 keys should reach every one of 4 replicas";
  EXPECT_EQ(router.pick(RoutingPolicy::kSession, eligible, ""), 3);  // most free bytes
}

TEST(Session, RemovingAReplicaMovesOnlyItsKeys) {
  constexpr int kReplicas = 5, kKeys = 1000;
  Router router(1);
  std::vector<RouteCandidate> eligible;
  for (int i = 0; i < kReplicas; ++i) {
    eligible.push_back(candidate("10.0.0." + std::to_string(i) + ":50061", 1'000));
    router.add_member(eligible.back().id);
  }
  std::vector<std::string> before(kKeys);
  std::map<std::string, int> share;
  for (int k = 0; k < kKeys; ++k) {
    before[k] = eligible[router.pick(RoutingPolicy::kSession, eligible, std::to_string(k))].id;
    ++share[before[k]];
  }
  // Balanced within a generous bound (160 virtual nodes each).
  for (const auto& [id, count] : share) {
    EXPECT_GT(count, kKeys / kReplicas / 2) << id;
    EXPECT_LT(count, kKeys / kReplicas * 2) << id;
  }
  const std::string leaving = eligible[2].id;
  eligible.erase(eligible.begin() + 2);
  router.remove_member(leaving);
  int moved = 0;
  for (int k = 0; k < kKeys; ++k) {
    const std::string after =
        eligible[router.pick(RoutingPolicy::kSession, eligible, std::to_string(k))].id;
    if (before[k] == leaving) {
      ++moved;
    } else {
      EXPECT_EQ(after, before[k]) << "key " << k << " moved though its replica stayed";
    }
  }
  // Exactly the leaving replica's keys moved: about a fifth of them.
  EXPECT_EQ(moved, share[leaving]);
  EXPECT_NEAR(moved, kKeys / kReplicas, kKeys / kReplicas / 2);
}

TEST(Session, AnIneligibleMemberPassesItsKeysOnWithoutLeavingTheRing) {
  Router router(1);
  std::vector<RouteCandidate> all = {candidate("a", 1), candidate("b", 1), candidate("c", 1)};
  for (const RouteCandidate& c : all) router.add_member(c.id);
  std::map<std::string, std::string> owner;
  for (int k = 0; k < 300; ++k)
    owner[std::to_string(k)] = all[router.pick(RoutingPolicy::kSession, all, std::to_string(k))].id;
  const std::vector<RouteCandidate> without_b = {all[0], all[2]};
  for (const auto& [key, id] : owner) {
    const std::string now = without_b[router.pick(RoutingPolicy::kSession, without_b, key)].id;
    if (id != "b") {
      EXPECT_EQ(now, id) << key;
    }
  }
  // b back: its keys return.
  for (const auto& [key, id] : owner)
    EXPECT_EQ(all[router.pick(RoutingPolicy::kSession, all, key)].id, id) << key;
}

// ------------------------------------------------------------------ breaker

TEST(CircuitBreaker, OpensAfterConsecutiveFailuresThenHalfOpensWithOneTrial) {
  using namespace std::chrono_literals;
  CircuitBreaker breaker(3, 5000ms);
  CircuitBreaker::Clock::time_point t{};
  EXPECT_EQ(breaker.state(t), CircuitBreaker::State::kClosed);
  breaker.on_failure(t);
  breaker.on_failure(t);
  breaker.on_success();  // not consecutive: starts over
  breaker.on_failure(t);
  breaker.on_failure(t);
  EXPECT_EQ(breaker.state(t), CircuitBreaker::State::kClosed);
  EXPECT_TRUE(breaker.try_acquire(t));
  breaker.on_failure(t);
  EXPECT_EQ(breaker.state(t), CircuitBreaker::State::kOpen);
  EXPECT_FALSE(breaker.available(t + 4999ms));
  EXPECT_FALSE(breaker.try_acquire(t + 4999ms));
  // Cooldown over: half-open, and exactly one trial goes through.
  EXPECT_EQ(breaker.state(t + 5000ms), CircuitBreaker::State::kHalfOpen);
  EXPECT_TRUE(breaker.try_acquire(t + 5000ms));
  EXPECT_FALSE(breaker.try_acquire(t + 5001ms));
  EXPECT_FALSE(breaker.available(t + 5001ms));
  // A trial whose client left frees the slot without a verdict.
  breaker.release_trial();
  EXPECT_TRUE(breaker.try_acquire(t + 5002ms));
  // A failed trial reopens at once, for a whole new cooldown.
  breaker.on_failure(t + 6000ms);
  EXPECT_EQ(breaker.state(t + 10999ms), CircuitBreaker::State::kOpen);
  EXPECT_EQ(breaker.state(t + 11000ms), CircuitBreaker::State::kHalfOpen);
  EXPECT_TRUE(breaker.try_acquire(t + 11000ms));
  breaker.on_success();
  EXPECT_EQ(breaker.state(t + 11001ms), CircuitBreaker::State::kClosed);
  EXPECT_EQ(breaker.consecutive_failures(), 0);
  // Closed again: it takes three more failures to open.
  breaker.on_failure(t + 12000ms);
  breaker.on_failure(t + 12000ms);
  EXPECT_TRUE(breaker.try_acquire(t + 12000ms));
  EXPECT_TRUE(breaker.try_acquire(t + 12000ms));
}

TEST(CircuitBreaker, StateNamesAreWhatListReplicasShows) {
  EXPECT_STREQ(breaker_state_name(CircuitBreaker::State::kClosed), "up");
  EXPECT_STREQ(breaker_state_name(CircuitBreaker::State::kOpen), "open");
  EXPECT_STREQ(breaker_state_name(CircuitBreaker::State::kHalfOpen), "half-open");
}

// ------------------------------------------------------------------ queue

std::vector<uint64_t> order_of(const AdmissionQueue& queue) {
  std::vector<uint64_t> ids;
  for (const AdmissionQueue::Entry& e : queue) ids.push_back(e.id);
  return ids;
}

TEST(AdmissionQueue, HigherPriorityFirstFifoWithinAPriorityRequeuedAtTheHead) {
  AdmissionQueue queue(QueueLimits{100, 1'000'000});
  ASSERT_TRUE(queue.push(1, 0, 10));
  ASSERT_TRUE(queue.push(2, 5, 10));
  ASSERT_TRUE(queue.push(3, 0, 10));
  ASSERT_TRUE(queue.push(4, -2, 10));
  ASSERT_TRUE(queue.push(5, 5, 10));
  EXPECT_EQ(order_of(queue), (std::vector<uint64_t>{2, 5, 1, 3, 4}));
  queue.push_front(6, -7, 10);  // failed on a replica: admitted before all
  EXPECT_EQ(order_of(queue), (std::vector<uint64_t>{6, 2, 5, 1, 3, 4}));
  EXPECT_TRUE(queue.remove(5));
  EXPECT_FALSE(queue.remove(5));
  EXPECT_EQ(order_of(queue), (std::vector<uint64_t>{6, 2, 1, 3, 4}));
  EXPECT_EQ(queue.size(), 5);
  EXPECT_EQ(queue.tokens(), 50);
}

TEST(AdmissionQueue, FullByRequestsOrByTokensButRequeuedAlwaysFits) {
  AdmissionQueue queue(QueueLimits{3, 100});
  EXPECT_TRUE(queue.push(1, 0, 40));
  EXPECT_TRUE(queue.push(2, 0, 40));
  // 80 + 30 > 100 tokens.
  EXPECT_NE(queue.full_reason(30).find("--max-queued-tokens"), std::string::npos);
  EXPECT_FALSE(queue.push(3, 0, 30));
  EXPECT_TRUE(queue.push(3, 0, 20));  // exactly 100
  EXPECT_EQ(queue.tokens(), 100);
  // Three requests: full by count, even for a token-free request.
  EXPECT_NE(queue.full_reason(0).find("--max-queued-requests"), std::string::npos);
  EXPECT_FALSE(queue.push(4, 9, 0));
  EXPECT_EQ(queue.size(), 3);
  queue.push_front(5, 0, 500);
  EXPECT_EQ(queue.size(), 4);
  EXPECT_TRUE(queue.remove(1));
  EXPECT_TRUE(queue.remove(5));
  EXPECT_TRUE(queue.full_reason(40).empty());
}

TEST(RetryAfter, FromTheCompletionRateAtLeastOneSecond) {
  using namespace std::chrono_literals;
  CompletionRate rate;
  CompletionRate::Clock::time_point t{};
  EXPECT_FALSE(rate.per_second(t).has_value());
  // 21 completions over 10 s: 2.1 per second.
  for (int i = 0; i <= 20; ++i) rate.record(t + i * 500ms);
  const auto per_second = rate.per_second(t + 10s);
  ASSERT_TRUE(per_second.has_value());
  EXPECT_NEAR(*per_second, 2.1, 1e-9);
  // 20 ahead + this one at 2.1/s: 10 s.
  EXPECT_EQ(retry_after_seconds(20, per_second, 1), 10);
  EXPECT_EQ(retry_after_seconds(0, per_second, 1), 1);  // 0.48 s rounds up to 1
  EXPECT_EQ(retry_after_seconds(0, 1000.0, 1), 1);
  // A stale rate (nothing for over a minute) is not used.
  EXPECT_FALSE(rate.per_second(t + 10s + 61s).has_value());
  // No rate: one second per request per replica, capped at a minute.
  EXPECT_EQ(retry_after_seconds(7, std::nullopt, 2), 4);
  EXPECT_EQ(retry_after_seconds(5000, std::nullopt, 1), 60);
  EXPECT_EQ(retry_after_seconds(0, std::nullopt, 0), 1);
}

}  // namespace
}  // namespace xq::serve
