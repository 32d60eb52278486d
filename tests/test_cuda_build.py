"""The CUDA build, checked on a machine without a GPU: both tiny configs in fp16 for sm_80 and sm_90, every method
and KV-cache function in the library, every kernel compiled by NVRTC into a cubin of the right architecture, a
kernel that does not compile named in the error, and the load-time hook serving the prebuilt cubins.

NVRTC, CCCL and the CUDA runtime headers come from PyPI (the test extra); nothing here needs a driver."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tvm_ffi
from conftest import TINY_GQA, TINY_TIED
from model_files import write_hf_dir
from reference import random_params

from llama_relax.compile import compile_model, resolve_target
from llama_relax.cuda_kernels import (
    KernelBuildError,
    compile_kernels,
    cubin_dir,
    read_report,
    use_prebuilt_kernels,
)
from llama_relax.model import LlamaForCausalLM
from llama_relax.nvrtc import Nvrtc, NvrtcError, cubin_arch, cubin_kernels, kernel_names

# TVM's paged-KV-cache functions the runtime calls by name (vm.builtin.paged_attention_kv_cache_create)
KV_FUNCTIONS = {
    "batch_prefill_paged_kv",
    "batch_decode_paged_kv",
    "batch_prefill_ragged_kv",
    "tir_kv_cache_transpose_append",
    "tir_attention_merge_state",
    "copy_single_page",
    "compact_kv_copy",
    "tir_kv_cache_debug_get_kv",
    "fused_rope",
}


@pytest.fixture(scope="module")
def cuda_builds(cache_dir):
    """(config name, arch) -> CompiledModel, each built once for the module."""
    builds = {}
    for name, config in (("gqa", TINY_GQA), ("tied", TINY_TIED)):
        for arch in ("sm_80", "sm_90"):
            target = resolve_target("cuda", arch)
            builds[name, arch] = compile_model(config, "float16", target, cache_dir=cache_dir, quiet=True)
    return builds


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_every_entry_point_is_in_the_cuda_library(cuda_builds, name, arch):
    cm = cuda_builds[name, arch]
    config = TINY_GQA if name == "gqa" else TINY_TIED
    methods = set(LlamaForCausalLM(config, "float16").get_default_spec().method_names)
    assert len(methods) == 11  # the 12th seed method, get_default_spec, is the spec itself
    assert methods <= set(cm.functions), sorted(methods - set(cm.functions))
    assert set(cm.functions) >= KV_FUNCTIONS, sorted(KV_FUNCTIONS - set(cm.functions))
    assert cm.target.describe() == f"cuda/{arch}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_every_kernel_is_compiled_for_its_arch(cuda_builds, name, arch):
    cm = cuda_builds[name, arch]
    report = read_report(cm.lib_path)
    cubins = sorted(cubin_dir(cm.lib_path).glob("*.cubin"))
    assert report.arch == arch and cubins
    in_cubins: set[str] = set()
    in_sources: list[str] = []
    for cubin in cubins:
        data = cubin.read_bytes()
        assert cubin_arch(data) == arch
        in_cubins |= cubin_kernels(data)
        in_sources += kernel_names(cubin.with_suffix(".cu").read_text())
    assert sorted(in_sources) == sorted(report.kernels)
    assert set(report.kernels) <= in_cubins  # every kernel of the source has code in a cubin
    # each matmul, norm, rope and attention kernel is a real GPU kernel, not a host fallback
    assert cm.cuda_kernels == len(report.kernels) >= 40
    for needle in ("rms_norm", "matmul", "batch_decode_paged_kv", "batch_prefill_paged_kv", "silu"):
        assert any(needle in k for k in report.kernels), needle
    # no CPU attention replacement leaked into the CUDA build
    assert not any(k.startswith("cpu_") for k in report.kernels)


def test_builds_for_two_archs_differ_only_in_the_cubins(cuda_builds):
    a, b = cuda_builds["gqa", "sm_80"], cuda_builds["gqa", "sm_90"]
    assert a.lib_path != b.lib_path
    src_a = sorted(p.read_text() for p in cubin_dir(a.lib_path).glob("*.cu"))
    src_b = sorted(p.read_text() for p in cubin_dir(b.lib_path).glob("*.cu"))
    assert len(src_a) == len(src_b)
    bins_a = {p.read_bytes() for p in cubin_dir(a.lib_path).glob("*.cubin")}
    bins_b = {p.read_bytes() for p in cubin_dir(b.lib_path).glob("*.cubin")}
    assert not bins_a & bins_b


def test_the_load_hook_serves_the_prebuilt_cubin(cuda_builds):
    """What TVM's CUDA runtime calls when it loads the library (`tvm_callback_cuda_compile(source)`) returns the
    cubin built for that exact source, without compiling."""
    cm = cuda_builds["tied", "sm_90"]
    use_prebuilt_kernels(cm.lib_path, device_arch="sm_90")
    hook = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    sources = sorted(cubin_dir(cm.lib_path).glob("*.cu"))
    for source in sources:
        assert bytes(hook(source.read_text())) == source.with_suffix(".cubin").read_bytes()
    # a GPU of another arch gets kernels compiled for it (once, kept), never the build's cubins
    use_prebuilt_kernels(cm.lib_path, device_arch="sm_80")
    other = bytes(hook(sources[0].read_text()))
    assert cubin_arch(other) == "sm_80" and other != sources[0].with_suffix(".cubin").read_bytes()
    kept = sources[0].with_name(sources[0].stem + ".sm_80.cubin")
    assert kept.read_bytes() == other
    kept.unlink()  # leave the cached build as it was for the other tests
    use_prebuilt_kernels(cm.lib_path, device_arch="sm_90")


class _SourceModule:
    """Stands in for a built library's import tree: a host module importing one `cuda` source module."""

    def __init__(self, kind: str, source: str = "", imports: tuple = ()) -> None:
        self.kind, self._source, self.imports = kind, source, imports

    def inspect_source(self, fmt: str) -> str:
        assert fmt == "cuda"
        return self._source


GOOD = 'extern "C" __global__ void __launch_bounds__(32) good_kernel(float* __restrict__ a) {\n  a[threadIdx.x] += 1.0f;\n}\n'
BAD = 'extern "C" __global__ void __launch_bounds__(32) broken_kernel(float* __restrict__ a) {\n  a[threadIdx.x] = undefined_name;\n}\n'


def test_a_kernel_that_does_not_compile_fails_the_build_by_name(tmp_path):
    lib = tmp_path / "lib.so"
    tree = _SourceModule("llvm", imports=(_SourceModule("cuda", GOOD + BAD),))
    with pytest.raises(KernelBuildError, match="broken_kernel") as info:
        compile_kernels(tree, "sm_90", lib)
    assert "good_kernel" not in str(info.value).split("failed to compile")[0]
    assert "undefined_name" in str(info.value)  # NVRTC's own log
    assert not cubin_dir(lib).exists() and not list(tmp_path.glob("*.tmp"))  # nothing half-written


def test_nvrtc_names_the_kernels_its_errors_are_in():
    with pytest.raises(NvrtcError) as info:
        Nvrtc.load().compile(GOOD + BAD + GOOD.replace("good_kernel", "other_kernel"), "sm_80")
    assert info.value.kernels == ("broken_kernel",)
    with pytest.raises(ValueError, match="sm_80 or sm_90"):
        Nvrtc.load().compile(GOOD, "compute_90")


def test_a_build_with_no_cuda_module_is_refused(tmp_path):
    with pytest.raises(KernelBuildError, match="no CUDA source module"):
        compile_kernels(_SourceModule("llvm"), "sm_90", tmp_path / "lib.so")


def test_arch_is_checked():
    with pytest.raises(ValueError, match="sm_80 or sm_90"):
        resolve_target("cuda", "ampere")
    with pytest.raises(ValueError, match="--target cuda"):
        resolve_target("llvm", "sm_90")


def test_pdserve_compile_for_cuda_without_a_gpu(tmp_path, cache_dir):
    """The command a user runs: an HF directory compiled for sm_80 in fp16, the kernel count reported."""
    model = write_hf_dir(tmp_path / "model", TINY_GQA, random_params(TINY_GQA, seed=3))
    cmd = [sys.executable, "-m", "pdserve", "compile", "--model", str(model), "--dtype", "float16"]
    cmd += ["--target", "cuda", "--arch", "sm_80", "--cache-dir", str(cache_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lib, _, state = out.stdout.strip().partition(" (")
    meta = json.loads(Path(lib).with_suffix(".json").read_text())
    assert meta["target"] == "cuda/sm_80" and meta["dtype"] == "float16"
    assert f"{meta['cuda_kernels']['count']} CUDA kernels compiled for sm_80" in state
    assert {"prefill", "batch_decode", "create_paged_kv_cache"} <= set(meta["functions"])


@pytest.mark.slow
def test_the_bundled_model_builds_for_cuda_with_its_4bit_weights(cache_dir):
    """SmolLM2-135M's own Q4_1 blocks (float16 scales) on sm_90: dequantization fused into the matmul kernels."""
    from conftest import real_gguf_path

    from llama_relax.loader import load_config, quant_plan, resolve_model

    path = real_gguf_path()
    if path is None:
        pytest.skip("bundled GGUF not available (set PDSERVE_TEST_GGUF)")
    src = resolve_model(path)
    config = load_config(src)
    plan = quant_plan(src, config, "auto", "cuda")
    cm = compile_model(config, "float16", resolve_target("cuda", "sm_90"), cache_dir=cache_dir, quiet=True, plan=plan)
    assert config.num_hidden_layers == 30 and plan.formats
    methods = set(LlamaForCausalLM(config, "float16", plan).get_default_spec().method_names)
    assert methods <= set(cm.functions)
    kernels = read_report(cm.lib_path).kernels
    assert cm.cuda_kernels == len(kernels) >= 40
    assert any("q4_matmul" in k for k in kernels)  # the 4-bit matmuls are GPU kernels
    assert not any("dequant" in k for k in kernels)  # ... with no separate dequantize pass over the weights
