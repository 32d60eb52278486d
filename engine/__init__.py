"""engine: what every worker shares, whatever its role.

`messages` (requests, errors, admission, worker options/info/load, roles), `pages` (page accounting),
`scheduler` (pure: the one admission policy, prefill packing, decode batches and eviction), `loop` (the engine
thread and per-request output streams), `prefill_batch` / `decode_batch` (the two halves of an engine over one
runtime), `kvmeta` (the first token carried in a KV header), `hosting` (running an engine in a worker process),
`protocols` (the typed calls the router makes on each role). Imports `llama_relax` and `kvtransfer`, never a
worker package or the router."""
