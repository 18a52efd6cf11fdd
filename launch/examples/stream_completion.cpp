// Streams one completion from an xquant server and prints it as it arrives.
//
//   xq_client_example --address 127.0.0.1:50051 --prompt "Once upon a time"
//                     --max-tokens 32 [--api-key KEY]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "launch/serve/client.h"

int main(int argc, char** argv) {
  std::string address = "127.0.0.1:50051", prompt = "Once upon a time", api_key;
  int max_tokens = 32;
  for (int i = 1; i < argc; ++i) {
    const bool has_value = i + 1 < argc;
    if (std::strcmp(argv[i], "--address") == 0 && has_value) {
      address = argv[++i];
    } else if (std::strcmp(argv[i], "--prompt") == 0 && has_value) {
      prompt = argv[++i];
    } else if (std::strcmp(argv[i], "--max-tokens") == 0 && has_value) {
      max_tokens = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--api-key") == 0 && has_value) {
      api_key = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: %s [--address HOST:PORT] [--prompt TEXT] [--max-tokens N] "
                   "[--api-key KEY]\n",
                   argv[0]);
      return 2;
    }
  }

  xq::serve::Security security;
  security.api_key = api_key;
  xq::serve::Client client(address, security);

  xquant::v1::GenerateRequest request;
  request.set_text(prompt);
  request.mutable_sampling()->set_max_tokens(max_tokens);  // temperature 0: greedy
  xq::serve::CallOptions options;
  options.timeout = std::chrono::minutes(5);

  const xq::serve::GenerateResult result =
      client.generate(request, options, [](const xquant::v1::Delta& delta) {
        std::fwrite(delta.text().data(), 1, delta.text().size(), stdout);
        std::fflush(stdout);
        return true;  // keep going; false would cancel the call
      });
  if (result.finished) std::fputs(result.finished->text().c_str(), stdout);
  std::fputc('\n', stdout);

  if (!result.status.ok()) {  // refused, unreachable, timed out
    std::fprintf(stderr, "failed: %s: %s\n",
                 xq::serve::status_code_name(result.status.error_code()),
                 result.status.error_message().c_str());
    return 1;
  }
  if (result.error) {  // failed after the server accepted it
    std::fprintf(stderr, "error: %s%s\n", result.error->message().c_str(),
                 result.error->retryable() ? " (retryable)" : "");
    return 1;
  }
  std::fprintf(stderr, "%d tokens, first after %.3f s, all after %.3f s\n",
               result.finished->usage().completion_tokens(), result.first_token_seconds,
               result.total_seconds);
  return 0;
}
