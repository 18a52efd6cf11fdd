#include "launch/security_options.h"

#include <climits>

namespace xq {

void add_security_options(Arguments& args, SecurityRole role, const std::string& help_prefix,
                          const std::string& peer) {
  args.option("api-key", "",
              help_prefix + (role == SecurityRole::kServer
                                 ? "require 'authorization: Bearer KEY' on every call (and send "
                                   "it to " +
                                       peer + ")"
                                 : "API key, sent as 'authorization: Bearer KEY'"));
  if (role == SecurityRole::kServer) {
    args.option("tls-cert", "", help_prefix + "PEM certificate chain: serve TLS (with --tls-key)");
    args.option("tls-key", "", help_prefix + "PEM private key of --tls-cert");
  }
  args.option("tls-ca", "", help_prefix + "PEM roots to trust: call " + peer + " over TLS");
  args.option(
      "tls-server-name", "",
      help_prefix + "the name " + peer + "'s certificate carries, when not the host dialled");
}

serve::Security security_options(const Arguments& args, SecurityRole role, const char* tool) {
  serve::Security security;
  security.api_key = args.get("api-key");
  if (role == SecurityRole::kServer) {
    security.tls_cert = args.get("tls-cert");
    security.tls_key = args.get("tls-key");
    if (security.tls_cert.empty() != security.tls_key.empty())
      throw Error(std::string(tool) + ": --tls-cert and --tls-key go together");
  }
  security.tls_ca = args.get("tls-ca");
  security.tls_server_name = args.get("tls-server-name");
  return security;
}

void add_max_request_bytes_option(Arguments& args, const std::string& help_prefix) {
  args.option("max-request-bytes", "4MiB",
              help_prefix + "largest request message; a larger one gets RESOURCE_EXHAUSTED");
}

int max_request_bytes(const Arguments& args, const char* tool) {
  const size_t bytes = parse_byte_size(args.get("max-request-bytes"), "--max-request-bytes");
  if (bytes < 1024 || bytes > static_cast<size_t>(INT_MAX))
    throw Error(std::string(tool) + ": --max-request-bytes must be from 1KiB to 2GiB");
  return static_cast<int>(bytes);
}

}  // namespace xq
