"""The `pdserve` command: the one table of every subcommand (`pdserve.cli`)."""
