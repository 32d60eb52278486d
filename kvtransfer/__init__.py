"""kvtransfer: moving a sequence's KV pages from a prefill worker's paged KV cache into a decode worker's.

`payload` (typed msgpack header with opaque application `meta`, raw K/V bytes cut into XXH3-64-checked chunks),
`transport` (transport-neutral sender/receiver roles), `grpc_transport` (host memory, any two processes),
`nccl_transport` + `nccl_backend` (GPU to GPU, gRPC control plane), `runtime_io` (export from and import into a
`llama_relax` runtime, any sequence, partial ranges, transport choice), `net` (host:port and gRPC limits shared by
every gRPC end). Knows nothing of requests or routing."""
