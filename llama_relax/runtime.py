"""`ModelRuntime`: the compiled model's VM, its weights on the device, and one paged KV cache.

Lifecycle (one driver thread; the KV cache has no locking inside):
  1. `ModelRuntime(compiled, params, kv_config)` loads the library, uploads the weights, creates the KV cache.
  2. `add_sequence(seq_id)` registers a sequence (its pages are taken lazily as tokens are appended).
  3. `prefill(seq_ids, token_lists)` appends prompt tokens (chunked so no forward exceeds the prefill chunk) and
     returns the last-token logits per sequence; `decode(seq_ids, tokens)` appends one token per sequence and
     returns their logits; `verify` returns logits for every appended token.
  4. `remove_sequence(seq_id)` frees its pages (callers do it in `finally`); `popn` rolls back the tail.
Memory: the runtime owns the device weights and the KV cache; logits come back as host numpy arrays the caller owns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.runtime import ShapeTuple

from llama_relax.arrays import aligned_empty, is_aligned
from llama_relax.compile import CompiledModel
from llama_relax.config import LlamaConfig
from llama_relax.cuda_kernels import use_prebuilt_kernels
from llama_relax.kv_cache_args import SYMBOLS, create_kv_cache
from llama_relax.kv_dtype import kv_storage
from llama_relax.sequences import SequenceBook

_F = tvm.get_global_func
_ADD_SEQ = _F("vm.builtin.kv_state_add_sequence")
_REMOVE_SEQ = _F("vm.builtin.kv_state_remove_sequence")
_FORK_SEQ = _F("vm.builtin.kv_state_fork_sequence")
_POPN = _F("vm.builtin.kv_state_popn")
_BEGIN = _F("vm.builtin.kv_state_begin_forward")
_END = _F("vm.builtin.kv_state_end_forward")
_FREE_PAGES = _F("vm.builtin.attention_kv_cache_get_num_available_pages")
_SEQ_LEN = _F("vm.builtin.attention_kv_cache_get_sequence_length")
_RESHAPE = _F("vm.builtin.reshape")
_PREPARE_RECV = _F("vm.builtin.kv_cache_disagg_prepare_recv")
_DEBUG_GET_KV = _F("vm.builtin.attention_kv_cache_debug_get_kv")
_PROBE_SEQ_ID = 2**62  # a sequence id never used by callers

PAGE_SIZE = 16  # baked into TVM's `kv_cache_transpose_append` kernel


@dataclass(frozen=True)
class KVCacheConfig:
    """Capacity of the paged KV cache. `max_total_seq_len` bounds the tokens of all sequences together."""

    max_batch_size: int = 16
    max_total_seq_len: int = 8192
    prefill_chunk_size: int = 512
    page_size: int = PAGE_SIZE

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_total_seq_len", "prefill_chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"kv cache: {name} must be > 0, got {getattr(self, name)}")
        if self.page_size != PAGE_SIZE:
            raise ValueError(f"kv cache: page_size must be {PAGE_SIZE} (fixed by TVM's append kernel)")

    @property
    def num_pages(self) -> int:
        return -(-self.max_total_seq_len // self.page_size)


class ModelRuntime(SequenceBook):
    """Runs one compiled Llama model on one device. See the module docstring for call order."""

    pipeline_depth = 1  # decode forwards a caller may keep in flight: its calls return when done

    def __init__(
        self,
        compiled: CompiledModel,
        params: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
        kv_config: KVCacheConfig,
        *,
        model_create_fn: bool = False,
    ) -> None:
        """`model_create_fn=True` creates the cache through the model's own `create_paged_kv_cache` (page
        tensors then stay unreachable: no KV export/import); by default the identical constructor call is
        rebuilt from Python so the pages are reachable (see `kv_cache_args`)."""
        self.compiled = compiled
        self.config = compiled.config
        self.kv_config = kv_config
        # the pages' element dtype and row width (q8_0: int8 rows of quants + scales; see llama_relax.kv_dtype)
        self.kv_elem, self.kv_row = kv_storage(compiled.kv_dtype, compiled.config.head_dim)
        self.num_kv_layers = compiled.num_kv_layers  # all layers, or one pipeline stage's
        self.device = compiled.target.device()
        if compiled.target.kind == "cuda":
            use_prebuilt_kernels(compiled.lib_path)  # TVM's CUDA runtime asks for each module's cubin at load
        lib = tvm.runtime.load_module(str(compiled.lib_path))
        self.vm = relax.VirtualMachine(lib, self.device)
        self._lib = lib
        self.params, self._param_samples = self._upload(params)
        self._fingerprint: str | None = None
        prefill_chunk = min(kv_config.prefill_chunk_size, self.config.prefill_chunk_size)
        self.prefill_chunk_size = prefill_chunk
        self.kv_cache, self.kv_pages = self._create_kv_cache(lib, kv_config, prefill_chunk, model_create_fn)
        on_cpu = self.device.dlpack_device_type() == 1
        self._host_pages = [np.from_dlpack(p) for p in self.kv_pages] if on_cpu else []  # views, not copies
        for pages in self._host_pages:  # fault every page in now, not inside the first forwards and KV imports:
            pages.fill(0)  # a first touch cost ~3 ms/MiB on these VMs (a 2000-token import: 255 ms, then 25 ms)
        have = set(compiled.functions)  # a pipeline stage's library has only its stage's methods
        self._fn = {
            name: self.vm[name]
            for name in (
                "prefill_forward",
                "decode_forward",
                "embed",
                "get_logits",
                "batch_select_last_hidden_states",
                "batch_forward_to_last_hidden_states",
                "prefill_to_last_hidden_states",
                "prefill",
                "decode",
                "batch_prefill",
                "batch_decode",
                "batch_verify",
            )
            if name in have or (not have and name not in ("prefill_forward", "decode_forward"))
        }
        self._seq_lens: dict[int, int] = {}
        self._transpose_append = lib.get_function("tir_kv_cache_transpose_append", query_imports=True)

    def _upload(
        self, params: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]
    ) -> tuple[list[tvm.runtime.Tensor], list[bytes]]:
        """Each parameter to the device as it arrives (a stream is never held in host memory all at once), in
        the library's parameter order; checks names, shapes and dtypes against the compiled model."""
        specs = dict(zip(self.compiled.param_names, self.compiled.param_specs, strict=True))
        on_device: dict[str, tvm.runtime.Tensor] = {}
        samples: dict[str, bytes] = {}
        for name, array in params.items() if isinstance(params, Mapping) else params:
            if name not in specs:
                continue  # e.g. a float copy the plan does not use
            shape, dtype = specs[name]
            if tuple(array.shape) != shape or str(array.dtype) != dtype:
                raise ValueError(
                    f"weights: {name} is {array.dtype}{list(array.shape)}, the model wants {dtype}{list(shape)}"
                )
            on_device[name] = self._to_device(array)
            samples[name] = _sample_bytes(array)
            del array
        missing = [n for n in self.compiled.param_names if n not in on_device]
        if missing:
            raise ValueError(f"weights: missing parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        names = self.compiled.param_names
        return [on_device[n] for n in names], [samples[n] for n in names]

    def _to_host(self, t: tvm.runtime.Tensor) -> np.ndarray:
        """A forward's output as a NumPy array: on the CPU a view that keeps `t` alive (no copy of the logits rows:
        ~17 us per 49k-vocabulary row), else one device-to-host copy."""
        return np.from_dlpack(t) if self.device.dlpack_device_type() == 1 else t.numpy()

    def _to_device(self, array: np.ndarray) -> tvm.runtime.Tensor:
        """On the CPU an aligned C-contiguous array becomes the tensor itself (zero-copy: loading then never holds
        a second copy of a weight); otherwise it is copied to the device."""
        if self.device.dlpack_device_type() == 1 and array.flags.c_contiguous and is_aligned(array):
            return tvm.runtime.from_dlpack(array)
        return tvm.runtime.tensor(np.ascontiguousarray(array), self.device)

    def _create_kv_cache(
        self, lib: tvm.runtime.Module, kv: KVCacheConfig, prefill_chunk: int, model_create_fn: bool
    ) -> tuple[object, list[tvm.runtime.Tensor]]:
        sizes = {
            "max_batch_size": kv.max_batch_size,
            "max_total_seq_len": kv.max_total_seq_len,
            "prefill_chunk_size": prefill_chunk,
            "page_size": kv.page_size,
            "support_sliding_window": 0,
        }
        self._recorder = None
        if model_create_fn or not self.compiled.kv_create_args:
            cache = self.vm["create_paged_kv_cache"](*(ShapeTuple([sizes[k]]) for k in SYMBOLS))
            return cache, []
        cache, recorder = create_kv_cache(
            list(self.compiled.kv_create_args), lib, sizes, self.device, self.num_kv_layers
        )
        # One debug_get_kv over a one-token probe sequence makes the recorder see every layer's pages.
        c = self.config
        probe = _PROBE_SEQ_ID
        _ADD_SEQ(cache, probe)
        _PREPARE_RECV(cache, probe, 1)
        _END(cache)
        scratch = [
            tvm.runtime.empty((self.num_kv_layers, 1, c.num_key_value_heads, self.kv_row), self.kv_elem, self.device)
            for _ in range(2)
        ]
        _DEBUG_GET_KV(cache, probe, 0, 1, *scratch)
        _REMOVE_SEQ(cache, probe)
        self._recorder = recorder
        return cache, recorder.take_pages()

    # ---- sequences ------------------------------------------------------------------------------------------
    def add_sequence(self, seq_id: int) -> None:
        self._check_new(seq_id)
        _ADD_SEQ(self.kv_cache, seq_id)
        self._seq_lens[seq_id] = 0

    def remove_sequence(self, seq_id: int) -> None:
        if self._seq_lens.pop(seq_id, None) is not None:
            _REMOVE_SEQ(self.kv_cache, seq_id)

    def fork_sequence(self, parent_id: int, child_id: int, length: int | None = None) -> None:
        """A new sequence holding the first `length` tokens of `parent_id` (default: all of them). Whole pages are
        shared with the parent (both read them; neither frees them while the other holds them); a partly used
        page is copied, so the child has `length // page_size` shared pages."""
        length = self._check_fork(parent_id, child_id, length)
        _FORK_SEQ(self.kv_cache, parent_id, child_id, length)
        self._seq_lens[child_id] = length

    def popn(self, seq_id: int, n: int) -> None:
        self._check_popn(seq_id, n)
        _POPN(self.kv_cache, seq_id, n)
        self._seq_lens[seq_id] -= n

    def kv_length_in_cache(self, seq_id: int) -> int:
        """The cache's own count (a check against our bookkeeping)."""
        return int(_SEQ_LEN(self.kv_cache, seq_id))

    def free_pages(self) -> int:
        return int(_FREE_PAGES(self.kv_cache))

    # ---- forward --------------------------------------------------------------------------------------------
    def _check_ids(self, ids: np.ndarray) -> None:
        # TVM's embedding gather runs without bounds checks: an id >= vocab would read out of bounds.
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.config.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def _lookup(self, fn, ids: np.ndarray) -> tvm.runtime.Tensor:
        """Rows [n, h] of checked `ids` through a VM's `embed` function `fn`."""
        self._check_ids(ids)
        return fn(tvm.runtime.tensor(ids.astype(np.int32), self.device), self.params)

    def _embed(self, ids: np.ndarray, shape: Sequence[int]) -> tvm.runtime.Tensor:
        return _RESHAPE(self._lookup(self._fn["embed"], ids), ShapeTuple(list(shape)))

    def side_embedder(self) -> Callable[[np.ndarray], np.ndarray]:
        """`embed` for another thread, as host rows [n, h]: a VM of its own over the same (read-only) weights, so
        a pipeline's embedding stage answers lookups while a forward runs on this runtime's VM."""
        fn = relax.VirtualMachine(self._lib, self.device)["embed"]
        return lambda ids: self._lookup(fn, np.asarray(ids)).numpy()

    def embed(self, ids: np.ndarray) -> tvm.runtime.Tensor:
        """The embedding rows of `ids`, [n, h] (a pipeline's embedding stage, for the first stage's input)."""
        ids = np.asarray(ids)
        return self._embed(ids, (len(ids), self.config.hidden_size))

    def _begin(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        if len(seq_ids) > self.kv_config.max_batch_size:
            raise ValueError(
                f"a forward of {len(seq_ids)} sequences exceeds max_batch_size {self.kv_config.max_batch_size}"
            )
        self._check_append(seq_ids, lengths)
        _BEGIN(self.kv_cache, ShapeTuple(list(seq_ids)), ShapeTuple(list(lengths)))

    def _end(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        _END(self.kv_cache)
        self._grown(seq_ids, lengths)

    def forward_hidden(self, seq_ids: Sequence[int], chunks: Sequence[Sequence[int]]) -> tvm.runtime.Tensor:
        """Append `chunks[i]` to `seq_ids[i]` in one forward; hidden states of every token, [1, sum(len), h].

        One sequence runs `prefill_to_last_hidden_states`, several `batch_forward_to_last_hidden_states` (the
        same math; the model keeps both entry points, as MLC's do)."""
        lengths = [len(c) for c in chunks]
        total = sum(lengths)
        if total > self.prefill_chunk_size:
            raise ValueError(f"forward of {total} tokens exceeds the prefill chunk ({self.prefill_chunk_size})")
        ids = np.fromiter((t for c in chunks for t in c), dtype=np.int32, count=total)
        emb = self._embed(ids, (1, total, self.config.hidden_size))
        self._begin(seq_ids, lengths)
        try:
            fn = "prefill_to_last_hidden_states" if len(seq_ids) == 1 else "batch_forward_to_last_hidden_states"
            hidden, _ = self._fn[fn](emb, self.kv_cache, self.params)
        except BaseException:
            self._abort_forward(seq_ids)
            raise
        self._end(seq_ids, lengths)
        return hidden

    def logits_at(self, hidden: tvm.runtime.Tensor, positions: Sequence[int]) -> np.ndarray:
        """Float32 logits [len(positions), V] of the given rows of a hidden-state tensor ([1, s, h] or [b, 1, h])."""
        s = int(np.prod(hidden.shape[:-1]))  # [1, s, h] or [b, 1, h]
        flat = _RESHAPE(hidden, ShapeTuple([s, self.config.hidden_size]))
        pos = tvm.runtime.tensor(np.asarray(positions, dtype=np.int32), self.device)
        selected = self._fn["batch_select_last_hidden_states"](flat, pos)  # [b, h]
        return self._to_host(self._fn["get_logits"](selected, self.params))

    def stage_forward(self, seq_ids: Sequence[int], lengths: Sequence[int], x: np.ndarray | tvm.runtime.Tensor):
        """One forward of a pipeline stage's library (`stage_model`): `x` is the token ids ([s] int, the first
        stage) or the previous stage's hidden states (any shape of s rows). One token per sequence runs
        `decode_forward` on [b, 1, h], anything else `prefill_forward` on [1, s, h]; returns this stage's hidden
        states in that shape (final-normed on the last stage; `logits_at` turns rows into logits there)."""
        total, h = sum(lengths), self.config.hidden_size
        one_each = all(n == 1 for n in lengths)
        shape = (len(lengths), 1, h) if one_each else (1, total, h)
        x = self._embed(np.asarray(x), shape) if isinstance(x, np.ndarray) else _RESHAPE(x, ShapeTuple(list(shape)))
        self._begin(seq_ids, lengths)
        try:
            hidden, _ = self._fn["decode_forward" if one_each else "prefill_forward"](x, self.kv_cache, self.params)
        except BaseException:
            self._abort_forward(seq_ids)
            raise
        self._end(seq_ids, lengths)
        return hidden

    def prefill(self, seq_ids: Sequence[int], token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Append each prompt to its sequence; float32 logits of each prompt's last token, [b, V].

        Prompts are packed into forwards of at most `prefill_chunk_size` tokens; a long prompt spans several."""
        if len(seq_ids) != len(token_lists):
            raise ValueError("prefill: seq_ids and token_lists differ in length")
        ctx = self.config.context_window_size
        for sid, toks in zip(seq_ids, token_lists, strict=True):  # validate all before touching the cache
            if len(toks) == 0:
                raise ValueError(f"prefill: sequence {sid} has an empty prompt")
            if sid not in self._seq_lens:
                raise KeyError(f"sequence {sid} was not added")
            if self._seq_lens[sid] + len(toks) > ctx:
                raise ValueError(
                    f"sequence {sid}: {self._seq_lens[sid] + len(toks)} tokens exceed the context window ({ctx})"
                )
            self._check_ids(np.asarray(toks, dtype=np.int64))
        out = np.empty((len(seq_ids), self.config.vocab_size), dtype=np.float32)
        for batch in plan_prefill_chunks([len(t) for t in token_lists], self.prefill_chunk_size):
            ids = [seq_ids[i] for i, _, _ in batch]
            chunks = [token_lists[i][a:b] for i, a, b in batch]
            hidden = self.forward_hidden(ids, chunks)
            ends, rows = prompt_ends(batch, token_lists)
            if rows:
                out[rows] = self.logits_at(hidden, ends)
        return out

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """Append one token to each sequence (one `batch_decode`); float32 logits [b, V]."""
        b = len(seq_ids)
        if b == 0 or b != len(tokens):
            raise ValueError("decode: need one token per sequence")
        emb = self._embed(np.asarray(tokens, dtype=np.int32), (b, 1, self.config.hidden_size))
        self._begin(seq_ids, [1] * b)
        try:
            logits, _ = self._fn["batch_decode"](emb, self.kv_cache, self.params)  # [b, 1, V]
        except BaseException:
            self._abort_forward(seq_ids)
            raise
        self._end(seq_ids, [1] * b)
        return self._to_host(logits).reshape(b, -1)

    def verify(self, seq_ids: Sequence[int], token_lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Append tokens and return logits for every appended token (speculative verification), per sequence."""
        lengths = [len(t) for t in token_lists]
        total = sum(lengths)
        ids = np.fromiter((t for c in token_lists for t in c), dtype=np.int32, count=total)
        emb = self._embed(ids, (1, total, self.config.hidden_size))
        self._begin(seq_ids, lengths)
        try:
            logits, _ = self._fn["batch_verify"](emb, self.kv_cache, self.params)  # [1, s, V]
        except BaseException:
            self._abort_forward(seq_ids)
            raise
        self._end(seq_ids, lengths)
        flat = self._to_host(logits)[0]
        return np.split(flat, np.cumsum(lengths)[:-1])

    # ---- KV export / import (used by kvtransfer; between model steps, on the driver thread) ------------------
    def kv_shape(self, n_tokens: int) -> tuple[int, int, int, int]:
        """Shape of one of the K/V arrays for `n_tokens` tokens: [layers, n, kv_heads, head_dim]."""
        c = self.config
        return (self.num_kv_layers, n_tokens, c.num_key_value_heads, self.kv_row)

    def read_kv(self, seq_id: int, begin: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Copy K (rotated, as stored) and V of tokens [begin, end) into new host arrays [L, n, Hkv, d]."""
        if not self._host_pages:  # a GPU: read on the device, then one copy to host
            kt, vt = self.read_kv_device(seq_id, begin, end)
            return kt.numpy(), vt.numpy()
        return self.gather_kv(self.kv_positions(seq_id, begin, end))

    @property
    def host_kv(self) -> bool:
        """Whether the KV pages are host memory this process can read directly (`kv_positions` + `gather_kv`)."""
        return bool(self._host_pages) and self._recorder is not None

    def kv_positions(self, seq_id: int, begin: int, end: int) -> np.ndarray:
        """Where tokens [begin, end) of `seq_id` live: [n] int32 of page * page_size + slot (driver thread).

        The positions stay valid while the sequence holds those tokens (appends never move them; `popn`,
        `remove_sequence` and eviction do)."""
        self._check_range(seq_id, begin, end)
        if self._recorder is None:
            raise RuntimeError("this runtime's KV pages are not reachable (created with model_create_fn=True)")
        carrier = tvm.runtime.from_dlpack(aligned_empty(self.kv_shape(end - begin), self.kv_elem))
        self._recorder.positions_only = True  # shape checks only; the carrier is never written (nor paged in)
        try:
            _DEBUG_GET_KV(self.kv_cache, seq_id, begin, end, carrier, carrier)
        finally:
            self._recorder.positions_only = False
        positions, self._recorder.positions = self._recorder.positions, None
        return positions

    def gather_kv(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Copy K and V at `positions` (from `kv_positions`) out of the host pages into new arrays [L, n, Hkv, d].

        Reads page memory only, so it may run on any thread while the driver thread runs forwards that write
        other positions; the caller keeps the sequence (and so its pages) alive until it returns."""
        ps = self.kv_config.page_size
        page, slot = positions // ps, positions % ps
        k, v = (aligned_empty(self.kv_shape(len(positions)), self.kv_elem) for _ in range(2))
        for layer, pages in enumerate(self._host_pages):  # pages: [P, 2, Hkv, page_size, d]
            k[layer] = pages[page, 0, :, slot, :]  # [n, Hkv, d]
            v[layer] = pages[page, 1, :, slot, :]
        return k, v

    def read_kv_device(self, seq_id: int, begin: int, end: int) -> tuple[tvm.runtime.Tensor, tvm.runtime.Tensor]:
        """K and V of tokens [begin, end) as new tensors [L, n, Hkv, d] on this runtime's device (no host copy;
        hand them on with DLPack, e.g. `cupy.from_dlpack`)."""
        self._check_range(seq_id, begin, end)
        shape = self.kv_shape(end - begin)
        kt = tvm.runtime.empty(shape, self.kv_elem, self.device)
        vt = tvm.runtime.empty(shape, self.kv_elem, self.device)
        _DEBUG_GET_KV(self.kv_cache, seq_id, begin, end, kt, vt)
        return kt, vt

    def append_kv(self, seq_id: int, k: np.ndarray, v: np.ndarray) -> None:
        """Append n tokens of precomputed K/V ([L, n, Hkv, d], cache dtype, K rotated) to a sequence, as if a
        forward had produced them. Validates everything before touching the cache; if writing fails midway the
        sequence is removed (its state would be undefined) and the error re-raised. k and v may also be device
        arrays exposing DLPack (e.g. cupy, from the NCCL path) when this runtime is on a GPU."""
        if not self.kv_pages:
            raise RuntimeError("this runtime's KV pages are not reachable (created with model_create_fn=True)")
        n = self._check_kv(seq_id, k, v)
        if self.pages_needed(seq_id, n) > self.free_pages():
            raise MemoryError(f"append_kv: {self.pages_needed(seq_id, n)} pages needed, {self.free_pages()} free")
        compressed = list(_PREPARE_RECV(self.kv_cache, seq_id, n))  # runs BeginForward; [nseg, b1, l1, ...]
        try:
            segs = compressed[1:]
            positions = np.concatenate(
                [np.arange(b, b + ln, dtype=np.int32) for b, ln in zip(segs[::2], segs[1::2], strict=True)]
            )
            if self._host_pages:  # CPU: scatter straight into the page memory (zero-copy views)
                ps = self.kv_config.page_size
                page, slot = positions // ps, positions % ps
                for layer, pages in enumerate(self._host_pages):  # pages: [P, 2, Hkv, page_size, d]
                    pages[page, 0, :, slot, :] = k[layer]  # k[layer]: [n, Hkv, d]
                    pages[page, 1, :, slot, :] = v[layer]
            else:  # device memory: the library's own append kernel, one layer at a time
                pos = tvm.runtime.tensor(positions, self.device)
                for layer, pages in enumerate(self.kv_pages):
                    kl, vl = self._device_layer(k[layer]), self._device_layer(v[layer])  # [n, Hkv, d]
                    self._transpose_append(pages, kl, vl, pos)
        except BaseException:
            self._abort_forward([seq_id])
            raise
        self._end([seq_id], [n])

    def _device_layer(self, a: Any) -> tvm.runtime.Tensor:
        """One layer's [n, Hkv, d] K or V on this device: host arrays are copied, device arrays taken zero-copy."""
        if isinstance(a, np.ndarray):
            return tvm.runtime.tensor(np.ascontiguousarray(a), self.device)
        return tvm.runtime.from_dlpack(a)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the paged KV cache holds: every page of every layer (0 when the pages are not reachable)."""
        return sum(int(np.prod(p.shape)) * np.dtype(str(p.dtype)).itemsize for p in self.kv_pages)

    def weight_digests(self) -> dict[str, bytes]:
        """A digest of each parameter's sample under its checkpoint name (a pipeline stage's local layer names
        mapped back): this runtime's part of the model's identity (`model_fingerprint`)."""
        stage = self.compiled.stage
        ranges = self.config.layer_ranges(stage[1])[stage[0]] if stage is not None else None
        out = {}
        for name, p in zip(self.compiled.param_names, self._param_samples, strict=True):
            if ranges is not None and name.startswith("model.layers."):
                _, _, j, rest = name.split(".", 3)
                name = f"model.layers.{ranges[int(j)]}.{rest}"
            out[name] = hashlib.sha256(name.encode() + p).digest()
        return out

    def kv_fingerprint(self) -> str:
        """Identifies the KV layout *and* the weights that produced it (`model_fingerprint`): KV moves only between
        runtimes (or pipelines, whatever their stage counts) with the same fingerprint. Computed once."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(
                self.config,
                self.compiled.dtype,
                self.compiled.kv_dtype,
                self.kv_config.page_size,
                self.weight_digests(),
            )
        return self._fingerprint

    def _abort_forward(self, seq_ids: Sequence[int]) -> None:
        """A forward failed after BeginForward: the cache state of these sequences is undefined; drop them."""
        with contextlib.suppress(Exception):  # best effort; the sequences are dropped below either way
            _END(self.kv_cache)
        for sid in seq_ids:
            self.remove_sequence(sid)

    def close(self) -> None:
        """Release the KV cache and weights (drop references; TVM frees on refcount)."""
        for sid in list(self._seq_lens):
            self.remove_sequence(sid)
        self.kv_cache = None
        self.kv_pages = []
        self._host_pages = []
        self.params = []


def model_fingerprint(
    config: LlamaConfig, dtype: str, kv_dtype: str, page_size: int, digests: Mapping[str, bytes]
) -> str:
    """The KV fingerprint of a model: config, dtypes, page size and every parameter's digest by checkpoint name
    (`ModelRuntime.weight_digests`; a pipeline passes the union of its stages')."""
    h = hashlib.sha256(json.dumps([config.to_dict(), dtype, kv_dtype, page_size]).encode())
    for name in sorted(digests):
        h.update(digests[name])
    return h.hexdigest()[:32]


def _sample_bytes(a: np.ndarray, n: int = 4096) -> bytes:
    """First and last `n` bytes of a parameter plus its shape: a cheap identity for the fingerprint."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return str(a.shape).encode() + flat[:n].tobytes() + flat[-n:].tobytes()


def prompt_ends(batch: Sequence[tuple[int, int, int]], token_lists: Sequence[Sequence[int]]) -> tuple[list, list]:
    """For a forward planned by `plan_prefill_chunks`: (the rows of its tokens that end a prompt, those prompts'
    indexes), i.e. where the prompts whose last token is in this forward want their logits."""
    ends, rows, offset = [], [], 0
    for i, a, b in batch:
        offset += b - a
        if b == len(token_lists[i]):
            ends.append(offset - 1)
            rows.append(i)
    return ends, rows


def plan_prefill_chunks(lengths: Sequence[int], chunk: int) -> list[list[tuple[int, int, int]]]:
    """Pack prompts into forwards of at most `chunk` tokens. Each forward is a list of (prompt index, begin, end).

    Prompts stay in order; a prompt longer than the room left is split, its rest continuing in the next forward."""
    plans: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    room = chunk
    for i, n in enumerate(lengths):
        pos = 0
        while pos < n:
            take = min(room, n - pos)
            cur.append((i, pos, pos + take))
            pos += take
            room -= take
            if room == 0:
                plans.append(cur)
                cur, room = [], chunk
    if cur:
        plans.append(cur)
    return plans
