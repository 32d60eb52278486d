"""`--dataset grounded`: prompts whose answer is mostly in the prompt (where draftless speculation pays), built
from text that ships with Python: the standard library's sources and docstrings, read through `inspect`, nothing
downloaded. Two kinds, alternating:

- code edit: "rewrite this function with `X` renamed to `Y`" over a stdlib function (X: one of its parameters);
- quote back: "repeat the passage between the markers" over a stretch of a stdlib module's source.

Each prompt is cut to about `input_len` tokens (the model's tokenizer with `--model`, else words * 1.3). The same
seed gives the same prompts on every machine running the same Python version. The prompts are text: the server
needs a tokenizer, and `--backend openai-chat` sends them as one user message (so `llama-server` gets them too).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from collections.abc import Iterator

import numpy as np

from bench.workload import BenchRequest, TokenCounter, Workload, WorkloadSpec, approx_tokens

# pure-Python modules present in every CPython build, in a fixed order
MODULES = (
    "argparse", "ast", "bisect", "calendar", "configparser", "csv", "dataclasses", "difflib", "email.utils",
    "fractions", "ftplib", "functools", "gettext", "heapq", "inspect", "ipaddress", "json.decoder",
    "json.encoder", "logging", "mimetypes", "pathlib", "pprint", "shlex", "shutil", "statistics", "string",
    "tarfile", "textwrap", "tokenize", "urllib.parse", "zipfile",
)  # fmt: skip
EDIT = "Rewrite this Python function with the parameter `{old}` renamed to `{new}`. Change nothing else and " \
    "reply with the code only.\n\n```python\n{code}\n```"  # fmt: skip
QUOTE = "Repeat the passage between the markers exactly, without any comment.\n\n<<<BEGIN>>>\n{text}\n<<<END>>>"


def _functions() -> Iterator[tuple[str, str]]:
    """(source, a parameter worth renaming) of each stdlib function in MODULES, in a stable order."""
    for name in MODULES:
        mod = importlib.import_module(name)
        for _, fn in sorted(inspect.getmembers(mod, inspect.isfunction), key=lambda m: m[0]):
            if fn.__module__ != mod.__name__:
                continue
            try:
                src = textwrap.dedent(inspect.getsource(fn))
                tree = ast.parse(src)
            except (OSError, TypeError, SyntaxError):
                continue
            args = tree.body[0].args if tree.body and isinstance(tree.body[0], ast.FunctionDef) else None
            params = [a.arg for a in (args.args + args.kwonlyargs if args else []) if len(a.arg) >= 3]
            params = [p for p in params if p not in ("self", "cls")]
            if params:
                yield src, params[0]


def _passages() -> Iterator[str]:
    """Stretches of 60 lines of each module's source, in a stable order."""
    for name in MODULES:
        lines = inspect.getsource(importlib.import_module(name)).splitlines()
        for start in range(0, max(1, len(lines) - 60), 60):
            yield "\n".join(lines[start : start + 60])


def _cut(text: str, budget: int, count: TokenCounter) -> str:
    """The longest run of whole lines of `text` from its start within `budget` tokens (at least one line)."""
    lines = text.splitlines()
    lo, hi = 1, len(lines)
    while lo < hi:  # binary search on the number of lines
        mid = (lo + hi + 1) // 2
        if count("\n".join(lines[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return "\n".join(lines[:lo])


def grounded_requests(spec: WorkloadSpec, context_window: int, count: TokenCounter | None = None) -> Workload:
    """`num_prompts` prompts, code edits and quote-backs alternating, picked with the seed."""
    count = count or approx_tokens
    rng = np.random.default_rng([spec.seed, 0x6E0])
    overhead = max(count(EDIT.format(old="x", new="x", code="")), count(QUOTE.format(text="")))
    budget = max(16, spec.input_len - overhead)
    funcs, passages = list(_functions()), list(_passages())
    funcs = [f for f in funcs if len(f[0]) >= 3 * budget] or funcs  # long enough to fill the prompt (~3 chars/token)
    f_order, p_order = rng.permutation(len(funcs)), rng.permutation(len(passages))
    out_len = min(spec.output_len, context_window - spec.input_len - 8)
    if out_len < 1:
        raise ValueError(f"--input-len {spec.input_len} leaves no room for output in the context ({context_window})")
    reqs: list[BenchRequest] = []
    for i in range(spec.num_prompts):
        if i % 2 == 0:
            src, old = funcs[f_order[(i // 2) % len(funcs)]]
            text = EDIT.format(old=old, new=f"{old}_renamed", code=_cut(src, budget, count))
        else:
            text = QUOTE.format(text=_cut(passages[p_order[(i // 2) % len(passages)]], budget, count))
        reqs.append(BenchRequest(count(text), out_len, text=text, chat=True))
    return Workload(tuple(reqs), 0, 0, "tokenizer" if count is not approx_tokens else "words*1.3")
