"""prefill_worker: batched/chunked prefill, the first token sampled here, KV shipped to a decode worker with that
token in its header. `engine.PrefillEngine` (schedule -> execute -> update on its own thread) and
`worker.PrefillWorker` (a process of its own; the router hosts it as a Ray actor). Built on `engine/`."""
