#!/usr/bin/env bash
# Generates the Python gRPC stubs of the switchyard API into OUT_DIR:
#   OUT_DIR/switchyard/v1/switchyard_pb2.py, switchyard_pb2_grpc.py   (import switchyard.v1...)
#   OUT_DIR/health_pb2.py, health_pb2_grpc.py                         (grpc.health.v1, top level
#                                                                      so as not to shadow grpc)
# Needs protoc and grpc_python_plugin (Debian: protobuf-compiler, protobuf-compiler-grpc) and, to
# use the stubs, python3-grpcio and python3-protobuf.
# Usage: launch/examples/gen_python_stubs.sh OUT_DIR
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:?usage: gen_python_stubs.sh OUT_DIR}
plugin=${GRPC_PYTHON_PLUGIN:-$(command -v grpc_python_plugin || echo /usr/bin/grpc_python_plugin)}
mkdir -p "$out"
protoc --python_out="$out" --grpc_out="$out" --plugin=protoc-gen-grpc="$plugin" \
  -I "$root/proto" "$root/proto/switchyard/v1/switchyard.proto"
protoc --python_out="$out" --grpc_out="$out" --plugin=protoc-gen-grpc="$plugin" \
  -I "$root/proto/grpc/health/v1" "$root/proto/grpc/health/v1/health.proto"
echo "stubs in $out (add it to PYTHONPATH)"
