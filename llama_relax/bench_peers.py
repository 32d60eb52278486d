"""The peers `pdserve bench-model --peers` measures in the same run, each in a process of its own (their thread
pools never spin against ours): PyTorch float32 through Hugging Face transformers on the same GGUF (dequantized
by transformers), and llama.cpp's `llama-bench` on the same file with the same thread count.

Both report prefill tok/s for 512 tokens and decode ms/token at batch 1. A peer that is not available (torch or
transformers not importable by `--torch-python`, no `--llama-bench`) is reported as skipped with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

PREFILL_TOKENS = 512
DECODE_TOKENS = 128


@dataclass(frozen=True)
class PeerResult:
    name: str
    prefill_tok_s: float | None = None
    decode_ms: float | None = None
    skipped: str = ""  # why it did not run ("" when it did)
    detail: str = ""


_TORCH_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from transformers import AutoModelForCausalLM
    gguf, threads, prefill, decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    from pathlib import Path
    p = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, torch_dtype=torch.float32)
    model.eval()
    ids = torch.randint(100, 1000, (1, prefill))
    def best(fn, n=3):
        fn(); b = 1e9
        for _ in range(n):
            t0 = time.perf_counter(); fn(); b = min(b, time.perf_counter() - t0)
        return b
    with torch.inference_mode():
        t_prefill = best(lambda: model(ids, use_cache=True))
        def gen():
            out = model(ids[:, :16], use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(decode):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return (time.perf_counter() - t0) / decode
        gen()
        t_decode = min(gen() for _ in range(2))
    print(json.dumps({"prefill_tok_s": prefill / t_prefill, "decode_ms": 1000 * t_decode,
                      "torch": torch.__version__}))
    """
)


def torch_peer(gguf: Path, threads: int, python: str | None = None) -> PeerResult:
    """PyTorch fp32 (transformers) on the same weights, in `python` (default: this interpreter)."""
    cmd = [python or sys.executable, "-c", _TORCH_SCRIPT, str(gguf), str(threads), str(PREFILL_TOKENS), "64"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        return PeerResult("pytorch", skipped=f"{type(e).__name__}: {e}")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        why = "torch/transformers not installed (pip install -e '.[peers]')" if "ModuleNotFound" in last else last
        return PeerResult("pytorch", skipped=why[:300])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return PeerResult("pytorch", out["prefill_tok_s"], out["decode_ms"], detail=f"torch {out['torch']}, fp32")


def llama_cpp_peer(llama_bench: Path | None, gguf: Path, threads: int) -> PeerResult:
    """llama.cpp `llama-bench -p 512 -n 128` on the same GGUF (its own quantized kernels)."""
    if llama_bench is None:
        return PeerResult("llama.cpp", skipped="no --llama-bench (build it: bash bench/build_llama_cpp.sh)")
    cmd = [
        str(llama_bench),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-p",
        str(PREFILL_TOKENS),
        "-n",
        str(DECODE_TOKENS),
        "-o",
        "json",
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        return PeerResult("llama.cpp", skipped=f"{type(e).__name__}: {e}")
    if done.returncode != 0:
        return PeerResult("llama.cpp", skipped=(done.stderr.strip().splitlines() or ["failed"])[-1][:300])
    rows = json.loads(done.stdout)
    pp = next(r for r in rows if r["n_prompt"] == PREFILL_TOKENS and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == DECODE_TOKENS)
    detail = f"{pp.get('model_type', '')} {pp.get('build_commit', '')}".strip()
    return PeerResult("llama.cpp", pp["avg_ts"], 1000.0 / tg["avg_ts"], detail=detail)
