#include "launch/arguments.h"

#include <algorithm>
#include <cctype>
#include <sstream>

#include "runtime/cache_mode.h"

namespace xq {

std::string default_model_path() {
  const char* dir = std::getenv("XQ_MODELS_DIR");
  return std::string(dir ? dir : "models") + "/SmolLM2-135M-Instruct.Q4_1.gguf";
}

void add_model_options(Arguments& args) {
  args.option("model", default_model_path(), "model file: GGUF or llama2.c checkpoint");
  args.option("tokenizer", "", "llama2.c tokenizer.bin (default: found beside the model)");
  args.option("threads", "2", "CPU threads");
  args.option("backend", "cpu",
              "'cpu' or 'cuda' (the whole forward pass resident on a CUDA device)");
  args.option("device", "0", "with --backend cuda: the CUDA device's index");
  args.option("cache", "fp16",
              "attention cache mode: " + cache_mode_names() + " ('xq modes' says what each keeps)");
  args.flag("keep-outlier-channel",
            "xquant on GQA models: keep channel 0 of X·Uk in fp16 (paper appendix B)");
  args.option("k-latent", "per-head",
              "xquant on GQA models: 'per-head' (one SVD per KV head) or 'joint' (one SVD of "
              "Wk, as the paper)");
  args.option("cl-restarts", "",
              "xquant-cl: layers where the delta chain starts over from X, comma-separated (a "
              "pipeline's stage boundaries, which its stages do themselves)");
}

std::vector<int32_t> cl_restarts(const Arguments& args) {
  std::vector<int32_t> layers;
  std::stringstream list(args.get("cl-restarts"));
  for (std::string item; std::getline(list, item, ',');) {
    char* end = nullptr;
    const long layer = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || layer < 0 || layer > std::numeric_limits<int32_t>::max())
      throw Error("--cl-restarts wants layer numbers separated by commas, got '" +
                  args.get("cl-restarts") + "'");
    layers.push_back(static_cast<int32_t>(layer));
  }
  return layers;
}

bool k_latent_per_head(const Arguments& args) {
  const std::string value = args.get("k-latent");
  if (value != "per-head" && value != "joint")
    throw Error("--k-latent must be 'per-head' or 'joint', got '" + value + "'");
  return value == "per-head";
}

EngineOptions engine_options(const Arguments& args, int threads, int32_t max_tokens) {
  EngineOptions options;
  options.threads = threads;
  options.max_tokens = max_tokens;
  options.cache_mode = args.get("cache");
  options.keep_outlier_channel = args.has("keep-outlier-channel");
  options.k_latent_per_head = k_latent_per_head(args);
  options.cross_layer_restarts = cl_restarts(args);
  return options;
}

BackendChoice backend_choice(const Arguments& args) {
  BackendChoice choice;
  choice.backend = parse_backend(args.get("backend"));
  choice.device = static_cast<int>(args.get_int("device", 0, 4095));
  check_backend(choice);
  return choice;
}

size_t parse_byte_size(const std::string& text, const std::string& what) {
  auto bad = [&] {
    return Error(what + " wants a size such as 512MiB, 2GiB, 64MB or a byte count, got '" + text +
                 "'");
  };
  size_t digits = 0;
  while (digits < text.size() &&
         (std::isdigit(static_cast<unsigned char>(text[digits])) || text[digits] == '.'))
    ++digits;
  if (digits == 0) throw bad();
  const std::string number = text.substr(0, digits);
  if (std::count(number.begin(), number.end(), '.') > 1 || number.front() == '.' ||
      number.back() == '.')
    throw bad();
  std::string unit = text.substr(digits);
  std::transform(unit.begin(), unit.end(), unit.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  static const std::map<std::string, double> kUnits = {{"", 1},
                                                       {"b", 1},
                                                       {"kib", 1024.0},
                                                       {"mib", 1048576.0},
                                                       {"gib", 1073741824.0},
                                                       {"tib", 1099511627776.0},
                                                       {"kb", 1e3},
                                                       {"mb", 1e6},
                                                       {"gb", 1e9},
                                                       {"tb", 1e12}};
  auto it = kUnits.find(unit);
  if (it == kUnits.end()) throw bad();
  // Integers exactly (a double loses bytes above 2^53); fractions through double.
  if (number.find('.') == std::string::npos) {
    errno = 0;
    const unsigned long long count = std::strtoull(number.c_str(), nullptr, 10);
    const auto scale = static_cast<unsigned long long>(it->second);
    if (errno != 0 || (scale != 0 && count > std::numeric_limits<size_t>::max() / scale))
      throw Error(what + ": " + text + " does not fit in " +
                  std::to_string(std::numeric_limits<size_t>::digits) + " bits");
    return static_cast<size_t>(count * scale);
  }
  const double bytes = std::strtod(number.c_str(), nullptr) * it->second;
  if (bytes != std::floor(bytes))
    throw Error(what + ": " + text + " is not a whole number of bytes");
  if (bytes >= static_cast<double>(std::numeric_limits<size_t>::max()))
    throw Error(what + ": " + text + " does not fit in " +
                std::to_string(std::numeric_limits<size_t>::digits) + " bits");
  return static_cast<size_t>(bytes);
}

}  // namespace xq
