"""`pdserve deploy check FILE`: validate a Ray cluster-launcher YAML for pdserve.

Two layers, every problem listed (not just the first):
  1. Ray's own schema (`ray/autoscaler/ray-schema.json`, the file `ray up` validates against), all errors;
  2. pdserve's rules: both pools present (resources `prefill` and `decode`, on node types or - for the local
     provider, which has one node type - in the worker start command), a head start command that runs
     `pdserve serve --address auto`, Ray kept on loopback for 127.0.0.1 clusters.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POOL_RESOURCES = ("prefill", "decode")


@dataclass(frozen=True)
class Finding:
    where: str  # a path into the YAML, e.g. "available_node_types.decode_gpu.resources"
    message: str
    source: str  # "ray-schema" or "pdserve"

    def __str__(self) -> str:
        return f"[{self.source}] {self.where or '<root>'}: {self.message}"


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"cluster config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML: {str(e).splitlines()[0]} ({getattr(e, 'problem_mark', '')})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a cluster config must be a YAML mapping")
    return data


def ray_schema_findings(config: dict[str, Any]) -> list[Finding]:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    out = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        out.append(Finding(".".join(str(p) for p in err.absolute_path), err.message, "ray-schema"))
    return out


def _commands(config: dict[str, Any], key: str) -> str:
    cmds = config.get(key) or []
    return "\n".join(c for c in cmds if isinstance(c, str))


def pdserve_findings(config: dict[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    provider = config.get("provider") or {}
    ptype = provider.get("type")
    head_cmds = _commands(config, "head_start_ray_commands")
    worker_cmds = _commands(config, "worker_start_ray_commands")
    if not re.search(r"pdserve\s+serve\b[^\n]*--address[ =]\S+", head_cmds):
        out.append(
            Finding(
                "head_start_ray_commands",
                "no `pdserve serve --address auto` (or --address HOST:PORT) start "
                "command: the router joins the cluster from the head",
                "pdserve",
            )
        )
    if ptype == "local":
        text = head_cmds + "\n" + worker_cmds
        for res in POOL_RESOURCES:
            if res not in text:
                out.append(
                    Finding(
                        "worker_start_ray_commands",
                        f"no host advertises the `{res}` resource (local provider: give each host its "
                        "role in its `ray start --resources`)",
                        "pdserve",
                    )
                )
        if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" not in head_cmds and provider.get("head_ip") in (
            "127.0.0.1",
            "localhost",
        ):
            out.append(
                Finding(
                    "head_start_ray_commands",
                    "a loopback cluster must set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0",
                    "pdserve",
                )
            )
    else:
        types = config.get("available_node_types") or {}
        if not types:
            out.append(Finding("available_node_types", "no node types", "pdserve"))
        for res in POOL_RESOURCES:
            holders = [n for n, t in types.items() if isinstance(t, dict) and (t.get("resources") or {}).get(res)]
            if not holders:
                out.append(
                    Finding(
                        "available_node_types",
                        f"no node type offers the `{res}` resource (the router places its workers on it)",
                        "pdserve",
                    )
                )
            for n in holders:
                mw = types[n].get("max_workers", 0)
                if isinstance(mw, int) and mw < 1:
                    out.append(
                        Finding(
                            f"available_node_types.{n}.max_workers",
                            f"the `{res}` pool can never start a node (max_workers < 1)",
                            "pdserve",
                        )
                    )
        head = config.get("head_node_type")
        if head and head not in types:
            out.append(Finding("head_node_type", f"{head!r} is not among available_node_types", "pdserve"))
    out += _stage_findings(config, head_cmds, worker_cmds)
    return out


_STAGE_FLAGS = {"--prefill-stages": "prefill_stage", "--decode-stages": "decode_stage", "--stages": "colocated_stage"}


def _stage_findings(config: dict[str, Any], head_cmds: str, worker_cmds: str) -> list[Finding]:
    """A pipelined pool (`--decode-stages 2`, ...) needs nodes that offer its stage resource (`decode_stage`)."""
    out = []
    types = config.get("available_node_types") or {}
    offered = head_cmds + "\n" + worker_cmds + "\n" + " ".join(str((t or {}).get("resources")) for t in types.values())
    for flag, res in _STAGE_FLAGS.items():
        m = re.search(rf"pdserve\s+serve\b[^\n]*{flag}[ =](\d+)", head_cmds)
        if m and int(m.group(1)) > 1 and res not in offered:
            out.append(
                Finding(
                    "available_node_types" if types else "head_start_ray_commands",
                    f"`{flag} {m.group(1)}` needs nodes that offer the `{res}` resource (one per stage)",
                    "pdserve",
                )
            )
    return out


def check_file(path: str | os.PathLike[str]) -> list[Finding]:
    config = load_yaml(path)
    return ray_schema_findings(config) + pdserve_findings(config)
