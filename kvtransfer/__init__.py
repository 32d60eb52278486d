"""pdserve: kvtransfer (see the README; filled in by its own issue)."""
