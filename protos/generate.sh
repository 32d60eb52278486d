#!/usr/bin/env bash
# Regenerates the *_pb2.py / *_pb2_grpc.py modules from the .proto files (never edit those by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
for name in kvtransfer generate stage; do
  python -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos "protos/$name.proto"
  # grpc_tools emits a top-level "import X_pb2"; make it package-relative.
  sed -i "s/^import ${name}_pb2 as /from protos import ${name}_pb2 as /" "protos/${name}_pb2_grpc.py"
done
