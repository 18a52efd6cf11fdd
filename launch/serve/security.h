// What every xquant server and client shares about who may talk to whom:
// listen addresses (loopback unless told otherwise), the API key (a Bearer
// token in the "authorization" metadata, as vLLM's --api-key), and TLS from
// certificate files.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

namespace xq::serve {

struct Security {
  // Empty: no key is asked for.
  std::string api_key;
  // PEM files. Server: cert + key turn TLS on. Client: ca (the roots to
  // trust) turns TLS on; cert + key then also present a client certificate.
  std::string tls_cert, tls_key, tls_ca;
  // Client side: the name the server's certificate must carry, when it is
  // not the host dialled (e.g. "localhost" for 127.0.0.1).
  std::string tls_server_name;
};

// Insecure credentials without tls_cert/tls_key; TLS from the files with
// them. Throws xq::Error naming a file that cannot be read.
std::shared_ptr<grpc::ServerCredentials> server_credentials(const Security& security);
// Insecure without tls_ca; TLS trusting tls_ca with it.
std::shared_ptr<grpc::ChannelCredentials> channel_credentials(const Security& security);
// A channel to `address` with the credentials above, message limits of
// `max_message_bytes` (0: gRPC's defaults) and reconnect attempts at most a
// second apart (a server restarted at the address is seen within a second).
std::shared_ptr<grpc::Channel> make_channel(const std::string& address, const Security& security,
                                            int max_message_bytes = 0);

// True for 127.0.0.0/8, [::1], localhost and unix sockets.
bool is_loopback_address(const std::string& host_port);
// Prints a warning to stderr when `listen` is reachable from other hosts.
void warn_unless_loopback(const std::string& listen, const char* server);

// OK when no key is configured or the request carries "authorization:
// Bearer <key>"; UNAUTHENTICATED otherwise (the comparison takes the same
// time wherever the strings differ).
grpc::Status check_api_key(const grpc::ServerContext& context, const std::string& api_key);
// Adds the Bearer header when `api_key` is not empty.
void add_api_key(grpc::ClientContext& context, const std::string& api_key);

// The whole file; throws xq::Error naming `what` when it cannot be read.
std::string read_text_file(const std::string& path, const std::string& what);

}  // namespace xq::serve
