"""`PagePool`: pure bookkeeping of KV pages reserved per request, mirroring a runtime's paged cache.

Engines reserve before they let a sequence grow, so the real cache never runs out under them; tests assert that
every reservation is released (`pool.free == pool.total`, `not pool.held`) at the end."""

from __future__ import annotations

from dataclasses import dataclass, field


def pages_for(tokens: int, page_size: int = 16) -> int:
    return -(-tokens // page_size)


@dataclass
class PagePool:
    total: int
    page_size: int = 16
    held: dict[str, int] = field(default_factory=dict)  # owner -> pages reserved

    @property
    def used(self) -> int:
        return sum(self.held.values())

    @property
    def free(self) -> int:
        return self.total - self.used

    def held_by(self, owner: str) -> int:
        return self.held.get(owner, 0)

    def can_reserve(self, n: int) -> bool:
        return n <= self.free

    def reserve(self, owner: str, n: int) -> bool:
        """Add `n` pages to `owner`'s reservation; False (and nothing reserved) if they are not free."""
        if n < 0:
            raise ValueError("cannot reserve a negative number of pages")
        if n > self.free:
            return False
        self.held[owner] = self.held.get(owner, 0) + n
        return True

    def release(self, owner: str) -> int:
        return self.held.pop(owner, 0)
