"""Ahead-of-time compilation of `LlamaForCausalLM` to a shared library, cached on disk.

The cache key covers everything that changes the generated code: the config, dtype, target, the TVM version and
a hash of this project's compile-side sources (model, pipeline, schedules, kernels). A hit loads in well under a
second; a miss exports, runs the pipeline (CPU: legalize -> our attention kernels -> our matmul schedules ->
lowering; CUDA: TVM's default GPU pipeline with dlight) and writes `<key>.so` + `<key>.json` atomically.

Call order: `resolve_target()` -> `compile_model()` (returns a `CompiledModel` naming the library) ->
`llama_relax.runtime.ModelRuntime` loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tvm
from tvm import relax

from llama_relax.config import LlamaConfig
from llama_relax.cuda_kernels import KernelReport, compile_kernels
from llama_relax.kv_cache_args import extract_create_args
from llama_relax.kv_dtype import KV_DTYPES
from llama_relax.nvrtc import check_arch
from llama_relax.quantization import NO_QUANTIZATION, QuantPlan

if TYPE_CHECKING:
    from llama_relax.stage_model import StageSpec

DTYPES = ("float32", "float16")
_COMPILE_SOURCES = (
    "model.py",
    "stage_model.py",
    "quantization.py",
    "compile.py",
    "kv_cache_args.py",
    "kv_dtype.py",
    "schedule_cpu.py",
    "schedule_matmul.py",
    "kernels",
    "cuda_kernels.py",
    "nvrtc.py",
)


@dataclass(frozen=True)
class TargetSpec:
    """Where the model runs: `kind` is "llvm" or "cuda"; `mcpu`/`arch` pin the code generator."""

    kind: str
    mcpu: str = ""
    num_cores: int = 0
    arch: str = ""

    def to_target(self) -> tvm.target.Target:
        if self.kind == "llvm":
            return tvm.target.Target({"kind": "llvm", "mcpu": self.mcpu, "num-cores": self.num_cores})
        if self.kind == "cuda":
            host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
            return tvm.target.Target({"kind": "cuda", "arch": self.arch}, host=host)
        raise ValueError(f"target: unknown kind {self.kind!r} (use 'llvm' or 'cuda')")

    def device(self) -> tvm.runtime.Device:
        return tvm.cpu() if self.kind == "llvm" else tvm.cuda(0)

    def describe(self) -> str:
        return f"llvm/{self.mcpu}x{self.num_cores}" if self.kind == "llvm" else f"cuda/{self.arch}"


def resolve_target(kind: str = "llvm", arch: str | None = None) -> TargetSpec:
    """The real host CPU (never "native": TVM silently falls back to a generic CPU) or a CUDA GPU: `arch`
    ("sm_80", "sm_90") when given, which needs no GPU, else the first visible GPU's."""
    if arch is not None and kind != "cuda":
        raise ValueError(f"--arch {arch} is for --target cuda")
    if kind in ("llvm", "cpu"):
        return TargetSpec(
            kind="llvm", mcpu=tvm.target.codegen.llvm_get_system_cpu(), num_cores=len(os.sched_getaffinity(0))
        )
    if kind == "cuda":
        if arch is not None:
            return TargetSpec(kind="cuda", arch=check_arch(arch))
        dev = tvm.cuda(0)
        if not dev.exist:
            raise RuntimeError("target cuda: no CUDA device is visible (pass --arch sm_80|sm_90 to build without one)")
        return TargetSpec(kind="cuda", arch="sm_" + dev.compute_version.replace(".", ""))
    raise ValueError(f"target: unknown kind {kind!r} (use 'llvm' or 'cuda')")


@dataclass(frozen=True)
class CompiledModel:
    """A built library on disk and what is needed to call it."""

    lib_path: Path
    config: LlamaConfig
    dtype: str
    target: TargetSpec
    param_names: tuple[str, ...]
    cache_hit: bool
    build_s: float
    kv_create_args: tuple = ()  # JSON spec of the KV cache constructor call (see kv_cache_args)
    param_specs: tuple[tuple[tuple[int, ...], str], ...] = ()  # (shape, dtype) per parameter, in order
    plan: QuantPlan = NO_QUANTIZATION
    functions: tuple[str, ...] = ()  # the library's VM functions (methods, KV cache functions, kernels' callers)
    cuda_kernels: int = 0  # CUDA kernels NVRTC compiled at build time (cuda targets)
    kv_dtype: str = "float32"  # the paged KV cache's element type (`llama_relax.kv_dtype`)
    stage: tuple[int, int] | None = None  # (index, count) for one pipeline stage's library (`stage_model`)

    @property
    def num_kv_layers(self) -> int:
        """Layers this library's KV cache holds: all, or its pipeline stage's."""
        if self.stage is None:
            return self.config.num_hidden_layers
        return len(self.config.layer_ranges(self.stage[1])[self.stage[0]])

    @classmethod
    def from_meta(
        cls, lib_path: Path, config: LlamaConfig, target: TargetSpec, plan: QuantPlan, meta: dict, hit: bool
    ) -> CompiledModel:
        specs = tuple((tuple(shape), dtype) for shape, dtype in meta["param_specs"])
        return cls(
            lib_path,
            config,
            meta["dtype"],
            target,
            tuple(meta["param_names"]),
            hit,
            0.0 if hit else meta["build_s"],
            tuple(meta["kv_create_args"]),
            specs,
            plan,
            tuple(meta.get("functions", ())),
            int(meta.get("cuda_kernels", {}).get("count", 0)),
            meta.get("kv_dtype", meta["dtype"]),
            tuple(meta["stage"]) if meta.get("stage") else None,
        )


def compile_code_version() -> str:
    """Hash of the sources that shape the generated code, so editing them invalidates the cache."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for name in _COMPILE_SOURCES:
        path = root / name
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            if f.exists():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(
    config: LlamaConfig,
    dtype: str,
    target: TargetSpec,
    plan: QuantPlan = NO_QUANTIZATION,
    kv_dtype: str | None = None,
    stage: StageSpec | None = None,
) -> str:
    material = {
        "stage": stage.cache_key(config) if stage is not None else None,
        "config": config.to_dict(),
        "dtype": dtype,
        "kv_dtype": kv_dtype or dtype,
        "quantization": plan.key(),
        "target": target.describe(),
        "tvm": tvm.__version__,
        "code": compile_code_version(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[pdserve compile] {msg}", file=sys.stderr, flush=True)


def build_pipeline(target: tvm.target.Target, config: LlamaConfig, kv_dtype: str) -> tvm.transform.Pass:
    """The relax pipeline. CPU: the stock passes plus our attention kernels (for `kv_dtype` pages) and matmul
    schedules. CUDA: TVM's
    CUDA pipeline (dlight's GPU rules, TVM's paged-KV kernels) with tensor-core matmuls off (see below)."""
    if target.kind.name == "cuda":
        return _cuda_pipeline(target)
    if target.kind.name != "llvm":
        return relax.get_default_pipeline(target)
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from llama_relax.kernels import cpu_attention_pass
    from llama_relax.schedule_cpu import cpu_schedule_pass

    custom = [cpu_attention_pass(config, kv_dtype), cpu_schedule_pass(target)]

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                + custom
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


@tvm.transform.module_pass(opt_level=0, name="NoTensorCoreMatmul")
def _no_tensorize(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Mark every PrimFunc `dlight.do_not_tensorize`. Measured with TVM 0.27: dlight's tensor-core matmul rule
    segfaults (inside `Tensorize`) on each float16 matmul with a dynamic `seq_len` (the projections, the MLP and
    the LM head of SmolLM2-135M, for sm_80 and sm_90), killing the build; its SIMT matmul schedule is used."""
    out = tvm.IRModule(attrs=mod.attrs)
    for gv, f in mod.functions_items():
        out[gv] = f.with_attr("dlight.do_not_tensorize", True) if isinstance(f, tvm.tirx.PrimFunc) else f
    return out


def _cuda_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    from tvm.relax.backend.cuda import pipeline as cuda

    legalize = cuda.legalize_passes(target)
    legalize.insert(len(legalize) - 1, _no_tensorize)  # before dlight's ApplyDefaultSchedule, its last pass

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            passes = cuda.library_dispatch_passes(target) + legalize
            passes += cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target)
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def _build(mod: tvm.IRModule, target: tvm.target.Target, pipeline: tvm.transform.Pass):
    """`relax.build`, except that on CPU each hand-scheduled PrimFunc is code-generated in an LLVM module of
    its own. Measured with TVM 0.27: compiled inside the one big module, the GEMM micro-kernel's register
    accumulators were spilled to memory on every k step (2x slower); alone, LLVM keeps them in registers."""
    if target.kind.name != "llvm":
        return relax.build(mod, target, relax_pipeline=pipeline)
    from tvm.relax import vm_build

    with target:
        mod = pipeline(mod)
    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")
    prims = {gv: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    alone = {gv: f for gv, f in prims.items() if f.attrs is not None and "tirx.is_scheduled" in f.attrs}
    rest = tvm.IRModule({gv: f for gv, f in prims.items() if gv not in alone}, attrs=mod.attrs)
    lib = tvm.tirx.build(rest, target=target)
    for gv, f in alone.items():
        lib.import_module(tvm.tirx.build(tvm.IRModule({gv: f}, attrs=mod.attrs), target=target))
    return vm_build.VMExecutable(vm_build._ffi_api.VMLink(builder, target, lib, [], {}))


def vm_functions(executable: relax.VMExecutable) -> list[str]:
    """The VM functions of a built library (the model's methods and the KV cache's), from its statistics."""
    stats = executable.stats()
    m = re.search(r"Globals \(#\d+\): \[([^\]]*)\]", stats)
    if m is None:
        raise RuntimeError("the VM executable's statistics list no globals (TVM changed its format?)")
    return sorted({g.strip() for g in m.group(1).split(",") if g.strip() and not g.strip().startswith("vm.builtin")})


def compile_model(
    config: LlamaConfig,
    dtype: str = "float32",
    target: TargetSpec | None = None,
    *,
    cache_dir: Path | str,
    force: bool = False,
    quiet: bool = False,
    plan: QuantPlan = NO_QUANTIZATION,
    kv_dtype: str | None = None,
    stage: StageSpec | None = None,
) -> CompiledModel:
    """Build (or reuse) the library for `config` x `dtype` x `target` x quantization `plan` x KV cache dtype
    (`kv_dtype`, default `dtype`) under `cache_dir`; with `stage`, only that pipeline stage (`stage_model`)."""
    from llama_relax.model import LlamaForCausalLM
    from llama_relax.stage_model import LlamaStage

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    kv_dtype = kv_dtype or dtype
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv-cache-dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    if kv_dtype == "q8_0" and (target or resolve_target()).kind != "llvm":
        raise ValueError("kv-cache-dtype q8_0 is for the CPU (llvm) target")
    target = target or resolve_target()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(config, dtype, target, plan, kv_dtype, stage)
    lib_path, meta_path = cache / f"llama-{key}.so", cache / f"llama-{key}.json"
    if not force and lib_path.exists() and meta_path.exists():
        return CompiledModel.from_meta(lib_path, config, target, plan, json.loads(meta_path.read_text()), True)

    t0 = time.perf_counter()
    tvm_target = target.to_target()
    what = f"{config.num_hidden_layers} layers, {dtype}, {kv_dtype} KV, {plan.summary()}, {target.describe()}"
    if stage is not None:
        what += f", stage {stage.index + 1}/{stage.count} (layers {stage.layers(config).start}-{stage.layers(config).stop - 1})"
    _log(f"[1/3] exporting Relax IR ({what})", quiet)
    model = (
        LlamaForCausalLM(config, dtype, plan, kv_dtype)
        if stage is None
        else LlamaStage(config, stage, dtype, plan, kv_dtype)
    )
    with tvm_target:
        mod, named_params, _ = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    kv_create_args = extract_create_args(mod)
    _log("[2/3] optimizing and generating code (this is the slow step)", quiet)
    executable = _build(mod, tvm_target, build_pipeline(tvm_target, config, kv_dtype))
    kernels: KernelReport | None = None
    if target.kind == "cuda":
        _log(f"[2/3] compiling the CUDA kernels with NVRTC for {target.arch}", quiet)
        kernels = compile_kernels(executable.mod, target.arch, lib_path)
    _log(f"[3/3] linking {lib_path.name}", quiet)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp_lib = Path(tmp) / lib_path.name
        executable.export_library(str(tmp_lib))
        os.replace(tmp_lib, lib_path)
    build_s = time.perf_counter() - t0
    meta = {
        "param_names": [name for name, _ in named_params],
        "param_specs": [[[int(d) for d in p.shape], str(p.dtype)] for _, p in named_params],
        "kv_create_args": kv_create_args,
        "config": config.to_dict(),
        "dtype": dtype,
        "kv_dtype": kv_dtype,
        "stage": stage.key() if stage is not None else None,
        "target": target.describe(),
        "tvm": tvm.__version__,
        "build_s": round(build_s, 2),
        "functions": vm_functions(executable),
    }
    if kernels is not None:
        meta["cuda_kernels"] = {"count": len(kernels.kernels), "nvrtc": list(kernels.nvrtc_version)}
    tmp_meta = meta_path.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, meta_path)
    _log(f"done in {build_s:.1f}s -> {lib_path}", quiet)
    return CompiledModel.from_meta(lib_path, config, target, plan, meta, False)


def default_cache_dir() -> Path:
    """`$PDSERVE_CACHE_DIR`, else `~/.cache/pdserve`. Read once, at a command's entry point (`llama_relax.cli.run_command`);
    everything below takes the directory as an argument."""
    env = os.environ.get("PDSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pdserve"
