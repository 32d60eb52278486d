"""`pdserve deploy check FILE` (registered through the `pdserve.commands` entry point)."""

from __future__ import annotations

import argparse
import sys


def _args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="deploy_command", required=True)
    check = sub.add_parser("check", help="validate a cluster YAML (Ray's schema + pdserve's rules)")
    check.add_argument("file")


def _run(args: argparse.Namespace) -> int:
    from deploy.check import check_file

    findings = check_file(args.file)
    for f in findings:
        print(f, file=sys.stderr)
    if findings:
        print(f"{args.file}: {len(findings)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.file}: ok")
    return 0


def commands() -> list:
    return [("deploy", "cluster configs for `ray up`: `pdserve deploy check FILE`", _args, _run)]
