"""prefill_worker: batched/chunked prefill, first token sampled here, KV shipped to a decode worker.

`engine.PrefillEngine` (schedule -> execute -> update on its own thread), `worker.PrefillWorker` (a process of its
own; the router hosts it as a Ray actor), pure `scheduler`, page bookkeeping `pages`, shared `messages`."""
