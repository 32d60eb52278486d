"""`python -m bench.load_peak`: a process's peak RSS while it loads a 1.2B-parameter model (#27).

Writes (once) a Llama-3.2-1B-shaped HF directory with random float32 weights (hidden 2048, 16 layers, 32/8 heads,
vocab 128256, tied embeddings: 1.24B parameters, 4.6 GiB), then opens it in a child process per configuration
(`--quantization none|q4f32_1` x `--kv-cache-dtype`), each with the default KV cache (16384 tokens), and prints
each child's peak RSS against the float32 weights and against `none`'s. Each child runs twice; the second run is
reported (the first may compile the library, and the compiler's peak is not the load's).

    python -m bench.load_peak [--dir /tmp/pdserve-1b]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def write_model(path: Path) -> int:
    """The HF directory (skipped when present); returns the float32 weights' bytes."""
    from safetensors.numpy import save_file

    c = CONFIG
    h, inter, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    if (path / "config.json").exists():
        return total
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = list(shapes)
    shards = [names[i : i + 24] for i in range(0, len(names), 24)]  # ~2 GB shards: bounded memory while writing
    index = {}
    for n, shard in enumerate(shards):
        fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (rng.standard_normal(shapes[k], dtype=np.float32) * 0.02) for k in shard}
        save_file(tensors, str(path / fname))
        index |= dict.fromkeys(shard, fname)
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (path / "config.json").write_text(json.dumps(CONFIG))
    return total


def child(args: argparse.Namespace) -> int:
    from llama_relax.compile import default_cache_dir, resolve_target
    from llama_relax.models import open_model
    from llama_relax.pipeline import open_stage
    from llama_relax.runtime import KVCacheConfig
    from llama_relax.stage_model import StageSpec

    if args.stage:  # one pipeline stage's worker: its layers' weights and KV cache only
        index, count = (int(x) for x in args.stage.split("/"))
        from llama_relax.loader import resolve_model

        rt = open_stage(
            resolve_model(args.dir),
            StageSpec(index, count),
            target=resolve_target(),
            cache_dir=default_cache_dir(),
            kv=KVCacheConfig(max_batch_size=16, max_total_seq_len=16384, prefill_chunk_size=512),
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
        )
        kv = rt.kv_cache_bytes
        rt.close()
        print(
            json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "kv_mb": kv / 2**20})
        )
        return 0
    m = open_model(
        args.dir,
        cache_dir=default_cache_dir(),
        quiet=True,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    kv = m.runtime.kv_cache_bytes
    m.close()
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "kv_mb": kv / 2**20}))
    return 0


def _peak(args: argparse.Namespace, quantization: str, kv_dtype: str, stage: str = "") -> dict:
    cmd = [sys.executable, "-m", "bench.load_peak", "--child", "--dir", str(args.dir)]
    cmd += ["--quantization", quantization, "--kv-cache-dtype", kv_dtype, *(["--stage", stage] if stage else [])]
    runs = [json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])]
    runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    return runs[-1]


def stage_peaks(args: argparse.Namespace) -> int:
    """Each stage's peak RSS (`--quantization none`, float16 KV, 16384 tokens) against one stage holding all."""
    one = _peak(args, "none", "float16", "0/1")
    print(f"one stage: peak {one['peak_rss_mb'] / 1024:.2f} GiB (KV {one['kv_mb']:.0f} MB)", flush=True)
    rows = [_peak(args, "none", "float16", f"{i}/{args.stages}") for i in range(args.stages)]
    for i, r in enumerate(rows):
        print(
            f"stage {i + 1}/{args.stages}: peak {r['peak_rss_mb'] / 1024:.2f} GiB = "
            f"{r['peak_rss_mb'] / one['peak_rss_mb']:.3f}x one stage (target <= 0.6; KV {r['kv_mb']:.0f} MB)",
            flush=True,
        )
    print(json.dumps({"one": one, "stages": rows}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load_peak", description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/pdserve-1b"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quantization", default="none")
    p.add_argument("--kv-cache-dtype", default="float16")
    p.add_argument("--stage", default="", help=argparse.SUPPRESS)
    p.add_argument("--stages", type=int, default=0, help="instead: each stage's peak for this many stages vs one")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    from llama_relax.bench_model import cpu_description

    weights = write_model(args.dir)
    print(f"CPU: {cpu_description()}; float32 weights {weights / 2**30:.2f} GiB", flush=True)
    if args.stages:
        return stage_peaks(args)
    rows = {}
    for q, kv in (("none", "float32"), ("none", "float16"), ("q4f32_1", "float16"), ("q4f32_1", "float32")):
        r = _peak(args, q, kv)
        rows[f"{q}+{kv}"] = r
        print(
            f"{q:8s} KV {kv}: peak {r['peak_rss_mb'] / 1024:.2f} GiB ({r['peak_rss_mb'] * 2**20 / weights:.2f}x the "
            f"float32 weights; KV cache {r['kv_mb']:.0f} MB)",
            flush=True,
        )
    for kv in ("float16", "float32"):
        ratio = rows[f"q4f32_1+{kv}"]["peak_rss_mb"] / rows[f"none+{kv}"]["peak_rss_mb"]
        print(f"KV {kv}: q4f32_1 / none = {ratio:.3f} (target <= 0.3)")
    print(json.dumps({"weights_bytes": weights, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
