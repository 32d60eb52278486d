#!/usr/bin/env bash
# Regenerates kvtransfer_pb2.py / kvtransfer_pb2_grpc.py from kvtransfer.proto (never edit those by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos protos/kvtransfer.proto
# grpc_tools emits a top-level "import kvtransfer_pb2"; make it package-relative.
sed -i 's/^import kvtransfer_pb2 as /from protos import kvtransfer_pb2 as /' protos/kvtransfer_pb2_grpc.py
