"""The CUDA half of a build: every kernel compiled with NVRTC when the library is built (no GPU needed), and
served from disk when a GPU worker loads it.

Why beside the library and not inside it: apache-tvm 0.27's `relax.build` for a `cuda` target gives a library
whose device module holds CUDA C source (format "cuda"); the wheel's compiler never compiles it. Its runtime does,
when the library is loaded, by calling the global `tvm_callback_cuda_compile(source)`; and a device module cannot be
rebuilt from a cubin on a machine without the CUDA driver. So a kernel NVRTC rejects would surface only on the GPU,
at worker start, and each worker would JIT-compile every kernel. Instead:

1. `compile_kernels(executable.mod, arch, lib_path)` (build time): every CUDA source module in the library is compiled
   with NVRTC for `arch`; a kernel that does not compile fails the build, named, with NVRTC's log. The cubins go to
   `<lib>.so.cubin/<sha256 of the source>.cubin` (and `.cu`), with `kernels.json` (arch, kernel names, NVRTC version).
2. `use_prebuilt_kernels(lib_path)` (load time, before `tvm.runtime.load_module`, GPU worker) registers
   `tvm_callback_cuda_compile`: it returns the prebuilt cubin of that exact source, so nothing is compiled at
   start; on a GPU of another arch than the build's, each source is compiled with NVRTC for it, once, and kept.

At load time NVRTC is needed only for that miss: ship the `cuda` extra on GPU machines either way."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_relax.nvrtc import Nvrtc, NvrtcError, cubin_kernels, kernel_names

KERNELS_JSON = "kernels.json"


class KernelBuildError(RuntimeError):
    """A CUDA kernel of the library did not compile: the message names it and carries NVRTC's log."""


@dataclass(frozen=True)
class KernelReport:
    """What `compile_kernels` built (and `kernels.json` keeps): the arch, the kernels (one entry per `__global__`
    definition) and the NVRTC version."""

    arch: str
    kernels: tuple[str, ...]
    nvrtc_version: tuple[int, ...]


def cubin_dir(lib_path: Path) -> Path:
    return lib_path.with_name(lib_path.name + ".cubin")


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def cuda_sources(module: Any) -> Iterator[str]:
    """CUDA C of every `cuda` device module in a built library's import tree (depth first, each once)."""
    seen: set[int] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.kind == "cuda":
            yield m.inspect_source("cuda")
        stack.extend(reversed(list(m.imports)))


def compile_kernels(runtime_module: Any, arch: str, lib_path: Path) -> KernelReport:
    """Compile every CUDA kernel of `runtime_module` (a built library's module) for `arch`, into
    `cubin_dir(lib_path)` (replaced as a whole). Raises `KernelBuildError` naming the kernel that failed."""
    nvrtc = Nvrtc.load()
    out = cubin_dir(lib_path)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sources = list(cuda_sources(runtime_module))
        report = KernelReport(arch, tuple(_compile_into(tmp, nvrtc, sources, arch)), nvrtc.version())
        meta = {"arch": arch, "nvrtc": list(report.nvrtc_version), "kernels": report.kernels, "sources": len(sources)}
        (tmp / KERNELS_JSON).write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return report


def _compile_into(tmp: Path, nvrtc: Nvrtc, sources: list[str], arch: str) -> list[str]:
    """Each source's cubin (and the source) into `tmp`; the kernels compiled, in order."""
    if not sources:
        raise KernelBuildError("the cuda build holds no CUDA source module (nothing was offloaded to the GPU)")
    names: list[str] = []
    for source in sources:
        try:
            cubin = nvrtc.compile(source, arch)
        except NvrtcError as e:
            raise KernelBuildError(f"CUDA kernel(s) {', '.join(e.kernels) or '?'} failed to compile: {e}") from None
        kernels = kernel_names(source)
        if missing := sorted(set(kernels) - cubin_kernels(cubin)):
            raise KernelBuildError(f"NVRTC's cubin lacks kernel(s) {', '.join(missing)} of the source")
        digest = _digest(source)
        (tmp / f"{digest}.cubin").write_bytes(cubin)
        (tmp / f"{digest}.cu").write_text(source)  # what NVRTC compiled (its log's line numbers refer to it)
        names += kernels
    return names


def read_report(lib_path: Path) -> KernelReport:
    """What `compile_kernels` recorded for this library (`kernels.json`)."""
    meta = json.loads((cubin_dir(lib_path) / KERNELS_JSON).read_text())
    return KernelReport(meta["arch"], tuple(meta["kernels"]), tuple(meta["nvrtc"]))


_lock = threading.Lock()
_libs: list[Path] = []  # libraries whose cubins the hook serves, in registration order
_device_arch: list[str] = []  # the visible GPU's arch, found on the first load (or given)


def use_prebuilt_kernels(lib_path: Path, device_arch: str | None = None) -> None:
    """Serve this library's prebuilt cubins to TVM's CUDA runtime (call before loading the library).
    `device_arch` ("sm_90") is the GPU's; by default it is read from the first CUDA device when needed."""
    import tvm.support.nvcc  # noqa: F401  TVM registers its own hook on import: import it first, then override
    import tvm_ffi

    with _lock:
        if lib_path not in _libs:
            _libs.append(lib_path)
        if device_arch is not None:
            _device_arch[:] = [device_arch]
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_for_runtime, override=True)


def _arch() -> str:
    with _lock:
        if not _device_arch:
            import tvm

            _device_arch.append("sm_" + tvm.cuda(0).compute_version.replace(".", ""))
        return _device_arch[0]


def _built_for(lib_path: Path) -> str:
    try:
        return read_report(lib_path).arch
    except (OSError, ValueError, KeyError):
        return ""


def _compile_for_runtime(source: str, *_: Any) -> bytes:
    """TVM's load-time hook: the prebuilt cubin of `source` when it was built for this GPU's arch, else one
    compiled now with NVRTC (kept as `<digest>.<arch>.cubin` for the next start)."""
    arch, digest = _arch(), _digest(source)
    with _lock:
        libs = list(_libs)
    for lib in libs:
        names = [f"{digest}.{arch}.cubin"] + ([f"{digest}.cubin"] if _built_for(lib) == arch else [])
        for name in names:
            if (cubin_dir(lib) / name).exists():
                return (cubin_dir(lib) / name).read_bytes()
    cubin = Nvrtc.load().compile(source, arch)
    if libs and cubin_dir(libs[0]).is_dir():
        (cubin_dir(libs[0]) / f"{digest}.{arch}.cubin").write_bytes(cubin)
    return cubin
