"""What the serving engine puts in a KV header's opaque `meta` bytes: the token that continues the sequence.

The prefill worker samples the first output token and sends it with the KV, so the decode worker can start the
sequence the moment the import is done (no round trip through the router). A prompt's KV may come in several
pieces (streamed while later prefill chunks compute): every piece but the last carries `PARTIAL` instead, and only
the last, with the first token, commits the request. msgpack, versioned, bounded."""

from __future__ import annotations

import math

import msgpack

from kvtransfer.payload import ErrorCode, PayloadError
from llama_relax.generation import FinishReason, TokenEvent
from llama_relax.sampling import MAX_LOGPROBS, TokenLogprob

META_VERSION = 1
PARTIAL = msgpack.packb({"v": META_VERSION, "partial": True})  # a piece of the prompt's KV; more will follow


def is_partial(meta: bytes) -> bool:
    """Whether a KV header's meta marks a non-final piece (anything else must decode as a first token)."""
    return meta == PARTIAL


def encode_first_token(event: TokenEvent) -> bytes:
    """`event` (its id, top logprobs, own logprob and finish reason; the text is re-derived by the receiver) as
    meta bytes."""
    finish = event.finish_reason.value if event.finish_reason is not None else None
    lps = [[lp.token_id, lp.logprob] for lp in event.logprobs]
    meta = {"v": META_VERSION, "token": event.token_id, "logprobs": lps, "finish": finish, "lp": event.logprob}
    return msgpack.packb(meta)


def decode_first_token(meta: bytes) -> TokenEvent:
    """The first token carried by a KV header; MALFORMED `PayloadError` when absent or not of this form."""
    try:
        d = msgpack.unpackb(meta, raw=False, strict_map_key=True, max_array_len=2 * MAX_LOGPROBS + 2)
    except Exception as e:  # msgpack raises several types
        raise PayloadError(ErrorCode.MALFORMED, f"KV meta is not msgpack: {type(e).__name__}") from None
    ok = (
        isinstance(d, dict)
        and d.get("v") == META_VERSION
        and type(d.get("token")) is int
        and isinstance(d.get("logprobs"), list)
        and (d.get("finish") is None or d.get("finish") in {r.value for r in FinishReason})
        and (d.get("lp") is None or (type(d.get("lp")) is float and not math.isnan(d["lp"])))
    )
    if not ok:
        raise PayloadError(ErrorCode.MALFORMED, "KV meta does not carry a first token")
    try:
        lps = tuple(TokenLogprob(int(t), float(lp)) for t, lp in d["logprobs"])
    except (TypeError, ValueError):
        raise PayloadError(ErrorCode.MALFORMED, "KV meta has malformed logprobs") from None
    if len(lps) > MAX_LOGPROBS or any(math.isnan(lp.logprob) for lp in lps):
        raise PayloadError(ErrorCode.MALFORMED, "KV meta has malformed logprobs")
    finish = FinishReason(d["finish"]) if d["finish"] is not None else None
    return TokenEvent(d["token"], "", lps, finish, d.get("lp"))
