"""The API key both fronts check (`--api-key` / `PDSERVE_API_KEY`): `Authorization: Bearer KEY` over HTTP,
metadata `authorization: Bearer KEY` over gRPC, compared in constant time."""

from __future__ import annotations

import hmac


class ApiKey:
    MISSING = "invalid or missing API key"

    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("an API key must not be empty")
        self._expected = key.encode()

    def accepts(self, authorization: str) -> bool:
        """Whether an `authorization` value (`Bearer KEY`, the scheme in any case) carries the key."""
        scheme, _, token = authorization.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._expected)
