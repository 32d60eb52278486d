"""The OpenAI-compatible HTTP API end to end: a real `pdserve serve` (1 prefill + 1 decode worker, Ray on
loopback) serving the bundled SmolLM2 GGUF (its tokenizer and chat template), driven with the official `openai`
SDK, `curl` and raw HTTP: chat and completions, streaming and not, greedy output equal to the gRPC API's, logprobs,
stop strings, every error status, the API key on both fronts, concurrent streams, and a disconnect that frees
the pages."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from conftest import real_gguf_path
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import Server, assert_clean_exit, collect

from kvtransfer.net import free_port
from protos import generate_pb2 as pb
from protos import generate_pb2_grpc as pb_grpc

openai = pytest.importorskip("openai")  # a test dependency (the `test` extra)

KEY = "sk-test-0123456789"
QUESTION = "What is the capital of France?"
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the served model's id: the file name


@pytest.fixture(scope="module")
def gguf():
    path = real_gguf_path()
    if path is None:
        pytest.skip("bundled GGUF not available (set PDSERVE_TEST_GGUF)")
    return path


@pytest.fixture(scope="module")
def server(gguf, cache_dir):
    port = free_port()
    flags = ["--model", str(gguf), "--http-port", str(port), "--api-key", KEY, "--max-total-seq-len", "4096"]
    flags += ["--max-batch-size", "4", "--max-queued-requests", "1", "--max-queue-wait-s", "0.5"]
    flags += ["--stall-timeout", "3", "--recovery-timeout", "1"]
    s = Server(flags, cache_dir, api_key=KEY)
    s.http_port = port
    yield s
    assert_clean_exit(s)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=KEY, max_retries=0)


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=body, headers={k: v for k, v in hdrs.items() if v is not None})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if data.startswith(b"{") else data.decode())


def grpc_greedy(server, text: str, max_tokens: int, chat: bool) -> tuple[str, list[int]]:
    s = pb.SamplingParams(max_tokens=max_tokens, temperature=0)
    responses = collect(server.stub, pb.GenerateRequest(text=text, chat=chat, sampling=s))
    return "".join(r.text for r in responses), [t for r in responses for t in r.token_ids]


def test_models_and_health(server, client):
    (model,) = client.models.list().data
    assert model.id == MODEL
    assert raw(server, "GET", "/health", headers={"Authorization": None}) == (200, {"status": "ok"})


def test_chat_greedy_equals_the_grpc_api_streaming_or_not(server, client):
    want, ids = grpc_greedy(server, QUESTION, 24, chat=True)
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == want and "Paris" in want
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    assert whole.usage.completion_tokens == len(ids) and whole.usage.total_tokens == whole.usage.prompt_tokens + len(
        ids
    )
    assert whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    # the second identical prompt finds its KV in the prefix caches
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_completions_text_and_token_ids_equal_the_grpc_api(server, client):
    want, _ = grpc_greedy(server, "The capital of France is", 12, chat=False)
    got = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert got.choices[0].text == want and got.object == "text_completion"
    prompt_ids = list(
        collect(
            server.stub,
            pb.GenerateRequest(
                text="The capital of France is", sampling=pb.SamplingParams(max_tokens=1, temperature=0)
            ),
        )[0].prompt_token_ids
    )
    streamed = list(
        client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == want


def test_logprobs_chat_and_completions(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        lps = [t.logprob for t in entry.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(lps[0])  # greedy
    c = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_stop_strings_end_the_output_before_them(client):
    full = (
        client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = full.strip().split()[1]  # a word inside the greedy output
    got = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, stop=[stop]
    )
    assert got.choices[0].finish_reason == "stop"
    assert stop not in got.choices[0].text and full.startswith(got.choices[0].text)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 3}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, "model"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, "frobnicate"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_parameters_are_400_naming_them(server, body, param):
    status, err = raw(server, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param and param in err["error"]["message"]


def test_malformed_json_unknown_route_and_the_sdk_errors(server, client):
    status, err = raw(server, "POST", "/v1/completions", b"{not json")
    assert status == 400 and "malformed JSON" in err["error"]["message"]
    status, err = raw(server, "POST", "/v1/completions", json.dumps({"prompt": [99999999], "max_tokens": 2}).encode())
    assert status == 400 and err["error"]["param"] == "prompt"
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, n=3)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"


def test_the_api_key_guards_both_fronts_but_not_health(server):
    status, err = raw(server, "GET", "/v1/models", headers={"Authorization": None})
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    assert raw(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    plain = pb_grpc.GenerationStub(server.channel)  # no authorization metadata
    with pytest.raises(grpc.RpcError) as e:
        plain.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        collect(plain, pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=2)))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_curl_sees_sse_framing(server):
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "stream": True})
    out = subprocess.run(
        [
            "curl",
            "-sN",
            f"http://127.0.0.1:{server.http_port}/v1/completions",
            "-H",
            f"Authorization: Bearer {KEY}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    events = out.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2]) and len(chunks) == 5
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]


def test_concurrent_streams_and_a_client_deadline(server, client):
    prompts = [f"Write a short poem about the number {i}." for i in range(4)]

    def run(p: str) -> str:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=16, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with cf.ThreadPoolExecutor(4) as ex:
        together = list(ex.map(run, prompts))
    assert together == [run(p) for p in prompts] and all(together)
    body = json.dumps({"prompt": "Count to a thousand:", "max_tokens": 2000, "ignore_eos": True}).encode()
    status, err = raw(server, "POST", "/v1/completions", body, headers={"X-Request-Timeout": "0.5"})
    assert status == 504 and err["error"]["code"] == "deadline_exceeded"
    assert server.pages_all_free()


def test_a_client_that_disconnects_mid_stream_frees_the_pages(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    body = json.dumps({"prompt": "Count slowly:", "max_tokens": 2000, "ignore_eos": True, "stream": True})
    conn.request(
        "POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    assert resp.readline().startswith(b"data: {")  # it is streaming
    time.sleep(0.3)
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    assert server.pages_all_free(30), server.workers()
    running = sum(w.running for w in server.workers())
    assert running == 0


def test_too_many_requests_is_429_and_no_decode_worker_is_503(server, client):
    body = json.dumps({"prompt": "Count:", "max_tokens": 300, "ignore_eos": True}).encode()
    with cf.ThreadPoolExecutor(8) as ex:  # 4 run, 1 may wait, the rest are refused
        statuses = list(ex.map(lambda _: raw(server, "POST", "/v1/completions", body)[0], range(8)))
    assert 429 in statuses and 200 in statuses, statuses
    decode = server.pids("decode")[0]
    os.kill(decode, signal.SIGSTOP)  # the decode pool has no live worker once the stall timeout passes
    try:
        deadline = time.monotonic() + 30
        while raw(server, "GET", "/health")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert raw(server, "GET", "/health")[0] == 503
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["type"] == "service_unavailable"
    finally:
        os.kill(decode, signal.SIGCONT)
    server.wait_alive("decode", 1)
    assert server.pages_all_free(30)


def test_no_api_key_on_a_non_loopback_host_warns(gguf, cache_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pdserve", "serve", "--host", "0.0.0.0", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "without an API key" in out.stderr + out.stdout
