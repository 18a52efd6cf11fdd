#include "launch/serve/security.h"

#include <arpa/inet.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "kernels/error.h"

namespace xq::serve {

std::string read_text_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(what + ": cannot read '" + path + "'");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

std::shared_ptr<grpc::ServerCredentials> server_credentials(const Security& security) {
  if (security.tls_cert.empty() && security.tls_key.empty())
    return grpc::InsecureServerCredentials();
  if (security.tls_cert.empty() || security.tls_key.empty())
    throw Error("TLS needs both --tls-cert and --tls-key");
  grpc::SslServerCredentialsOptions options;
  options.pem_key_cert_pairs.push_back({read_text_file(security.tls_key, "--tls-key"),
                                        read_text_file(security.tls_cert, "--tls-cert")});
  return grpc::SslServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> channel_credentials(const Security& security) {
  if (security.tls_ca.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = read_text_file(security.tls_ca, "--tls-ca");
  if (!security.tls_cert.empty() && !security.tls_key.empty()) {
    options.pem_cert_chain = read_text_file(security.tls_cert, "--tls-cert");
    options.pem_private_key = read_text_file(security.tls_key, "--tls-key");
  }
  return grpc::SslCredentials(options);
}

std::shared_ptr<grpc::Channel> make_channel(const std::string& address, const Security& security,
                                            int max_message_bytes) {
  grpc::ChannelArguments arguments;
  if (max_message_bytes > 0) {
    arguments.SetMaxReceiveMessageSize(max_message_bytes);
    arguments.SetMaxSendMessageSize(max_message_bytes);
  }
  if (!security.tls_server_name.empty())
    arguments.SetSslTargetNameOverride(security.tls_server_name);
  // gRPC's reconnect backoff grows to two minutes, and a channel in backoff
  // fails calls at once: a replica restarted at the same address, or a
  // server a client waits for, must be reachable within a second of
  // listening again.
  arguments.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  arguments.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  arguments.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return grpc::CreateCustomChannel(address, channel_credentials(security), arguments);
}

bool is_loopback_address(const std::string& host_port) {
  if (host_port.rfind("unix:", 0) == 0) return true;
  std::string host = host_port;
  if (!host.empty() && host[0] == '[') {
    const size_t close = host.find(']');
    host = host.substr(1, close == std::string::npos ? std::string::npos : close - 1);
  } else if (const size_t colon = host.rfind(':');
             colon != std::string::npos && host.find(':') == colon) {
    host = host.substr(0, colon);
  }
  if (host == "localhost") return true;
  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) return IN6_IS_ADDR_LOOPBACK(&v6);
  return false;
}

void warn_unless_loopback(const std::string& listen, const char* server) {
  if (is_loopback_address(listen)) return;
  std::fprintf(stderr,
               "warning: %s listens on %s, reachable from other hosts; use --api-key and TLS "
               "(--tls-cert, --tls-key) unless the network is trusted\n",
               server, listen.c_str());
}

grpc::Status check_api_key(const grpc::ServerContext& context, const std::string& api_key) {
  if (api_key.empty()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  const auto found = metadata.find("authorization");
  if (found == metadata.end())
    return {grpc::StatusCode::UNAUTHENTICATED,
            "this server needs an API key: send metadata 'authorization: Bearer <key>'"};
  const std::string given(found->second.data(), found->second.size());
  const std::string expected = "Bearer " + api_key;
  // Constant time over the expected length, so the time taken does not tell
  // how much of a guess was right.
  unsigned char differ = given.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i)
    differ |= static_cast<unsigned char>(expected[i] ^ (i < given.size() ? given[i] : 0));
  if (differ != 0) return {grpc::StatusCode::UNAUTHENTICATED, "wrong API key"};
  return grpc::Status::OK;
}

void add_api_key(grpc::ClientContext& context, const std::string& api_key) {
  if (!api_key.empty()) context.AddMetadata("authorization", "Bearer " + api_key);
}

}  // namespace xq::serve
