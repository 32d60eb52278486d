"""NVRTC, called through ctypes: CUDA C source -> cubin for one GPU architecture, on a machine with no GPU.

The library and the headers come from PyPI wheels (`nvidia-cuda-nvrtc-cu12`, `nvidia-cuda-cccl-cu12`,
`nvidia-cuda-runtime-cu12`: the `cuda` extra, also in the test extra), or from `$CUDA_PATH`/`/usr/local/cuda`.
NVRTC needs no driver and no device.

Call order: `Nvrtc.load()` (finds the library once) -> `compile(source, arch)` -> cubin bytes, or `NvrtcError`
carrying the log and the names of the kernels the errors are in."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

SOURCE_NAME = "pdserve_kernels.cu"
_KERNEL = re.compile(r'extern "C" __global__ void(?: __launch_bounds__\(\d+\))? (\w+)\([^;{]*\)\s*\{')  # definitions
_ERROR_LINE = re.compile(rf"{re.escape(SOURCE_NAME)}\((\d+)\): (?:catastrophic )?error")

# What NVRTC lacks that TVM's generated CUDA C uses: fixed-width integer types and INFINITY (host headers only).
_PREAMBLE = """#include <cuda/std/cstdint>
#include <cuda/std/limits>
using cuda::std::int8_t; using cuda::std::int16_t; using cuda::std::int32_t; using cuda::std::int64_t;
using cuda::std::uint8_t; using cuda::std::uint16_t; using cuda::std::uint32_t; using cuda::std::uint64_t;
#ifndef INFINITY
#define INFINITY (::cuda::std::numeric_limits<float>::infinity())
#endif
"""


class NvrtcError(RuntimeError):
    """NVRTC refused the source: `kernels` names the kernels its errors are in, `log` is NVRTC's own log."""

    def __init__(self, message: str, log: str = "", kernels: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.log = log
        self.kernels = kernels


def check_arch(arch: str) -> str:
    """`arch` if it names a real SM architecture ("sm_80", "sm_90", "sm_90a"), else ValueError."""
    if not re.fullmatch(r"sm_\d+[af]?", arch):
        raise ValueError(f"arch must look like sm_80 or sm_90, got {arch!r}")
    return arch


def kernel_names(source: str) -> list[str]:
    """The `__global__` kernels defined in TVM-generated CUDA C, in source order."""
    return _KERNEL.findall(source)


def kernels_at_errors(source: str, log: str, line_offset: int = 0) -> tuple[str, ...]:
    """The kernel enclosing each error line of an NVRTC log (`line_offset`: preamble lines before `source`)."""
    starts = [(source.count("\n", 0, m.start()) + 1, m.group(1)) for m in _KERNEL.finditer(source)]
    names: list[str] = []
    for m in _ERROR_LINE.finditer(log):
        line = int(m.group(1)) - line_offset
        inside = [name for start, name in starts if start <= line]
        name = inside[-1] if inside else "<outside any kernel>"
        if name not in names:
            names.append(name)
    return tuple(names)


def cubin_arch(cubin: bytes) -> str:
    """The SM architecture a cubin was built for, from its ELF header (`e_flags` low byte: 80 -> "sm_80")."""
    if cubin[:4] != b"\x7fELF" or cubin[7] != 51:  # ELFOSABI_CUDA
        raise ValueError("not a CUDA cubin")
    return f"sm_{int.from_bytes(cubin[0x30:0x34], 'little') & 0xFF}"


def cubin_kernels(cubin: bytes) -> set[str]:
    """Names of the functions with code in a cubin (its `.text.<name>` sections)."""
    return {m.decode() for m in re.findall(rb"\.text\.(\w+)\x00", cubin)}


def _wheel_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _find_library() -> str:
    if env := os.environ.get("PDSERVE_NVRTC_LIBRARY"):
        return env
    wheel = _wheel_dir("nvidia.cuda_nvrtc")
    if wheel is not None:
        found = sorted((wheel / "lib").glob("libnvrtc.so.*"))
        if found:
            return str(found[0])
    for root in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (p := Path(root) / "lib64" / "libnvrtc.so").exists():
            return str(p)
    raise NvrtcError(
        "NVRTC not found: pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-cccl-cu12 nvidia-cuda-runtime-cu12 "
        "(the `cuda` extra: pip install -e '.[cuda]'), or set PDSERVE_NVRTC_LIBRARY"
    )


def _include_dirs() -> list[str]:
    """CCCL (`cuda/std/...`) and the runtime headers (`cuda_fp16.h`): the wheels', else a system CUDA's (never
    both: headers of another CUDA version than NVRTC's do not mix)."""
    wheels = [d / "include" for pkg in ("nvidia.cuda_cccl", "nvidia.cuda_runtime") if (d := _wheel_dir(pkg))]
    if wheels:
        return [str(d) for d in wheels if d.is_dir()]
    for root in (os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime.h").exists():
            return [str(Path(root) / "include")]
    return []


@dataclass(frozen=True)
class Nvrtc:
    """One loaded NVRTC library. `compile` is thread-safe (each call owns its program)."""

    lib: ctypes.CDLL
    path: str
    include_dirs: tuple[str, ...]

    @classmethod
    @functools.cache
    def load(cls) -> Nvrtc:
        """The process's NVRTC (found and loaded on the first call)."""
        path = _find_library()
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise NvrtcError(f"cannot load NVRTC from {path}: {e}") from None
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return cls(lib, path, tuple(_include_dirs()))

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            raise NvrtcError(f"{what}: {self.lib.nvrtcGetErrorString(result).decode()}")

    def compile(self, source: str, arch: str) -> bytes:
        """Compile TVM-generated CUDA C for `arch` ("sm_80", "sm_90", ...) to a cubin."""
        check_arch(arch)
        text = _PREAMBLE + source.replace("#include <cuda.h>\n", "\n")
        prog = ctypes.c_void_p()
        self._check(
            self.lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), SOURCE_NAME.encode(), 0, None, None),
            "nvrtcCreateProgram",
        )
        try:
            opts = [f"--gpu-architecture={arch}", "-default-device", "--std=c++17", "-DNDEBUG"]
            opts += [f"-I{d}" for d in self.include_dirs]
            argv = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
            result = self.lib.nvrtcCompileProgram(prog, len(opts), argv)
            log = self._log(prog)
            if result != 0:
                kernels = kernels_at_errors(source, log, _PREAMBLE.count("\n"))
                where = ", ".join(kernels) or "no kernel named in the log"
                raise NvrtcError(f"NVRTC failed for {arch} in {where}:\n{log.strip()[-4000:]}", log, kernels)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            buf = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
            return buf.raw
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))

    def _log(self, prog: ctypes.c_void_p) -> str:
        size = ctypes.c_size_t()
        if self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) != 0 or size.value <= 1:
            return ""
        buf = ctypes.create_string_buffer(size.value)
        self.lib.nvrtcGetProgramLog(prog, buf)
        return buf.value.decode(errors="replace")
