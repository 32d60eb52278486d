"""decode_worker: continuous-batching decode over KV imported from prefill workers or prefilled here.
`engine.DecodeEngine` (schedule -> execute -> update on its own thread) and `worker.DecodeWorker` /
`worker.ColocatedWorker` (processes of their own; Ray actors under the router). Built on `engine/`."""
