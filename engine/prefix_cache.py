"""`PrefixCache`: finished sequences kept in an engine's paged KV cache, so a later prompt that starts the same
way reuses their KV instead of recomputing it.

Sharing goes through the KV cache's own sequence forking (`ModelRuntime.fork_sequence`): a request that matches
the first L tokens of a cached entry gets a new sequence forked from it at L; the L // page_size whole pages are
shared (never copied), a partly used page is copied. Entries form a tree (an entry made from a request that forked
another keeps sharing its parent's pages).

Lifecycle (engine thread only):
  1. `claim(tokens, reserve_tokens)` at admission: the entry with the longest common prefix (at most
     `len(tokens) - 1` tokens: the last prompt token is always computed, its logits give the next token), pinned
     (`evict` never takes it), and room made for the request's reservation by evicting others.
  2. `fork(hit, seq_id, n)` makes the request's sequence (`unpin(hit)` instead if admission failed). A forked
     request holds a reference on its entry until it ends.
  3. `finish(seq_id, owner, hit, keep)` when it ends: a request that ended normally becomes an entry (its page
     reservation becomes the entry's); otherwise its sequence, pages and reference are released.
  4. `evict(pages)` frees least-recently-used entries nobody references (leaves first) until `pages` are free;
     `flush()` frees every such entry.
Page accounting: an entry owns `pages_for(len) - shared_pages` pages in the engine's `PagePool` (owner
`cache:<id>`), so a shared page is counted once; at rest, free + cached pages == total pages.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

from engine.pages import PagePool, pages_for
from llama_relax.runtime import PAGE_SIZE, ModelRuntime

MAX_ENTRIES = 64  # entries scanned per lookup; past this the least recently used go first


def page_hashes(tokens: Sequence[int], page_size: int = 16) -> list[int]:
    """Chain hashes of the full pages of `tokens`: hash i identifies tokens [0, (i + 1) * page_size). The router
    and the workers compute them alike (XXH3-64 over int32 token ids), so they name the same prefixes."""
    out: list[int] = []
    h = 0
    ids = np.asarray(tokens, dtype=np.int32)
    for i in range(len(ids) // page_size):
        h = xxhash.xxh3_64_intdigest(ids[i * page_size : (i + 1) * page_size].tobytes(), seed=h)
        out.append(h)
    return out


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two int32 token arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


@dataclass(eq=False)
class CacheEntry:
    entry_id: int
    seq_id: int
    tokens: tuple[int, ...]  # the tokens whose KV the sequence holds
    ids: np.ndarray  # the same as int32 [len(tokens)] (lookups compare arrays)
    parent: CacheEntry | None
    shared_pages: int  # leading pages shared with the parent
    hashes: tuple[int, ...]
    refs: int = 0  # forks alive (requests, child entries): never evicted while > 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def owner(self) -> str:
        return f"cache:{self.entry_id}"


@dataclass(frozen=True)
class Hit:
    entry: CacheEntry | None
    tokens: int  # leading tokens the entry already holds

    @property
    def shared_pages(self) -> int:
        return 0 if self.entry is None else self.tokens // PAGE_SIZE


MISS = Hit(None, 0)


class PrefixCache:
    def __init__(self, runtime: ModelRuntime, pool: PagePool, enabled: bool = True) -> None:
        self.runtime = runtime
        self.pool = pool
        self.enabled = enabled
        self.entries: dict[int, CacheEntry] = {}
        self._ids = itertools.count(1)
        self.hit_tokens = 0  # counters (observability): tokens served from the cache / asked for
        self.queried_tokens = 0
        self.evicted_entries = 0

    @property
    def cached_pages(self) -> int:
        return sum(self.pool.held_by(e.owner) for e in self.entries.values())

    def prefixes(self) -> tuple[int, ...]:
        """The page hashes of every cached prefix (what the router's view of this engine is rebuilt from)."""
        return tuple(sorted({h for e in self.entries.values() for h in e.hashes}))

    # ---- lookup and sharing -------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int]) -> Hit:
        """The longest cached prefix of `tokens`, at most `len(tokens) - 1` tokens long."""
        if not self.enabled or len(tokens) < 2:
            return MISS
        best = MISS
        query = np.asarray(tokens, dtype=np.int32)
        for e in self.entries.values():
            n = min(common_prefix(e.ids, query), len(tokens) - 1)
            if n > best.tokens:
                best = Hit(e, n)
        return best

    def claim(self, tokens: Sequence[int], reserve_tokens: int) -> Hit:
        """Admission's first step: the longest cached prefix of `tokens`, pinned, and room made (LRU eviction of
        other entries) for a reservation of `reserve_tokens` tokens that shares it. `unpin` it if admission fails,
        else `fork` the request's sequence from it."""
        hit = self.lookup(tokens)
        self.pin(hit)
        self.evict(pages_for(reserve_tokens, self.pool.page_size) - hit.shared_pages)
        return hit

    def pin(self, hit: Hit) -> None:
        if hit.entry is not None:
            hit.entry.refs += 1
            hit.entry.last_used = time.monotonic()

    def unpin(self, hit: Hit) -> None:
        self.release(hit.entry)

    def fork(self, hit: Hit, seq_id: int, queried: int) -> None:
        """The request's sequence (of a prompt of `queried` tokens): forked from the (pinned) entry at `hit.tokens`,
        or a fresh one on a miss."""
        if self.enabled:
            self.queried_tokens += queried
            self.hit_tokens += hit.tokens
        if hit.entry is None:
            self.runtime.add_sequence(seq_id)
        else:
            self.runtime.fork_sequence(hit.entry.seq_id, seq_id, hit.tokens)

    def release(self, entry: CacheEntry | None) -> None:
        if entry is not None:
            entry.refs -= 1

    # ---- keeping finished sequences ----------------------------------------------------------------------
    def insert(self, seq_id: int, tokens: Sequence[int], owner: str, hit: Hit) -> bool:
        """Keep the finished sequence `seq_id` (holding `tokens`, forked per `hit`) as an entry, taking over its
        request's reservation (`owner`). False when the cache is off or already holds these tokens: the caller
        then frees the sequence itself."""
        tokens = tuple(tokens)
        ids = np.asarray(tokens, dtype=np.int32)
        if not self.enabled or not tokens or any(common_prefix(e.ids, ids) == len(ids) for e in self.entries.values()):
            return False
        hashes = tuple(page_hashes(tokens, PAGE_SIZE))
        entry = CacheEntry(next(self._ids), seq_id, tokens, ids, hit.entry, hit.shared_pages, hashes)
        # the request's reference on its parent becomes the entry's
        self.pool.release(owner)
        if not self.pool.reserve(entry.owner, pages_for(len(tokens)) - entry.shared_pages):
            raise RuntimeError("prefix cache: a finished sequence holds more pages than its reservation")
        self.entries[entry.entry_id] = entry
        if len(self.entries) > MAX_ENTRIES:
            self._evict_lru(lambda: len(self.entries) <= MAX_ENTRIES)
        return True

    def finish(self, seq_id: int, owner: str, hit: Hit, keep: Sequence[int] | None) -> None:
        """The one release path of a request's sequence: cached as an entry holding `keep` (its tokens, when it
        ended normally and the cache takes it), else removed with its reservation and its reference on `hit`."""
        if (
            keep is not None
            and self.runtime.sequence_length(seq_id) == len(keep)
            and self.insert(seq_id, keep, owner, hit)
        ):
            return
        self.runtime.remove_sequence(seq_id)
        self.pool.release(owner)
        self.release(hit.entry)

    def evict(self, pages: int) -> None:
        """Free unreferenced entries, least recently used first, until `pages` pages are free (or none is left)."""
        self._evict_lru(lambda: self.pool.free >= pages)

    def flush(self) -> int:
        n = len(self.entries)
        self._evict_lru(lambda: False)
        return n - len(self.entries)

    def _evict_lru(self, done: Callable[[], bool]) -> None:
        while not done():
            idle = [e for e in self.entries.values() if e.refs == 0]
            if not idle:
                return
            victim = min(idle, key=lambda e: e.last_used)
            self.runtime.remove_sequence(victim.seq_id)
            self.pool.release(victim.owner)
            del self.entries[victim.entry_id]
            self.release(victim.parent)
            self.evicted_entries += 1
