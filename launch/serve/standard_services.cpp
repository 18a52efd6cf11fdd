#include "launch/serve/standard_services.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "grpc/health/v1/health.pb.h"

namespace xq::serve {

void enable_standard_services(bool reflection) {
  grpc::EnableDefaultHealthCheckService(true);
  if (!reflection) return;
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  // Reflection finds files in the generated pool, which holds a file only
  // when its code is linked; this reference keeps health.proto's.
  (void)::grpc::health::v1::HealthCheckRequest::descriptor();
}

}  // namespace xq::serve
