// The security and size options every xquant server and client command
// takes, declared and read in one place so that they mean the same
// everywhere: --api-key, TLS from certificate files, --max-request-bytes.
#pragma once

#include <string>

#include "launch/arguments.h"
#include "launch/serve/security.h"

namespace xq {

enum class SecurityRole {
  kServer,  // serves (cert + key) and calls a peer (ca + server name)
  kClient,  // only calls (ca + server name)
};

// `help_prefix` starts each help line (e.g. "--serve: "); `peer` names whom
// the command calls ("the coordinator", "replicas", "the server").
void add_security_options(Arguments& args, SecurityRole role, const std::string& help_prefix,
                          const std::string& peer);
// Throws xq::Error naming `tool` for a certificate without its key.
serve::Security security_options(const Arguments& args, SecurityRole role, const char* tool);

// --max-request-bytes (servers): a byte size from 1 KiB to 2 GiB.
void add_max_request_bytes_option(Arguments& args, const std::string& help_prefix);
int max_request_bytes(const Arguments& args, const char* tool);

}  // namespace xq
