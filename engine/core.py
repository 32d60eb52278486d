"""`EngineCore`: what the prefill and the decode engine share over one runtime, between `EngineLoop` (the thread)
and each engine's own `step()`.

It owns the page pool, the prefix cache, the sequence ids and the counters, and does admission for both: a
request's pages are checked (`engine.scheduler.admit`: the one policy), reserved, and its sequence forked from the
longest cached prefix of its tokens. Call order (engine thread): `admit_request(...)` -> the engine keeps the
returned sequence id and hit with its own record of the request -> ... -> the engine's one release path gives the
pages back (`pool.release`) and hands the sequence to the prefix cache (`cache.finish`).
Memory: the core owns the pool and the cache; the runtime (and its KV cache) belongs to the engine's owner."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Container
from dataclasses import dataclass

from engine.faults import FaultInjector, FaultPlan
from engine.loop import EngineLoop
from engine.messages import Admission, GenerationRequest, WorkerLoad, WorkerOptions
from engine.pages import PagePool, pages_for
from engine.prefix_cache import MISS, Hit, PrefixCache
from engine.scheduler import admit
from llama_relax.generation import SequenceDecoder, TokenizerLike
from llama_relax.runtime import ModelRuntime


@dataclass(frozen=True)
class Admitted:
    """Admission's answer: `admission` (with `cached_tokens`), and when admitted the request's new sequence id and
    the cached prefix it was forked from (its first `hit.tokens` tokens are in the cache already)."""

    admission: Admission
    seq_id: int = 0
    hit: Hit = MISS

    @property
    def ok(self) -> bool:
        return self.admission.ok


class EngineCore(EngineLoop):
    def __init__(
        self,
        name: str,
        runtime: ModelRuntime,
        tokenizer: TokenizerLike | None,
        options: WorkerOptions,
        faults: FaultInjector | None = None,
    ) -> None:
        super().__init__(name)
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.options = options
        self.faults = faults or FaultInjector(FaultPlan())
        self.pool = PagePool(runtime.free_pages(), runtime.kv_config.page_size)
        self.cache = PrefixCache(runtime, self.pool, options.prefix_cache)
        self.lease_expired = 0  # requests whose KV (or reservation) a lease freed: a counter read by load()
        self.steps = 0  # engine steps that did work: a counter read by load()
        self._seq_ids = itertools.count(1)

    # ---- engine thread ------------------------------------------------------------------------------------
    def admit_request(
        self,
        req: GenerationRequest,
        held: Container[str],
        *,
        tokens: int,
        active: int,
        max_active: int,
        what: str,
        peak_tokens: int | None = None,
    ) -> Admitted:
        """Admit `req` needing pages for `tokens` tokens now (`peak_tokens` by its end), on an engine holding
        `active` of at most `max_active` requests (`held`: the ids it holds). Admitted: the pages are reserved
        (less those of the cached prefix it shares) and its sequence is forked from that prefix."""
        rid = req.request_id
        hit = self.cache.claim(req.token_ids, tokens)
        decision = admit(
            self.pool,
            rid,
            held,
            tokens=tokens,
            active=active,
            max_active=max_active,
            what=what,
            peak_tokens=peak_tokens,
            shared_pages=hit.shared_pages,
        )
        if not decision.ok:
            self.cache.unpin(hit)
            return Admitted(decision)
        self.pool.reserve(rid, pages_for(tokens, self.pool.page_size) - hit.shared_pages)
        seq_id = next(self._seq_ids)
        self.cache.fork(hit, seq_id, len(req.token_ids))
        return Admitted(dataclasses.replace(decision, cached_tokens=hit.tokens), seq_id, hit)

    def decoder(self, req: GenerationRequest) -> SequenceDecoder:
        """The request's sampling/stop/detokenizer state, with the tokens it already produced replayed (their text
        was streamed before; replaying emits nothing, it only brings the state to where it was)."""
        decoder = SequenceDecoder(
            req.params, self.tokenizer, len(req.prompt_ids), self.runtime.config.context_window_size
        )
        for token in req.resume_ids:
            decoder.append(token)
        return decoder

    def core_load(self, incarnation: str, **role: int) -> WorkerLoad:
        """The load fields every engine has, plus its role's own (`queued`, `running`, ...)."""
        return WorkerLoad(
            incarnation,
            sequences=len(self.runtime.sequence_ids()) - len(self.cache.entries),
            free_pages=self.pool.free,
            total_pages=self.pool.total,
            lease_expired=self.lease_expired,
            steps=self.steps,
            cached_pages=self.cache.cached_pages,
            cached_prefixes=self.cache.prefixes(),
            prefix_hit_tokens=self.cache.hit_tokens,
            prefix_queried_tokens=self.cache.queried_tokens,
            **role,
        )

    # ---- any thread ---------------------------------------------------------------------------------------
    def flush_cache(self) -> int:
        """Drop every prefix-cache entry no request uses; how many were dropped."""
        return self.call(self.cache.flush)
