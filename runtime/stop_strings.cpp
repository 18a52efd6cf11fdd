#include "runtime/stop_strings.h"

#include <algorithm>
#include <utility>

namespace xq {

StopStringFilter::StopStringFilter(std::vector<std::string> stops) {
  for (std::string& stop : stops)
    if (!stop.empty()) stops_.push_back(std::move(stop));
}

std::string StopStringFilter::push(const std::string& piece) {
  if (stopped_) return "";
  held_ += piece;
  // Everything before held_ was released because no stop string could begin
  // there, so the earliest match lies within held_.
  size_t hit = std::string::npos;
  for (const std::string& stop : stops_) hit = std::min(hit, held_.find(stop));
  if (hit != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, hit);
    held_.clear();
    return out;
  }
  // Hold back the longest tail that could still grow into a stop string.
  size_t hold = 0;
  for (const std::string& stop : stops_) {
    for (size_t k = std::min(stop.size() - 1, held_.size()); k > hold; --k)
      if (held_.compare(held_.size() - k, k, stop, 0, k) == 0) {
        hold = k;
        break;
      }
  }
  std::string out = held_.substr(0, held_.size() - hold);
  held_.erase(0, held_.size() - hold);
  return out;
}

std::string StopStringFilter::finish() {
  std::string out = stopped_ ? "" : std::move(held_);
  held_.clear();
  return out;
}

}  // namespace xq
