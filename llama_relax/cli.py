"""The model-level `pdserve` commands (generate, tokenize, compile, bench-model, fetch-model) and the parser and
runner every command shares. The command table itself is `pdserve.cli` (the top of the import graph: this
package never imports the packages above it).

Errors the user can fix (`llama_relax.errors.USER_ERRORS`) print one line on stderr and exit with status 2; any
other exception is a bug and shows its traceback. Process setup (TVM's thread count, the cache dir's default) happens
here, once, in `main`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from llama_relax.errors import USER_ERRORS, UserError
from llama_relax.kv_dtype import KVCacheDtype
from llama_relax.quantization import Quantization

# (name, help, add_arguments, run)
Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that opens a model."""
    p.add_argument("--model", type=Path, default=None, help="HF model dir or .gguf file (default: bundled SmolLM2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--target", default="llvm", choices=["llvm", "cuda"], help="compile for the CPU or a CUDA GPU")
    p.add_argument(
        "--quantization",
        default="auto",
        choices=["auto", *(q.value for q in Quantization)],
        help="weights in memory: gguf (a .gguf file's own Q4_0/Q4_1/Q8_0 blocks), q4f32_1, q4f16_1 (CUDA), q8_0, "
        "none (float); auto (default): gguf for a .gguf file, none for an HF directory",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=[k.value for k in KVCacheDtype],
        help="element type of the paged KV cache: float16 halves its memory and the KV moved per token; "
        "auto (default): float16",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="compiled-library cache (default ~/.cache/pdserve)")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", nargs="*", default=[], help="stop strings")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=0, help="return the top-K logprobs per generated token")


def sampling_params_from_args(args: argparse.Namespace):
    from llama_relax.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )


# ---- generate -------------------------------------------------------------------------------------------------
def _generate_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", type=_int_list, help="prompt token ids, comma-separated")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_model_args(p)
    add_sampling_args(p)


def _run_generate(args: argparse.Namespace) -> int:
    from llama_relax.generation import generate
    from llama_relax.models import open_model

    params = sampling_params_from_args(args)
    model = open_model(
        args.model,
        dtype=args.dtype,
        target=_target(args),
        cache_dir=args.cache_dir,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    try:
        tok = model.tokenizer
        if args.prompt is not None:
            if tok is None:
                raise UserError("--prompt: this model has no tokenizer; use --prompt-ids")
            text = args.prompt
            if args.chat:
                text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            prompt_ids = tok.encode(text)
        else:
            if args.chat:
                raise UserError("--chat needs --prompt (text)")
            prompt_ids = args.prompt_ids
        if not prompt_ids:
            raise UserError("prompt: the prompt is empty")
        ctx = model.config.context_window_size
        if len(prompt_ids) >= ctx:
            raise UserError(f"prompt: {len(prompt_ids)} tokens do not fit the context window ({ctx})")
        bad = [t for t in prompt_ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise UserError(f"prompt-ids: token id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
        events = []
        for ev in generate(model.runtime, prompt_ids, params, tok):
            events.append(ev)
            if not args.json:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
        if args.json:
            out = {
                "prompt_token_ids": list(prompt_ids),
                "token_ids": [e.token_id for e in events],
                "text": "".join(e.text for e in events),
                "finish_reason": events[-1].finish_reason.value,
                "logprobs": [[{"token_id": lp.token_id, "logprob": lp.logprob} for lp in e.logprobs] for e in events]
                if params.logprobs
                else None,
            }
            print(json.dumps(out))
        else:
            sys.stdout.write("\n")
        return 0
    finally:
        model.close()


# ---- tokenize -------------------------------------------------------------------------------------------------
def _tokenize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", required=True)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--json", action="store_true")


def _run_tokenize(args: argparse.Namespace) -> int:
    from llama_relax.loader import resolve_model
    from llama_relax.models import default_model_path, load_tokenizer

    path = args.model or default_model_path(args.cache_dir, quiet=args.json)
    tok = load_tokenizer(resolve_model(path))
    if tok is None:
        raise UserError(f"{path}: this model has no tokenizer")
    ids = tok.encode(args.text)
    print(json.dumps({"ids": ids}) if args.json else " ".join(map(str, ids)))
    return 0


# ---- compile --------------------------------------------------------------------------------------------------
def _compile_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument(
        "--arch",
        default=None,
        help="with --target cuda: the GPU architecture (sm_80, sm_90); builds and NVRTC-compiles every kernel "
        "without a GPU (default: the visible GPU's)",
    )


def _run_compile(args: argparse.Namespace) -> int:
    from llama_relax.compile import compile_model, resolve_target
    from llama_relax.cuda_kernels import cubin_dir as cuda_kernel_dir
    from llama_relax.kv_dtype import resolve_kv_dtype
    from llama_relax.loader import load_config, quant_plan, resolve_model
    from llama_relax.models import default_model_path

    path = args.model or default_model_path(args.cache_dir)
    src = resolve_model(path)
    config = load_config(src)
    target = resolve_target(args.target, args.arch)
    plan = quant_plan(src, config, args.quantization, target.kind)
    kv_dtype = resolve_kv_dtype(args.kv_cache_dtype, args.dtype, target.kind)
    cm = compile_model(
        config, args.dtype, target, cache_dir=args.cache_dir, force=args.force, plan=plan, kv_dtype=kv_dtype
    )
    state = "cached" if cm.cache_hit else f"built in {cm.build_s:.1f}s"
    if target.kind == "cuda":
        state += f", {cm.cuda_kernels} CUDA kernels compiled for {target.arch} in {cuda_kernel_dir(cm.lib_path)}"
    print(f"{cm.lib_path} ({state})")
    return 0


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=None)


def _run_fetch(args: argparse.Namespace) -> int:
    from llama_relax.models import default_model_path

    print(default_model_path(args.cache_dir))
    return 0


def _run_bench_model(args: argparse.Namespace) -> int:
    from llama_relax.bench_model import run_bench_model

    return run_bench_model(args)


def _bench_model_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peers", action="store_true", help="also measure PyTorch fp32 and llama.cpp on the same GGUF")
    p.add_argument("--llama-bench", type=Path, default=None, help="llama.cpp's llama-bench (bench/build_llama_cpp.sh)")
    p.add_argument("--torch-python", default=None, help="the Python with torch + transformers (default: this one)")


def _target(args: argparse.Namespace):
    from llama_relax.compile import resolve_target

    return resolve_target(args.target)


def commands() -> list[Command]:
    return [
        ("generate", "generate text locally with a compiled model", _generate_args, _run_generate),
        ("tokenize", "print the token ids of a text", _tokenize_args, _run_tokenize),
        ("compile", "compile the model ahead of time into the cache", _compile_args, _run_compile),
        ("bench-model", "prefill/decode speed vs a NumPy matmul baseline", _bench_model_args, _run_bench_model),
        ("fetch-model", "download the bundled default model and print its path", _fetch_args, _run_fetch),
    ]


def build_parser(commands: list[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_args, run in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: user errors as one line and exit status 2, Ctrl-C as 130, bugs with a traceback."""
    try:
        if getattr(args, "cache_dir", False) is None:  # the one place the cache dir's default is read
            from llama_relax.compile import default_cache_dir

            args.cache_dir = default_cache_dir()
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("pdserve: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"pdserve: error: {msg}", file=sys.stderr)
        return 2
