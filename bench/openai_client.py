"""The benchmark's OpenAI-API client (`--backend openai-completions|openai-chat`): drives any OpenAI-compatible
server (pdserve's HTTP front, vLLM, llama.cpp's `llama-server`, ...) with the same requests, arrival times and
metric definitions as the gRPC client.

Each request is one streamed POST (`stream: true`, `stream_options.include_usage`) over its own HTTP connection:
a chunk that carries text is a token arrival (TTFT is the first; ITL the gaps between them); the output and prompt
token counts come from the final usage chunk when the server sends one, else the output is the number of text
chunks. Token-id workloads go to `/v1/completions` as token arrays; for `/v1/chat/completions` they are decoded to
text with the model's tokenizer (`--model`) and sent as one user message."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from bench.client import BenchClient, ClientOptions, ServerInfo
from bench.stats import RequestRecord
from bench.workload import BenchRequest
from llama_relax.errors import UserError

BACKENDS = ("grpc", "openai-completions", "openai-chat")


@dataclass(frozen=True)
class HttpTarget:
    host: str
    port: int
    prefix: str  # the path before /v1 ("" for most servers)

    @classmethod
    def parse(cls, url: str) -> HttpTarget:
        u = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if u.scheme != "http" or not u.hostname or u.port is None:
            raise ValueError(f"an OpenAI server address is http://HOST:PORT[/prefix], got {url!r}")
        return cls(u.hostname, u.port, u.path.rstrip("/").removesuffix("/v1"))

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}{self.prefix}"


def _carries_token(choice: dict, chat: bool) -> bool:
    """A chunk that delivers a token: text (even "", for a model without a tokenizer), but not a chat stream's
    role-only opening chunk nor an empty closing chunk that only carries the finish reason."""
    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    if text:
        return True
    role_only = chat and "role" in (choice.get("delta") or {})
    return text is not None and choice.get("finish_reason") is None and not role_only


class OpenAIBenchClient(BenchClient):
    """`BenchClient`'s interface over HTTP. `detokenize(ids) -> text` is needed for chat with token-id prompts."""

    def __init__(
        self,
        url: str,
        options: ClientOptions,
        chat: bool,
        api_key: str | None = None,
        detokenize: Callable[[Sequence[int]], str] | None = None,
    ) -> None:
        self.addr = url
        self.options = options
        self.target = HttpTarget.parse(url)
        self.chat = chat
        self.headers = {
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {api_key}"} if api_key else {}),
        }
        self.detokenize = detokenize
        self.model = ""
        self._init_tracking()

    def close(self) -> None:
        self._cancel_all()

    def _connect(self, timeout_s: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.target.host, self.target.port, timeout=timeout_s)

    def info(self, timeout_s: float = 10.0) -> ServerInfo:
        conn = self._connect(timeout_s)
        try:
            conn.request("GET", f"{self.target.prefix}/v1/models", headers=self.headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise UserError(f"GET /v1/models from {self.target} failed: HTTP {resp.status}: {body[:200]!r}")
            card = json.loads(body)["data"][0]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise UserError(f"GET /v1/models from {self.target} failed: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
        meta = card.get("meta") or {}  # llama.cpp's server puts the model's sizes here
        self.model = card.get("id", "")
        vocab = card.get("vocab_size") or meta.get("n_vocab") or 0
        context = card.get("max_model_len") or meta.get("n_ctx_train") or 0
        # 0 when the card does not say: fine for side B (the workload comes from side A's sizes)
        return ServerInfo(self.model, "openai", int(vocab), int(context), True)

    def worker_pid(self, role: str) -> int | None:
        return None  # an OpenAI server has no worker roles to fault

    def pool_sizes(self) -> dict[str, int]:
        raise NotImplementedError("an OpenAI server reports no pools")  # the sampler skips the samples

    def _prepare(self, req: BenchRequest) -> bytes:
        body: dict = {
            "model": self.model or None,
            "max_tokens": req.output_len,
            "temperature": self.options.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.options.ignore_eos:
            body["ignore_eos"] = True
        if self.chat:
            text = req.text
            if text is None:
                if self.detokenize is None:
                    raise UserError("--backend openai-chat with token-id prompts needs --model (its tokenizer)")
                text = self.detokenize(req.token_ids)
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = req.text if req.text is not None else list(req.token_ids)
        return json.dumps({k: v for k, v in body.items() if v is not None}).encode()

    def _one(self, msg: bytes, target: int, slots: threading.BoundedSemaphore, bar: tqdm | None) -> RequestRecord:
        chunks: list[float] = []
        usage = None
        sent = time.perf_counter()
        conn = self._connect(self.options.request_timeout_s)
        self._track(conn)
        try:
            path = f"{self.target.prefix}/v1/{'chat/completions' if self.chat else 'completions'}"
            conn.request("POST", path, body=msg, headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                detail = resp.read()[:300].decode(errors="replace")
                return RequestRecord(sent, time.perf_counter(), (), 0, 0, target, f"HTTP_{resp.status}", detail)
            finished = False
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    err = event["error"]
                    code = str(err.get("code") or err.get("type") or "error")
                    return RequestRecord(
                        sent, time.perf_counter(), tuple(chunks), len(chunks), 0, target, code, str(err)
                    )
                usage = event.get("usage") or usage
                for choice in event.get("choices") or ():
                    if _carries_token(choice, self.chat):
                        chunks.append(time.perf_counter())
                    finished = finished or choice.get("finish_reason") is not None
            done = time.perf_counter()
            if not finished:
                return RequestRecord(
                    sent, done, tuple(chunks), len(chunks), 0, target, "NO_FINAL", "stream ended early"
                )
            out = (usage or {}).get("completion_tokens") or len(chunks)
            prompt = (usage or {}).get("prompt_tokens") or 0
            cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            return RequestRecord(sent, done, tuple(chunks), out, prompt, target, cached_tokens=cached)
        except (OSError, http.client.HTTPException, ValueError) as e:
            return RequestRecord(
                sent, time.perf_counter(), tuple(chunks), len(chunks), 0, target, type(e).__name__, str(e)
            )
        finally:
            self._untrack(conn)
            conn.close()
            slots.release()
            if bar is not None:
                bar.update(1)

    def _abort(self, conn: http.client.HTTPConnection) -> None:
        if conn.sock is not None:
            conn.sock.close()  # a server sees the disconnect and cancels the request
