"""The one place that converts between the wire (protobuf, `pdserve.v1`) and the internal frozen dataclasses,
and validates client input on the way in (errors name the offending field)."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

import grpc

from engine.messages import ErrorKind, GenerationRequest
from llama_relax.config import LlamaConfig
from llama_relax.generation import TokenEvent
from llama_relax.sampling import MAX_LOGPROBS, MAX_STOP_STRINGS, SamplingParams, resolve_seed
from protos import generate_pb2 as pb
from router.openai_schema import ChatCompletionRequest, CompletionRequest
from router.record import RequestRecord

DEFAULT_MAX_TOKENS = 64
MAX_REQUEST_ID_CHARS = 128  # the KV header allows 256; attempts add a short "~n" suffix
REQUEST_ID_CHARSET = re.compile(r"[A-Za-z0-9._:/@+=-]+")

STATUS_FOR_ERROR = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.EVICTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.TRANSFER_FAILED: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


class InvalidArgument(ValueError):
    """Client input the router refuses; `field` is the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ModelLimits:
    """What validation needs to know about the served model."""

    vocab_size: int
    context_window_size: int

    @classmethod
    def of(cls, config: LlamaConfig) -> ModelLimits:
        return cls(config.vocab_size, config.context_window_size)


def sampling_from_pb(s: pb.SamplingParams) -> SamplingParams:
    """Sampling parameters with defaults for unset fields; range errors name the field."""
    max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    temperature = s.temperature if s.HasField("temperature") else 1.0
    top_p = s.top_p if s.HasField("top_p") else 1.0
    top_k = s.top_k if s.HasField("top_k") else 0
    checks = [
        ("sampling.max_tokens", max_tokens >= 1, f"must be >= 1, got {max_tokens}"),
        ("sampling.temperature", temperature >= 0, f"must be >= 0, got {temperature}"),
        ("sampling.top_p", 0 < top_p <= 1, f"must be in (0, 1], got {top_p}"),
        ("sampling.top_k", top_k >= 0, f"must be >= 0, got {top_k}"),
        (
            "sampling.stop",
            len(s.stop) <= MAX_STOP_STRINGS,
            f"at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}",
        ),
        ("sampling.stop", all(s.stop), "stop strings must be non-empty"),
        ("sampling.logprobs", s.logprobs <= MAX_LOGPROBS, f"must be <= {MAX_LOGPROBS}, got {s.logprobs}"),
        ("sampling.seed", not s.HasField("seed") or s.seed < 2**63, "must be < 2**63"),
    ]
    for field, ok, message in checks:
        if not ok:
            raise InvalidArgument(field, message)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
    )


def request_from_pb(req: pb.GenerateRequest, limits: ModelLimits, tokenizer) -> GenerationRequest:
    """Validate and tokenize a client request into the workers' `GenerationRequest` (seed made concrete)."""
    params = sampling_from_pb(req.sampling)
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgument("prompt", "give prompt text or token_ids")
    if kind == "text":
        if not req.text:
            raise InvalidArgument("text", "the prompt is empty")
        if tokenizer is None:
            raise InvalidArgument("text", "this model has no tokenizer; send token_ids")
        text = req.text
        if req.chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = tuple(tokenizer.encode(text))
    else:
        if req.chat:
            raise InvalidArgument("chat", "chat needs a text prompt")
        ids = tuple(req.token_ids.ids)
    if not ids:
        raise InvalidArgument("token_ids" if kind == "token_ids" else "text", "the prompt is empty")
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidArgument("token_ids", f"unknown token id {bad} (vocabulary size {limits.vocab_size})")
    bad_stop = next((t for t in params.stop_token_ids if not 0 <= t < limits.vocab_size), None)
    if bad_stop is not None:
        raise InvalidArgument("sampling.stop_token_ids", f"unknown token id {bad_stop}")
    if len(ids) + params.max_tokens > limits.context_window_size:
        raise InvalidArgument(
            "sampling.max_tokens",
            f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context window "
            f"({limits.context_window_size})",
        )
    return GenerationRequest(request_id_from_pb(req.request_id), ids, resolve_seed(params))


def request_id_from_pb(request_id: str) -> str:
    """The client's request id (checked: it travels to the workers and into KV headers), or a fresh one."""
    if not request_id:
        return uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
    if not REQUEST_ID_CHARSET.fullmatch(request_id):
        raise InvalidArgument("request_id", "only letters, digits and . _ : / @ + = - are allowed")
    return request_id


def event_to_pb(request_id: str, event: TokenEvent) -> pb.GenerateResponse:
    out = pb.GenerateResponse(request_id=request_id, token_ids=[event.token_id], text=event.text)
    if event.logprobs:
        out.logprobs.append(
            pb.TopLogprobs(entries=[pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob) for lp in event.logprobs])
        )
    if event.finish_reason is not None:
        out.finish_reason = event.finish_reason.value
    return out


def final_to_pb(msg: pb.GenerateResponse, rec: RequestRecord) -> pb.GenerateResponse:
    """The last message: the last token (and its finish reason) plus the request's usage and timings."""
    end = rec.ended_at or time.monotonic()
    first_at, p = rec.first_token_at or end, rec.prefill
    msg.usage.CopyFrom(
        pb.Usage(
            prompt_tokens=rec.prompt_tokens,
            completion_tokens=rec.completion_tokens,
            cached_prompt_tokens=min(rec.cached_tokens, rec.prompt_tokens),
        )
    )
    msg.timings.CopyFrom(
        pb.Timings(
            queue_s=p.queue_s if p else 0.0,
            prefill_s=p.prefill_s if p else 0.0,
            kv_transfer_s=p.transfer_s if p else 0.0,
            first_token_s=first_at - rec.arrival,
            decode_s=end - first_at,
            e2e_s=end - rec.arrival,
            migrations=rec.migrations,
            admission_wait_s=rec.queue_wait_s,
            kv_transfer_bytes=p.kv_bytes if p else 0,
            kv_export_s=p.export_s if p else 0.0,
            kv_wire_s=max(0.0, p.transfer_s - p.import_s) if p else 0.0,
            kv_import_s=p.import_s if p else 0.0,
            kv_tail_s=p.tail_s if p else 0.0,
            spec_draft_tokens=rec.spec_drafted,
            spec_accepted_tokens=rec.spec_accepted,
        )
    )
    return msg


# ---- the OpenAI HTTP API (router.http_api) ---------------------------------------------------------------------
# a field named by the shared validation (the gRPC names) -> the OpenAI parameter it came from
_OPENAI_PARAM = {
    "sampling.max_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.stop": "stop",
    "sampling.logprobs": "logprobs",
    "sampling.seed": "seed",
    "token_ids": "prompt",
    "text": "prompt",
}
MAX_SEED = 2**63


def request_from_openai(
    body: CompletionRequest | ChatCompletionRequest, limits: ModelLimits, tokenizer, model_name: str
) -> GenerationRequest:
    """Validate and tokenize an OpenAI completions or chat body into a `GenerationRequest`, through the same
    checks as the gRPC API (so the same prompt gives the same request); errors name the OpenAI parameter."""
    chat = isinstance(body, ChatCompletionRequest)
    if (name := body.unsupported()) is not None:
        raise InvalidArgument(name, f"{getattr(body, name)!r} is not supported (pdserve serves n=1, no tools)")
    if body.model not in (None, "", model_name):
        raise InvalidArgument("model", f"this server serves {model_name!r}, not {body.model!r}")
    if body.seed is not None and not 0 <= body.seed < MAX_SEED:
        raise InvalidArgument("seed", f"must be in [0, 2**63), got {body.seed}")
    max_tokens = body.max_tokens
    if chat and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    logprobs = 0 if chat else (body.logprobs or 0)
    if chat and body.logprobs:
        logprobs = max(1, body.top_logprobs or 0)  # the chosen token's logprob rides with the top list
    elif chat and body.top_logprobs:
        raise InvalidArgument("top_logprobs", "needs logprobs: true")
    s = pb.SamplingParams(stop=stop, ignore_eos=body.ignore_eos, logprobs=logprobs)
    for field in ("temperature", "top_p", "top_k", "seed"):
        if getattr(body, field) is not None:
            setattr(s, field, getattr(body, field))
    if max_tokens is not None:
        s.max_tokens = max_tokens
    prompt_field = "messages" if chat else "prompt"
    try:
        req = pb.GenerateRequest(sampling=s, token_ids=pb.TokenIds(ids=_openai_prompt(body, tokenizer)))
        return request_from_pb(req, limits, tokenizer)
    except InvalidArgument as e:
        name = (
            "max_completion_tokens"
            if chat and e.field == "sampling.max_tokens" and body.max_completion_tokens
            else None
        )
        param = name or _OPENAI_PARAM.get(e.field, e.field)
        raise InvalidArgument(prompt_field if param == "prompt" else param, str(e).split(": ", 1)[-1]) from None
    except ValueError as e:  # out-of-range ints from protobuf
        raise InvalidArgument(prompt_field, str(e)) from None


def _openai_prompt(body: CompletionRequest | ChatCompletionRequest, tokenizer) -> list[int]:
    """The prompt's token ids: a chat's messages through the model's chat template, or a completion's prompt."""
    if isinstance(body, ChatCompletionRequest):
        if tokenizer is None:
            raise InvalidArgument("messages", "this model has no tokenizer: use /v1/completions with token ids")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise InvalidArgument("messages", str(e)) from None
        return list(tokenizer.encode(text))
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidArgument("prompt", f"one prompt per request (got {len(prompt)}): send them one by one")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidArgument("prompt", "the prompt is empty")
        if tokenizer is None:
            raise InvalidArgument("prompt", "this model has no tokenizer: send token ids")
        return list(tokenizer.encode(prompt))
    if not prompt:
        raise InvalidArgument("prompt", "the prompt is empty")
    return list(prompt)


class OpenAIShape:
    """OpenAI response bodies for one request (completions or chat, whole or chunked)."""

    def __init__(
        self,
        model: str,
        tokenizer,
        body: CompletionRequest | ChatCompletionRequest,
        req: GenerationRequest,
        created: float,
    ) -> None:
        self.chat = isinstance(body, ChatCompletionRequest)
        self.rid = req.request_id
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + req.request_id
        self.created = int(created)
        self.model = model
        self.tokenizer = tokenizer
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.want_logprobs = bool(body.logprobs)
        self.top_n = (body.top_logprobs or 0) if self.chat else (body.logprobs or 0)
        self.offset = 0  # completions: text offset of the next token

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.token_to_str(token_id) if self.tokenizer is not None else f"token_id:{token_id}"

    def _logprobs(self, events: list[TokenEvent]) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            content = []
            for e in events:
                tok = self._token(e.token_id)
                top = [
                    {"token": (t := self._token(lp.token_id)), "logprob": lp.logprob, "bytes": list(t.encode())}
                    for lp in e.logprobs[: self.top_n]
                ]
                content.append({"token": tok, "logprob": e.logprob, "bytes": list(tok.encode()), "top_logprobs": top})
            return {"content": content}
        tokens = [self._token(e.token_id) for e in events]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [{self._token(lp.token_id): lp.logprob for lp in e.logprobs} for e in events],
            "text_offset": offsets,
        }

    def _usage(self, rec: RequestRecord) -> dict:
        return {
            "prompt_tokens": rec.prompt_tokens,
            "completion_tokens": rec.completion_tokens,
            "total_tokens": rec.prompt_tokens + rec.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": min(rec.cached_tokens, rec.prompt_tokens)},
        }

    def _choice(self, events: list[TokenEvent], text: str, finish: str | None, delta: bool) -> dict:
        choice: dict = {"index": 0}
        if self.chat:
            choice["delta" if delta else "message"] = (
                {"content": text} if delta else {"role": "assistant", "content": text}
            )
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(events)
        choice["finish_reason"] = finish
        return choice

    def whole(self, events: list[TokenEvent], rec: RequestRecord) -> dict:
        finish = events[-1].finish_reason.value if events and events[-1].finish_reason else None
        text = "".join(e.text for e in events)
        return {**self._head(False), "choices": [self._choice(events, text, finish, False)], "usage": self._usage(rec)}

    def first_chunk(self) -> dict:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return {**self._head(True), "choices": [choice]}

    def chunk(self, e: TokenEvent) -> dict:
        finish = e.finish_reason.value if e.finish_reason is not None else None
        return {**self._head(True), "choices": [self._choice([e], e.text, finish, True)]}

    def usage_chunk(self, rec: RequestRecord) -> dict:
        return {**self._head(True), "choices": [], "usage": self._usage(rec)}
