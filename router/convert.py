"""The one place that converts between the wire (protobuf, `pdserve.v1`) and the internal frozen dataclasses,
and validates client input on the way in (errors name the offending field)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import grpc

from engine.messages import ErrorKind, GenerationRequest
from llama_relax.config import LlamaConfig
from llama_relax.generation import TokenEvent
from llama_relax.sampling import MAX_LOGPROBS, MAX_STOP_STRINGS, SamplingParams, resolve_seed
from protos import generate_pb2 as pb
from router.openai_schema import ChatCompletionRequest, CompletionRequest

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
