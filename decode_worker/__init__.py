"""decode_worker: continuous-batching decode over imported KV, and the colocated engine (the baseline).

`engine.DecodeEngine`, `colocated.ColocatedEngine`, `worker.DecodeWorker` / `worker.ColocatedWorker` (processes of
their own; Ray actors under the router), pure `scheduler`, `decode_batch.DecodeBatch` (shared decode step)."""
