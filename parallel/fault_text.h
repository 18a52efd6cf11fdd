// The words of a communication fault, shared by every communicator so that a
// lost rank reads the same whether the group talks over MPI (host buffers)
// or NCCL (device buffers):
//
//   rank 0 (world rank 0): all_reduce_sum on group "tp0" timed out after 10 s
//   waiting for rank 1 (world rank 1); lost rank 1 (world rank 1)
//
// Scripts and tests look for "lost rank R (world rank W)" and the operation's
// name; the pieces below are the only place those texts are spelled.
#pragma once

#include <cstdio>
#include <string>

namespace xq::parallel::fault_text {

// "rank 2 (world rank 5)": a member of a group, by group and world rank.
inline std::string member(int group_rank, int world_rank) {
  return "rank " + std::to_string(group_rank) + " (world rank " + std::to_string(world_rank) + ")";
}

// "world rank 5 (another group)": a rank found through a shared fault channel
// that is not a member of the group that failed.
inline std::string outside_member(int world_rank) {
  return "world rank " + std::to_string(world_rank) + " (another group)";
}

// `rank 0 (world rank 0): all_reduce_sum on group "tp0"`: who does what where.
inline std::string operation(const std::string& me, const std::string& op,
                             const std::string& group) {
  return me + ": " + op + " on group \"" + group + "\"";
}

// "10 s", "0.3 s": seconds as %g.
inline std::string seconds(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%g s", value);
  return text;
}

// "<operation> timed out after 10 s waiting for <awaited>".
inline std::string timed_out(const std::string& operation, double timeout_seconds,
                             const std::string& awaited) {
  return operation + " timed out after " + seconds(timeout_seconds) + " waiting for " + awaited;
}

// "; lost <who>": ends the message of a fault whose culprit is known.
inline std::string lost(const std::string& who) {
  return "; lost " + who;
}

// Ends the message of a fault where every member answered someone.
inline std::string none_lost() {
  return "; no member is lost: they wait on each other (members called different operations?)";
}

// The message of a fault a communicator saw without knowing whom it waited
// for (NCCL), once the culprit is known (found over MPI): `happened` is
// "timed out after 10 s" or "failed: <reason>", `culprit` member() or
// outside_member() of the lost rank ("" when every member answered), `note`
// ends the message. When the culprit is known this is the MPI
// communicator's timeout message word for word, plus the note.
inline std::string identified(const std::string& operation, const std::string& happened,
                              const std::string& culprit, const std::string& note) {
  if (culprit.empty()) return operation + " " + happened + none_lost() + note;
  return operation + " " + happened + " waiting for " + culprit + lost(culprit) + note;
}

}  // namespace xq::parallel::fault_text
