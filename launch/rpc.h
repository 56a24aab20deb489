// gRPC helpers shared by the client and the load generator (`client`, `bench serve`).
#pragma once

#include <string>

#include <grpcpp/grpcpp.h>

namespace sy::launch {

// The canonical name of a status code, e.g. "RESOURCE_EXHAUSTED".
const char* status_code_name(grpc::StatusCode code);

// Sets the deadline of `context` to `seconds` from now.
void set_timeout(grpc::ClientContext& context, double seconds);

}  // namespace sy::launch
