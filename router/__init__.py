"""router: the only package that knows the cluster. Ray actor pools and placement (`pools`, `cluster`), the request
state machine (`router`), the gRPC frontend with health and reflection (`server`), protobuf conversion and input
validation (`convert`), Prometheus metrics (`metrics`), and the `serve` / `generate --addr` commands (`cli`)."""
