"""pdserve bench: TTFT/TPOT/ITL/E2E, throughput and goodput of a `pdserve serve` cluster under a reproducible load.

Modules: workload (requests), arrivals (send times), client (gRPC client, launched servers), stats (metrics),
report (tables, results.json, plots), cli (`pdserve bench`, registered through the `pdserve.commands` entry point).
"""
