// The coordinator's routing policies: which of the eligible replicas a
// request goes to. Pure functions of the replicas' reported load (no gRPC,
// no clock), so each policy is unit-tested on synthetic loads.
//
//   least-load    the most cache headroom: free cache bytes less what the
//                 replica's queued tokens and the requests routed there but
//                 not yet seen in its load will take; ties by fewer tokens
//                 waiting, then by id.
//   power-of-two  two distinct replicas drawn at random, the one with more
//                 headroom (as least-load compares them).
//   round-robin   the next replica id after the last one chosen, in id order.
//   session       a consistent hash ring (virtual nodes) over the
//                 "x-routing-key": the same key finds the same replica, and a
//                 replica leaving moves only the keys it held. Without a key,
//                 least-load.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace xq::serve {

enum class RoutingPolicy { kLeastLoad, kPowerOfTwo, kRoundRobin, kSession };

// nullopt for an unknown name.
std::optional<RoutingPolicy> parse_routing_policy(std::string_view name);
const char* routing_policy_name(RoutingPolicy policy);
// "least-load, power-of-two, round-robin, session", for error messages.
const char* routing_policy_names();

// One eligible replica as the policies see it.
struct RouteCandidate {
  std::string id;
  int64_t free_cache_bytes = 0;  // the tightest rank's, from its last load
  int64_t queued_tokens = 0;     // prompt tokens waiting there, from its last load
  // Tokens (prompt bound + max_tokens) of requests routed there that its
  // last load did not yet reflect.
  int64_t unreported_tokens = 0;
  double bytes_per_token = 0;  // the tightest rank's
};

// Free bytes once the waiting and unreported tokens are placed (may be
// negative).
int64_t headroom_bytes(const RouteCandidate& candidate);
// True when `a` is the better least-load choice than `b`.
bool less_loaded(const RouteCandidate& a, const RouteCandidate& b);

// Consistent hashing with `virtual_nodes` points per member on a 64-bit ring.
class HashRing {
 public:
  explicit HashRing(int virtual_nodes = 160) : virtual_nodes_(virtual_nodes) {}
  void add(const std::string& member);
  void remove(const std::string& member);
  bool contains(const std::string& member) const { return members_.count(member) != 0; }
  // The first member clockwise from the key's point for which `accept`
  // holds; nullopt when none does.
  template <typename Accept>
  std::optional<std::string> lookup(std::string_view key, Accept accept) const {
    if (ring_.empty()) return std::nullopt;
    auto it = ring_.lower_bound(hash(key));
    for (size_t visited = 0; visited < ring_.size(); ++visited, ++it) {
      if (it == ring_.end()) it = ring_.begin();
      if (accept(it->second)) return it->second;
    }
    return std::nullopt;
  }
  static uint64_t hash(std::string_view text);

 private:
  int virtual_nodes_;
  std::map<std::string, int> members_;
  std::multimap<uint64_t, std::string> ring_;
};

// The policies' state: the ring (members: every known replica, eligible or
// not, so a replica that is briefly ineligible moves no keys), the
// round-robin position and power-of-two's random draws.
class Router {
 public:
  explicit Router(uint64_t seed = std::random_device{}()) : random_(seed) {}

  // Ring membership follows the coordinator's replica table.
  void add_member(const std::string& id) { ring_.add(id); }
  void remove_member(const std::string& id) { ring_.remove(id); }

  // Index into `eligible` of the replica to use, or -1 when it is empty.
  // `routing_key` matters to kSession only.
  int pick(RoutingPolicy policy, const std::vector<RouteCandidate>& eligible,
           std::string_view routing_key);

 private:
  int pick_least_load(const std::vector<RouteCandidate>& eligible) const;
  int pick_power_of_two(const std::vector<RouteCandidate>& eligible);
  int pick_round_robin(const std::vector<RouteCandidate>& eligible);
  int pick_session(const std::vector<RouteCandidate>& eligible, std::string_view key);

  HashRing ring_;
  std::string last_round_robin_;
  std::mt19937_64 random_;
};

}  // namespace xq::serve
