// The standard gRPC services every xquant server carries: grpc.health.v1
// (gRPC's built-in implementation) and, when asked for, server reflection.
#pragma once

namespace xq::serve {

// Call before building a server. With `reflection`, reflection also
// describes grpc.health.v1 (its descriptor is linked in here), so grpcurl
// can call Health/Check as well as the xquant.v1 services without .proto
// files.
void enable_standard_services(bool reflection);

}  // namespace xq::serve
