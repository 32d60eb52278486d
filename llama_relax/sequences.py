"""`SequenceBook`: the lengths of a paged KV cache's sequences as its driver keeps them, and every check a runtime
makes before it touches the cache. `ModelRuntime` (one process) and `engine.staged_runtime.StagedRuntime` (a
pipeline of stage processes) both keep their books here, so both refuse the same calls with the same errors.

The subclass provides `config` (context window), `kv_config` (page size), `kv_shape(n)`, `kv_elem` and
`compiled.kv_dtype`, and updates `_seq_lens` once the cache did what was checked (`_grown` after a forward)."""

from __future__ import annotations

from collections.abc import Sequence


class SequenceBook:
    _seq_lens: dict[int, int]

    # ---- queries ----------------------------------------------------------------------------------------------
    def sequence_length(self, seq_id: int) -> int:
        return self._seq_lens[seq_id]

    def sequence_ids(self) -> list[int]:
        return list(self._seq_lens)

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._seq_lens

    def pages_needed(self, seq_id: int | None, n_new: int) -> int:
        """Pages a sequence needs to take `n_new` more tokens (None = a new sequence)."""
        cur = 0 if seq_id is None else self._seq_lens[seq_id]
        ps = self.kv_config.page_size
        return -(-(cur + n_new) // ps) - -(-cur // ps)

    # ---- checks (before the cache is touched) -----------------------------------------------------------------
    def _check_new(self, seq_id: int) -> None:
        if seq_id in self._seq_lens:
            raise ValueError(f"sequence {seq_id} already exists")

    def _check_fork(self, parent_id: int, child_id: int, length: int | None) -> int:
        """The fork's length (default: all of the parent's tokens), checked."""
        have = self._seq_lens[parent_id]
        length = have if length is None else length
        self._check_new(child_id)
        if not 0 <= length <= have:
            raise ValueError(f"fork: cannot take {length} of the {have} tokens of sequence {parent_id}")
        return length

    def _check_popn(self, seq_id: int, n: int) -> None:
        if not 0 <= n <= self._seq_lens[seq_id]:
            raise ValueError(f"popn: cannot pop {n} of {self._seq_lens[seq_id]} tokens")

    def _check_append(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        """A forward appending `lengths[i]` tokens to `seq_ids[i]` fits each one's context window."""
        for sid, n in zip(seq_ids, lengths, strict=True):
            if sid not in self._seq_lens:
                raise KeyError(f"sequence {sid} was not added")
            if self._seq_lens[sid] + n > self.config.context_window_size:
                raise ValueError(
                    f"sequence {sid}: {self._seq_lens[sid] + n} tokens exceed the context window "
                    f"({self.config.context_window_size})"
                )

    def _check_range(self, seq_id: int, begin: int, end: int) -> None:
        if seq_id not in self._seq_lens:
            raise KeyError(f"sequence {seq_id} was not added")
        if not 0 <= begin < end <= self._seq_lens[seq_id]:
            raise ValueError(f"read_kv: range [{begin}, {end}) outside sequence {seq_id} of {self._seq_lens[seq_id]}")

    def _check_kv(self, seq_id: int, k, v) -> int:
        """K/V ([L, n, Hkv, d], the cache's dtype) that may be appended to `seq_id`; returns n."""
        if seq_id not in self._seq_lens:
            raise KeyError(f"sequence {seq_id} was not added")
        n = k.shape[1] if k.ndim == 4 else -1
        if k.shape != self.kv_shape(n) or v.shape != k.shape or n <= 0:
            raise ValueError(f"append_kv: expected K/V of shape {self.kv_shape(max(n, 1))}, got {k.shape}, {v.shape}")
        if str(k.dtype) != self.kv_elem or str(v.dtype) != self.kv_elem:
            raise ValueError(
                f"append_kv: expected {self.kv_elem} ({self.compiled.kv_dtype} KV), got {k.dtype}/{v.dtype}"
            )
        if self._seq_lens[seq_id] + n > self.config.context_window_size:
            raise ValueError(f"append_kv: {self._seq_lens[seq_id] + n} tokens exceed the context window")
        return n

    # ---- the books, after the cache did it ---------------------------------------------------------------------
    def _grown(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        for sid, n in zip(seq_ids, lengths, strict=True):
            self._seq_lens[sid] += n
