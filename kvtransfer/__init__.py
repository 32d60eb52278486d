"""kvtransfer: moving a sequence's KV pages from a prefill worker's paged KV cache into a decode worker's.

`payload` (typed header + raw bytes, msgpack, per-chunk CRC32), `transport` (sender/receiver roles),
`grpc_transport` (any two processes), `nccl_transport` (GPU to GPU; skeleton), `runtime_io` (export from and
import into a `llama_relax` runtime, any sequence, partial ranges). Knows nothing of requests or routing."""
