#include "runtime/step_plan.h"

#include <string>

#include "kernels/error.h"

namespace xq {

StepPlan::StepPlan(const StepPlan& other)
    : released(other.released), segments(other.segments), tokens(other.tokens) {
  repoint();
}

StepPlan& StepPlan::operator=(const StepPlan& other) {
  if (this == &other) return *this;
  released = other.released;
  segments = other.segments;
  tokens = other.tokens;
  repoint();
  return *this;
}

void StepPlan::add(int32_t seq, int32_t pos0, const int32_t* t, int32_t n, bool wants_logits) {
  tokens.insert(tokens.end(), t, t + n);
  segments.push_back({seq, pos0, nullptr, n, wants_logits});
  // tokens may have moved: every segment's pointer is rebuilt.
  repoint();
}

void StepPlan::repoint() {
  size_t offset = 0;
  for (Segment& s : segments) {
    s.tokens = tokens.data() + offset;
    offset += static_cast<size_t>(s.n);
  }
}

int32_t StepPlan::logit_rows() const {
  int32_t rows = 0;
  for (const Segment& s : segments) rows += s.wants_logits ? 1 : 0;
  return rows;
}

std::vector<int32_t> StepPlan::serialize() const {
  std::vector<int32_t> flat;
  flat.reserve(2 + released.size() + 4 * segments.size() + tokens.size());
  flat.push_back(static_cast<int32_t>(released.size()));
  flat.insert(flat.end(), released.begin(), released.end());
  flat.push_back(static_cast<int32_t>(segments.size()));
  for (const Segment& s : segments) {
    flat.push_back(s.seq);
    flat.push_back(s.pos0);
    flat.push_back(s.n);
    flat.push_back(s.wants_logits ? 1 : 0);
  }
  flat.insert(flat.end(), tokens.begin(), tokens.end());
  return flat;
}

StepPlan StepPlan::deserialize(const int32_t* flat, size_t size) {
  auto bad = [size](const std::string& what) {
    return Error("step plan: " + what + " (" + std::to_string(size) + " integers)");
  };
  size_t at = 0;
  auto next = [&](const char* what) {
    if (at >= size) throw bad(std::string("ends before ") + what);
    return flat[at++];
  };
  StepPlan plan;
  const int32_t n_released = next("the released count");
  if (n_released < 0 || static_cast<size_t>(n_released) > size - at)
    throw bad("released count " + std::to_string(n_released) + " does not fit");
  plan.released.assign(flat + at, flat + at + n_released);
  at += static_cast<size_t>(n_released);
  const int32_t n_segments = next("the segment count");
  if (n_segments < 0 || static_cast<size_t>(n_segments) > (size - at) / 4)
    throw bad("segment count " + std::to_string(n_segments) + " does not fit");
  size_t total = 0;
  for (int32_t i = 0; i < n_segments; ++i) {
    Segment s;
    s.seq = flat[at++];
    s.pos0 = flat[at++];
    s.n = flat[at++];
    const int32_t wants = flat[at++];
    if (s.n < 0 || s.pos0 < 0 || (wants != 0 && wants != 1))
      throw bad("segment " + std::to_string(i) + " has a negative size or position");
    s.wants_logits = wants == 1;
    total += static_cast<size_t>(s.n);
    plan.segments.push_back(s);
  }
  if (total != size - at)
    throw bad("segments hold " + std::to_string(total) + " tokens but " +
              std::to_string(size - at) + " follow");
  plan.tokens.assign(flat + at, flat + size);
  plan.repoint();
  return plan;
}

void LocalExecutor::execute(const StepPlan& plan, float* logits) {
  for (int32_t seq : plan.released) engine_.release(seq);
  if (!plan.segments.empty()) engine_.forward_batch(plan.segments, logits);
}

}  // namespace xq
