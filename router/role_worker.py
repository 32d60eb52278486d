"""`RoleWorker`: a prefill or decode worker whose role the planner can switch in place (#29), without reloading
its weights. `pdserve serve` runs its P/D pools with these when the planner is on.

Lifecycle: `RoleWorker(options, role)` opens the model and starts that role's engine (as `PrefillWorker` or
`DecodeWorker` would) -> the role's calls (`prefill_stream`; `reserve`, `prefill_local`) -> `switch(role)`, once
the router has drained it: the engine stops, its receiver or sender closes, every sequence left in the KV cache
(the prefix cache's) is removed, the other role's engine starts on the same runtime, and the process reports a
new incarnation (so the router describes it again: role, KV address) -> `shutdown()`. If Ray restarts the process,
it comes back in the role it was created with; the router sees the role differ and switches it again."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

from decode_worker.worker import reserve_events, start_decode
from engine.hosting import HostedEngine, open_worker_model
from engine.messages import Admission, GenerationRequest, Output, PrefillResult, Role, WorkerInfo, WorkerOptions
from llama_relax.generation import TokenEvent
from prefill_worker.worker import prefill_events, start_prefill


class RoleWorker(HostedEngine):
    def __init__(self, options: WorkerOptions, role: Role) -> None:
        if role not in (Role.PREFILL, Role.DECODE):
            raise ValueError(f"role: a RoleWorker is prefill or decode, not {role.value}")
        super().__init__()
        self.options = options
        self.receiver = self.sender = None
        self._kv_address = ""
        self._lock = threading.Lock()
        self.model = open_worker_model(options, role)
        try:
            self._become(role)
        except BaseException:  # a pipelined worker's stage actors go with it
            self.model.close()
            raise

    def _become(self, role: Role) -> None:
        if role is Role.PREFILL:
            self.engine, self.sender = start_prefill(self.model, self.options)
        else:
            self.engine, self.receiver, self._kv_address = start_decode(self.model, self.options, role)
        self.role = role
        self._host(self.engine)

    def _unbecome(self) -> None:
        self.engine.close()
        if self.receiver is not None:
            self.receiver.stop(0)
        if self.sender is not None:
            self.sender.close()
        self.receiver = self.sender = None
        self._kv_address = ""

    def switch(self, role: Role) -> WorkerInfo:
        """Become a `role` worker (see the module docstring); what it describes afterwards."""
        with self._lock:
            if role is not self.role:
                self._unbecome()
                rt = self.model.runtime
                for sid in rt.sequence_ids():  # the prefix cache's sequences: a fresh cache for the new role
                    rt.remove_sequence(sid)
                self.incarnation = uuid.uuid4().hex[:16]
                self._become(role)
            return self.describe()

    def kv_address(self) -> str:
        return self._kv_address

    def _expect(self, *roles: Role) -> None:
        if self.role not in roles:
            raise RuntimeError(f"this worker is {self.role.value} now")

    def prefill_stream(
        self, req: GenerationRequest, kv_target: str, kv_begin: int = 0
    ) -> Iterator[TokenEvent | PrefillResult]:
        self._expect(Role.PREFILL)
        yield from prefill_events(self.engine, req, kv_target, kv_begin)

    def reserve(self, req: GenerationRequest) -> Iterator[Admission | tuple[Output, ...]]:
        self._expect(Role.DECODE)
        yield from reserve_events(self.engine, req)

    def prefill_local(self, request_id: str) -> Admission:
        self._expect(Role.DECODE)
        return self.engine.prefill_local(request_id)

    def shutdown(self) -> None:
        self._unbecome()
        self.model.close()
