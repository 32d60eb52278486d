"""gRPC definitions: kvtransfer.proto and its generated modules (regenerate with protos/generate.sh)."""
