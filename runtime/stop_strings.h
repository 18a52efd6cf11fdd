// Stop strings over streamed text: text is released as soon as no stop
// string can begin in it, and ends where the first stop string begins (the
// stop string itself is never released). The same rule the scheduler applies
// to a request's `stop` list, for tools that generate outside it.
#pragma once

#include <string>
#include <vector>

namespace xq {

class StopStringFilter {
 public:
  // Empty stop strings are ignored (one would match before any text).
  explicit StopStringFilter(std::vector<std::string> stops);

  // Adds a piece of generated text; returns the text that is now final.
  // After a stop string appeared, returns the text before it and then "".
  std::string push(const std::string& piece);
  // Text held back because it could have begun a stop string; "" after a stop.
  std::string finish();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;  // text not yet released
  bool stopped_ = false;
};

}  // namespace xq
