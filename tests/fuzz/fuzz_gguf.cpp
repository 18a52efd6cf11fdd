// libFuzzer target: GgufFile::parse on arbitrary bytes, then everything a
// loader would do with a file that parses. The reader promises that a corrupt
// file is an xq::Error and never a read outside the image; AddressSanitizer
// checks the second half of that promise on every tensor byte and metadata
// value, and any other exception escapes to libFuzzer as a crash.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "runtime/gguf.h"
#include "runtime/tokenizer.h"

namespace {

// Reads feed this so the compiler cannot drop them.
volatile uint64_t g_sink = 0;

void touch(const void* data, size_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint64_t sum = 0;
  for (size_t i = 0; i < bytes; ++i) sum += p[i];
  g_sink = g_sink + sum;
}

void touch(const std::string& s) {
  touch(s.data(), s.size());
}

// Every typed getter on every key: each must return a value or throw
// xq::Error for the wrong type, whatever the stored type is.
void read_with_every_getter(const xq::GgufFile& file, const std::string& key) {
  const auto attempt = [](const auto& get) {
    try {
      get();
    } catch (const xq::Error&) {
    }
  };
  attempt([&] { g_sink = g_sink + file.get_int(key).value_or(0); });
  attempt([&] { g_sink = g_sink + static_cast<uint64_t>(file.get_float(key).value_or(0) != 0); });
  attempt([&] { g_sink = g_sink + file.get_bool(key).value_or(false); });
  attempt([&] { touch(file.get_string(key).value_or("")); });
  attempt([&] {
    if (const auto* strings = file.get_string_array(key)) {
      for (const std::string& s : *strings) touch(s);
    }
  });
  attempt([&] {
    if (const auto* ints = file.get_int_array(key)) touch(ints->data(), ints->size() * 8);
  });
  attempt([&] {
    if (const auto* floats = file.get_float_array(key)) touch(floats->data(), floats->size() * 8);
  });
}

void exercise(const xq::GgufFile& file) {
  for (const auto& [key, value] : file.metadata()) {
    touch(key);
    touch(value.string_value);
    for (const std::string& s : value.string_array) touch(s);
    touch(value.int_array.data(), value.int_array.size() * sizeof(int64_t));
    touch(value.float_array.data(), value.float_array.size() * sizeof(double));
    if (file.find(key) == nullptr) __builtin_trap();  // every listed key must be found
    read_with_every_getter(file, key);
  }
  for (const xq::GgufTensor& tensor : file.tensors()) {
    if (file.find_tensor(tensor.name) != &tensor) __builtin_trap();
    // The parser bounds-checked `bytes` against the image; reading all of it
    // must stay inside the buffer libFuzzer allocated for exactly this input.
    touch(tensor.data, tensor.bytes);
    g_sink = g_sink + static_cast<uint64_t>(tensor.elements());
  }

  // A file with tokenizer metadata goes on to the tokenizer, as the model loader does.
  std::unique_ptr<xq::Tokenizer> tokenizer;
  try {
    tokenizer = std::make_unique<xq::Tokenizer>(xq::vocabulary_from_gguf(file));
  } catch (const xq::Error&) {
    return;
  }
  // A vocabulary the constructor accepted must tokenize anything: encode() is
  // documented never to throw, and its ids are in the vocabulary, so decode()
  // must not throw either. Neither is inside the try above, so an exception
  // here reaches libFuzzer as a crash.
  const std::string sample = "Hello, world! 123 \xE2\x96\x81x <s>\n\xFF";
  for (bool parse_special : {false, true}) {
    const std::vector<int32_t> ids = tokenizer->encode(sample, true, parse_special);
    touch(tokenizer->decode(ids));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<xq::GgufFile> file;
  try {
    file = xq::GgufFile::parse(data, size, "fuzz.gguf");
  } catch (const xq::Error&) {
    return 0;
  }
  exercise(*file);
  return 0;
}
