"""The `pdserve` command's table: every subcommand, from the package that owns it, in one list an editor can
follow. This is the top of the import graph (it may import every package; none imports it). Parsing, process
setup and the one-line user errors are `llama_relax.cli.run_command`'s."""

from __future__ import annotations

from bench.cli import commands as bench_commands
from deploy.cli import commands as deploy_commands
from kvtransfer.cli import commands as kvtransfer_commands
from llama_relax.cli import Command, build_parser, run_command
from llama_relax.cli import commands as model_commands
from llama_relax.process import use_all_cores
from router.cli import commands as router_commands


def commands() -> list[Command]:
    """Every subcommand; `router`'s `generate` (local, or remote with --addr) replaces the model-only one."""
    table = {c[0]: c for c in model_commands()}
    for group in (kvtransfer_commands(), router_commands(), deploy_commands(), bench_commands()):
        table.update({c[0]: c for c in group})
    return list(table.values())


def main(argv: list[str] | None = None) -> int:
    use_all_cores()
    return run_command(build_parser(commands()).parse_args(argv))
