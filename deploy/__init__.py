"""pdserve: deploy (see the README; filled in by its own issue)."""
