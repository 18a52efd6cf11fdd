// Command-line options shared by the xq subcommands: the Arguments parser,
// the model and cache options every command that loads a model takes, and
// the byte-size parser for memory budgets (--cache-memory).
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "launch/engine_factory.h"
#include "runtime/engine.h"

namespace xq {

// Parses "--name value" and "--flag" arguments against a declared set.
class Arguments {
 public:
  Arguments(std::string command, std::string summary)
      : command_(std::move(command)), summary_(std::move(summary)) {}

  void option(const std::string& name, const std::string& fallback, const std::string& help) {
    values_[name] = fallback;
    order_.push_back({name, help, false});
  }
  void flag(const std::string& name, const std::string& help) {
    values_[name] = "";
    order_.push_back({name, help, true});
  }

  // Returns false when --help was asked for (usage already printed).
  bool parse(int argc, char** argv) {
    for (int i = 0; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg == "--help" || arg == "-h") {
        print_usage();
        return false;
      }
      if (arg.rfind("--", 0) != 0)
        throw Error(command_ + ": unexpected argument '" + arg + "' (see --help)");
      std::string name = arg.substr(2);
      auto it = values_.find(name);
      if (it == values_.end())
        throw Error(command_ + ": unknown option '" + arg + "' (see --help)");
      if (is_flag(name)) {
        it->second = "1";
      } else {
        if (i + 1 >= argc) throw Error(command_ + ": option '" + arg + "' needs a value");
        it->second = argv[++i];
      }
    }
    return true;
  }

  std::string get(const std::string& name) const { return values_.at(name); }
  bool has(const std::string& name) const { return !values_.at(name).empty(); }
  // The default bounds are int32's: callers store most values in int32_t, and
  // a value that wrapped on the way there would be silently wrong.
  int64_t get_int(const std::string& name, int64_t min = std::numeric_limits<int32_t>::min(),
                  int64_t max = std::numeric_limits<int32_t>::max()) const {
    const std::string& v = values_.at(name);
    char* end = nullptr;
    errno = 0;
    long long parsed = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || errno != 0 || parsed < min || parsed > max)
      throw Error(command_ + ": --" + name + " wants an integer from " + std::to_string(min) +
                  " to " + std::to_string(max) + ", got '" + v + "'");
    return parsed;
  }
  double get_float(const std::string& name) const {
    const std::string& v = values_.at(name);
    char* end = nullptr;
    double parsed = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || !std::isfinite(parsed))
      throw Error(command_ + ": --" + name + " wants a number, got '" + v + "'");
    return parsed;
  }

 private:
  struct Entry {
    std::string name, help;
    bool is_flag;
  };
  bool is_flag(const std::string& name) const {
    for (const Entry& e : order_)
      if (e.name == name) return e.is_flag;
    return false;
  }
  void print_usage() const {
    std::printf("usage: xq %s [options]\n\n%s\n\noptions:\n", command_.c_str(), summary_.c_str());
    for (const Entry& e : order_) {
      std::string left = "--" + e.name + (e.is_flag ? "" : " V");
      std::string fallback = values_.at(e.name);
      std::printf(
          "  %-22s %s%s\n", left.c_str(), e.help.c_str(),
          (!e.is_flag && !fallback.empty()) ? (" (default: " + fallback + ")").c_str() : "");
    }
  }

  std::string command_, summary_;
  std::map<std::string, std::string> values_;
  std::vector<Entry> order_;
};

// models/SmolLM2-135M-Instruct.Q4_1.gguf, or the same file in $XQ_MODELS_DIR.
std::string default_model_path();

// More threads than this is a typo, and the thread pool would fail to create them.
inline constexpr int64_t kMaxThreads = 1024;

// --model, --tokenizer, --threads, --backend, --device, --cache and the
// xquant layout options.
void add_model_options(Arguments& args);
std::vector<int32_t> cl_restarts(const Arguments& args);
bool k_latent_per_head(const Arguments& args);
// The engine as the model options (add_model_options) ask for it.
EngineOptions engine_options(const Arguments& args, int threads, int32_t max_tokens);
// --backend and --device, checked against this build and machine
// (check_backend): a tool calls it before loading the model.
BackendChoice backend_choice(const Arguments& args);

// Bytes from a size with an optional unit: "1048576", "512KiB", "512MiB",
// "2GiB", "64MB", "1.5GB" (KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB
// of 1000; B or no unit: bytes; units are case-insensitive). Throws xq::Error
// naming `what` for anything else, a negative or fractional byte count, or
// a size that does not fit in size_t.
size_t parse_byte_size(const std::string& text, const std::string& what);

}  // namespace xq
