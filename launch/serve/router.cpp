#include "launch/serve/router.h"

#include <algorithm>
#include <cmath>

namespace xq::serve {

std::optional<RoutingPolicy> parse_routing_policy(std::string_view name) {
  if (name == "least-load") return RoutingPolicy::kLeastLoad;
  if (name == "power-of-two") return RoutingPolicy::kPowerOfTwo;
  if (name == "round-robin") return RoutingPolicy::kRoundRobin;
  if (name == "session") return RoutingPolicy::kSession;
  return std::nullopt;
}

const char* routing_policy_name(RoutingPolicy policy) {
  switch (policy) {
    case RoutingPolicy::kLeastLoad:
      return "least-load";
    case RoutingPolicy::kPowerOfTwo:
      return "power-of-two";
    case RoutingPolicy::kRoundRobin:
      return "round-robin";
    case RoutingPolicy::kSession:
      return "session";
  }
  return "?";
}

const char* routing_policy_names() {
  return "least-load, power-of-two, round-robin, session";
}

int64_t headroom_bytes(const RouteCandidate& candidate) {
  const double pending =
      static_cast<double>(candidate.queued_tokens + candidate.unreported_tokens) *
      candidate.bytes_per_token;
  return candidate.free_cache_bytes - static_cast<int64_t>(std::ceil(pending));
}

bool less_loaded(const RouteCandidate& a, const RouteCandidate& b) {
  const int64_t room_a = headroom_bytes(a), room_b = headroom_bytes(b);
  if (room_a != room_b) return room_a > room_b;
  const int64_t waiting_a = a.queued_tokens + a.unreported_tokens;
  const int64_t waiting_b = b.queued_tokens + b.unreported_tokens;
  if (waiting_a != waiting_b) return waiting_a < waiting_b;
  return a.id < b.id;
}

uint64_t HashRing::hash(std::string_view text) {
  // FNV-1a, then a finalizer (splitmix64's) so that similar names ("r1#0",
  // "r1#1") land far apart on the ring.
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;
  }
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  h ^= h >> 31;
  return h;
}

void HashRing::add(const std::string& member) {
  if (!members_.emplace(member, virtual_nodes_).second) return;
  for (int i = 0; i < virtual_nodes_; ++i)
    ring_.emplace(hash(member + "#" + std::to_string(i)), member);
}

void HashRing::remove(const std::string& member) {
  if (members_.erase(member) == 0) return;
  for (auto it = ring_.begin(); it != ring_.end();)
    it = it->second == member ? ring_.erase(it) : std::next(it);
}

int Router::pick(RoutingPolicy policy, const std::vector<RouteCandidate>& eligible,
                 std::string_view routing_key) {
  if (eligible.empty()) return -1;
  switch (policy) {
    case RoutingPolicy::kLeastLoad:
      return pick_least_load(eligible);
    case RoutingPolicy::kPowerOfTwo:
      return pick_power_of_two(eligible);
    case RoutingPolicy::kRoundRobin:
      return pick_round_robin(eligible);
    case RoutingPolicy::kSession:
      return routing_key.empty() ? pick_least_load(eligible) : pick_session(eligible, routing_key);
  }
  return -1;
}

int Router::pick_least_load(const std::vector<RouteCandidate>& eligible) const {
  int best = 0;
  for (int i = 1; i < static_cast<int>(eligible.size()); ++i)
    if (less_loaded(eligible[i], eligible[best])) best = i;
  return best;
}

int Router::pick_power_of_two(const std::vector<RouteCandidate>& eligible) {
  const int n = static_cast<int>(eligible.size());
  if (n == 1) return 0;
  const int a = static_cast<int>(std::uniform_int_distribution<int>(0, n - 1)(random_));
  int b = static_cast<int>(std::uniform_int_distribution<int>(0, n - 2)(random_));
  if (b >= a) ++b;  // distinct from a, uniform over the rest
  return less_loaded(eligible[a], eligible[b]) ? a : b;
}

int Router::pick_round_robin(const std::vector<RouteCandidate>& eligible) {
  // By id rather than by position, so the cycle survives replicas joining,
  // leaving or being briefly ineligible.
  int next = -1, first = 0;
  for (int i = 0; i < static_cast<int>(eligible.size()); ++i) {
    if (eligible[i].id < eligible[first].id) first = i;
    if (eligible[i].id > last_round_robin_ && (next < 0 || eligible[i].id < eligible[next].id))
      next = i;
  }
  const int chosen = next >= 0 ? next : first;
  last_round_robin_ = eligible[chosen].id;
  return chosen;
}

int Router::pick_session(const std::vector<RouteCandidate>& eligible, std::string_view key) {
  auto index_of = [&](const std::string& id) {
    for (int i = 0; i < static_cast<int>(eligible.size()); ++i)
      if (eligible[i].id == id) return i;
    return -1;
  };
  const std::optional<std::string> id =
      ring_.lookup(key, [&](const std::string& member) { return index_of(member) >= 0; });
  // An eligible replica the ring does not know yet: least-load.
  return id ? index_of(*id) : pick_least_load(eligible);
}

}  // namespace xq::serve
