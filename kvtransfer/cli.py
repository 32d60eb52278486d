"""kvtransfer's `pdserve` subcommands (registered through the `pdserve.commands` entry point)."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from kvtransfer.bench_kv import run_bench_kv

    return run_bench_kv(args)


def _args(p: argparse.ArgumentParser) -> None:
    from kvtransfer.bench_kv import add_args

    add_args(p)


def commands() -> list:
    return [("bench-kv", "KV transfer between two processes over gRPC vs memcpy", _args, _run)]
