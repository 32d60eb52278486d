"""pdserve: decode_worker (see the README; filled in by its own issue)."""
