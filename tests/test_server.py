"""The OpenAI-compatible server on loopback, driven by the real `openai` client, over the real
engine with a tiny random Llama: completions and chat (streaming or not), stop sequences,
max_tokens, seeds, logprobs, usage, errors, API keys, metrics, client disconnects, 200 concurrent
streams, overload and graceful shutdown."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from starlette.applications import Starlette

from omniserve.cli import serve
from omniserve.cli.engine_args import engine_kwargs
from omniserve.engine.async_engine import AsyncEngine
from omniserve.engine.engine import EngineStats
from omniserve.server.app import create_app
from omniserve.server.serving import DrainingServer
from tiny_models import VOCAB_SIZE, save_servable

MODEL = "tiny-llama"
API_KEY = "sk-test-key"
ENGINE_OPTIONS: dict[str, Any] = dict(dtype="float32", device="cpu", page_size=16, num_kv_pages=64)
LONG = {"ignore_eos": True}
"""extra_body making a request run to max_tokens."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_servable("llama3", directory, max_position_embeddings=512)
    return directory


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 with an ephemeral port, in a background thread."""

    def __init__(self, engine: AsyncEngine, app: Starlette, drain: float = 0.0) -> None:
        self.engine = engine
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning")
        self.server = DrainingServer(config, engine, drain)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60
        )


def start_server(
    model_dir: Path, app_options: dict[str, Any] | None = None, drain: float = 0.0
) -> ServerThread:
    """`app_options`: `create_app`'s keyword arguments beyond the model name and the key;
    `drain`: the seconds `omniserve serve --shutdown-timeout` gives in-flight requests."""
    engine = AsyncEngine.from_pretrained(model_dir, max_queued_requests=1000, **ENGINE_OPTIONS)
    app = create_app(engine, model_name=MODEL, api_key=API_KEY, **(app_options or {}))
    return ServerThread(engine, app, drain)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerThread]:
    srv = start_server(model_dir)
    yield srv
    srv.stop()


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return server.client()


def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> EngineStats:
    deadline = time.monotonic() + timeout
    while True:
        s = engine.stats()
        if s.idle:
            return s
        assert time.monotonic() < deadline, f"engine not idle: {s}"
        time.sleep(0.01)


def greedy(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "temperature": 0.0, **kw}


def test_completion_usage_and_max_tokens(server: ServerThread, client: openai.OpenAI) -> None:
    prompt = "The quick brown fox"
    out = client.completions.create(prompt=prompt, max_tokens=12, extra_body=LONG, **greedy())
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert choice.finish_reason == "length" and choice.index == 0 and choice.text
    prompt_tokens = len(server.engine.tokenizer.encode(prompt))
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        prompt_tokens,
        12,
        prompt_tokens + 12,
    )
    # Token ids are a prompt too, and give the same continuation.
    by_ids = client.completions.create(
        prompt=server.engine.tokenizer.encode(prompt), max_tokens=12, extra_body=LONG, **greedy()
    )
    assert by_ids.choices[0].text == choice.text


def test_completion_stream_matches_non_stream(client: openai.OpenAI) -> None:
    kw = greedy(prompt="def add(a, b):", max_tokens=10, extra_body=LONG)
    whole = client.completions.create(**kw)
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert len({c.id for c in chunks}) == 1
    # Without include_usage there is no usage chunk.
    plain = list(client.completions.create(stream=True, **kw))
    assert plain[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in plain)


def test_chat_stream_and_non_stream(server: ServerThread, client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}],
        },
    ]
    whole = client.chat.completions.create(
        messages=messages, max_tokens=10, extra_body=LONG, **greedy()
    )
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert (
        whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    )
    tokenizer = server.engine.tokenizer
    template = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello world"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt_tokens = len(tokenizer.encode(template, add_special_tokens=False))
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 10)

    chunks = list(
        client.chat.completions.create(
            messages=messages,
            max_completion_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=LONG,
            **greedy(),
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_without_max_tokens_runs_to_the_context_limit(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}], extra_body=LONG, **greedy()
    )
    assert out.usage is not None and out.usage.total_tokens == 512  # max_position_embeddings
    assert out.choices[0].finish_reason == "length"


def test_stop_sequences(client: openai.OpenAI) -> None:
    kw = greedy(prompt="Hello world", max_tokens=24, extra_body=LONG)
    text = client.completions.create(**kw).choices[0].text
    # A two-character stop string from the middle of the greedy text, free of replacement chars.
    start = next(i for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    expected = text[: text.find(stop)]
    out = client.completions.create(stop=stop, **kw)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "stop")
    assert out.usage is not None and out.usage.completion_tokens < 24
    streamed = list(client.completions.create(stop=["never appears", stop], stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=24,
        stop=[stop],
        extra_body=LONG,
        **greedy(),
    )
    assert stop not in (chat.choices[0].message.content or "")


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    kw = dict(
        model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, extra_body=LONG
    )
    first = client.completions.create(seed=1234, **kw).choices[0].text
    assert client.completions.create(seed=1234, **kw).choices[0].text == first
    streamed = client.completions.create(seed=1234, stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed) == first
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert others != {first}, "different seeds should be able to differ"


def test_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(
        prompt="Hello", max_tokens=5, logprobs=3, extra_body=LONG, **greedy()
    )
    lp = out.choices[0].logprobs
    assert (
        lp is not None
        and lp.tokens is not None
        and lp.token_logprobs is not None
        and lp.top_logprobs is not None
    )
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the most likely
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]

    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        extra_body=LONG,
        **greedy(),
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(
            entry.logprob
        )
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}], max_tokens=2, **greedy()
    )
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(
    ("kw", "status", "param", "code"),
    [
        (dict(n=2), 400, "n", None),
        (dict(temperature=-1.0), 400, None, None),
        (dict(top_p=0.0), 400, None, None),
        (dict(max_tokens=0), 400, "max_tokens", None),
        (dict(extra_body={"temperature": "hot"}), 400, "temperature", None),
        (dict(extra_body={"logit_bias": {"5": 1.0}}), 400, "logit_bias", None),
        (dict(prompt=["one", "two"]), 400, "prompt", None),
        (dict(prompt="hello " * 600), 400, "prompt", "context_length_exceeded"),
        (dict(prompt=[9999]), 400, None, None),
        (dict(model="gpt-5"), 404, "model", "model_not_found"),
    ],
)
def test_completion_errors(
    client: openai.OpenAI, kw: dict[str, Any], status: int, param: str | None, code: str | None
) -> None:
    request = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **kw}
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**request)
    error = info.value
    assert error.status_code == status
    assert isinstance(error.body, dict) and error.body["message"]
    assert error.body["type"] == "invalid_request_error"
    assert (error.body["param"], error.body["code"]) == (param, code)


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
        (
            dict(
                messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            ),
            "messages",
        ),
        (dict(top_logprobs=2), "top_logprobs"),
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (dict(n=3), "n"),
    ],
)
def test_chat_errors(client: openai.OpenAI, kw: dict[str, Any], param: str) -> None:
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **kw,
    }
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == param


def test_malformed_bodies_and_unknown_routes(server: ServerThread) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=auth) as http:
        for body in (b"{not json", b'{"prompt": "hi"}', b"[1, 2]"):
            r = http.post("/v1/completions", content=body)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert (
            http.post("/v1/completions", content=b'{"prompt": "hi"}').json()["error"]["param"]
            == "model"
        )
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()
        assert http.get("/v1/completions").status_code == 405


def test_out_of_range_values_are_400s_and_the_engine_keeps_serving(server: ServerThread) -> None:
    """Values a step would trip over (a stop id past the vocabulary killed the engine; integers
    past the scheduler's range escaped as plain-text 500s) are refused at intake, in JSON."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as http:
        for extra, field in (
            ({"stop_token_ids": [VOCAB_SIZE]}, "stop_token_ids"),
            ({"stop_token_ids": [2**40]}, "stop_token_ids"),
            ({"max_tokens": 2**64}, "max_tokens"),
            ({"max_tokens": 10**9}, "max_tokens"),
        ):
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **extra}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["type"] == "invalid_request_error"
            assert field in r.json()["error"]["message"]
        assert http.get("/health").status_code == 200
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    wait_idle(server.engine)


def test_unknown_fields_are_named_in_a_400_unless_allowed(
    server: ServerThread, client: openai.OpenAI, model_dir: Path
) -> None:
    """A misspelt `max_token` used to be dropped silently (16 tokens generated)."""
    request = {"model": MODEL, "prompt": "hi", "extra_body": {"max_token": 3, **LONG}}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**request)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "max_token"
    assert "max_token" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"bogus": 1}
        )
    lenient = start_server(model_dir, {"allow_unknown_fields": True})
    try:
        out = lenient.client().completions.create(**request)
        assert out.usage is not None and out.usage.completion_tokens == 16  # the default
    finally:
        lenient.stop()
    wait_idle(server.engine)


def test_chat_works_on_the_bundled_model() -> None:
    """The README's chat example against the default model, which ships a chat template."""
    from omniserve.engine.engine import bundled_model_path

    srv = start_server(bundled_model_path())
    try:
        out = srv.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Write fibonacci"}], max_tokens=8
        )
        assert out.choices[0].message.content and out.usage is not None
    finally:
        srv.stop()


def test_a_model_without_a_chat_template_says_how_to_give_one(
    model_dir: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    srv = start_server(plain)
    try:
        with pytest.raises(openai.BadRequestError) as info:
            srv.client().chat.completions.create(**chat)
        assert "--chat-template" in str(info.value)
    finally:
        srv.stop()
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    srv = start_server(plain, {"chat_template": template})
    try:
        assert srv.client().chat.completions.create(**chat).usage is not None
    finally:
        srv.stop()


def test_oversized_bodies_get_413_and_overlong_texts_are_not_tokenized(
    model_dir: Path,
) -> None:
    """A body past --max-request-bytes is refused before it is read whole (declared length) or
    as soon as it passes the limit (chunked); a text longer than max_model_len tokens could hold
    is refused on its length in characters."""
    srv = start_server(model_dir, {"max_request_bytes": 4096})
    auth = {"Authorization": f"Bearer {API_KEY}"}
    big = json.dumps({"model": MODEL, "prompt": "x" * 5000, "max_tokens": 2}).encode()
    try:
        with httpx.Client(base_url=srv.url, headers=auth, timeout=60) as http:
            r = http.post("/v1/completions", content=big)
            assert r.status_code == 413 and "4,096 bytes" in r.json()["error"]["message"]
            r = http.post("/v1/completions", content=iter([big[:3000], big[3000:]]))
            assert r.status_code == 413
            ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
            assert http.post("/v1/completions", json=ok).status_code == 200
    finally:
        srv.stop()
    srv = start_server(model_dir)
    try:
        with httpx.Client(base_url=srv.url, headers=auth, timeout=60) as http:
            body = {"model": MODEL, "prompt": "x" * 3_000_000, "max_tokens": 2}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            assert "characters" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_api_key_is_required_except_for_health(server: ServerThread) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(api_key="wrong-key").completions.create(
            model=MODEL, prompt="hi", max_tokens=2
        )
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").models.list()
    no_key = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert no_key.status_code == 401 and no_key.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 401
    ok = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("another-model")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format: `# HELP`/`# TYPE` comments and `name{labels} value` samples."""
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert types, "no TYPE lines"
    for name in samples:
        base = name.split("{")[0]
        assert any(base == t or base.startswith(t + "_") for t in types), f"{name} has no TYPE"
    return samples


def scrape(server: ServerThread) -> tuple[httpx.Response, dict[str, float]]:
    response = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    return response, parse_metrics(response.text)


def test_metrics(server: ServerThread, client: openai.OpenAI) -> None:
    client.completions.create(prompt="metrics please", max_tokens=6, extra_body=LONG, **greedy())
    list(
        client.completions.create(
            prompt="and stream", max_tokens=6, stream=True, extra_body=LONG, **greedy()
        )
    )
    response, m = scrape(server)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert m["process_resident_memory_bytes"] > 0 and "python_info" in response.text
    assert m["omniserve_requests_running"] == 0 and m["omniserve_requests_waiting"] == 0
    assert m['omniserve_kv_pages_total{pool="dense"}'] == server.engine.stats().dense_pages_total
    assert m['omniserve_kv_pages_used{pool="dense"}'] == 0
    assert "omniserve_preemptions_total" in m and m["omniserve_generation_tokens_total"] >= 12
    assert m["omniserve_generation_tokens_per_second"] > 0
    assert m['omniserve_requests_finished_total{finish_reason="length"}'] >= 2
    for hist in ("omniserve_time_to_first_token_seconds", "omniserve_inter_token_latency_seconds"):
        assert m[f'{hist}_bucket{{le="+Inf"}}'] == m[f"{hist}_count"] > 0
        assert m[f"{hist}_sum"] > 0
    assert m["omniserve_inter_token_latency_seconds_count"] >= 10  # 5 gaps per request


def test_metrics_in_openmetrics_when_asked(server: ServerThread) -> None:
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Accept": "application/openmetrics-text; version=1.0.0",
    }
    response = httpx.get(server.url + "/metrics", headers=headers)
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "# TYPE omniserve_preemptions counter" in response.text


def test_repeated_prompts_hit_the_prefix_cache(server: ServerThread, client: openai.OpenAI) -> None:
    prompt = "the same long system prompt, " * 12  # several 16-token pages
    before = scrape(server)[1]
    texts = [
        client.completions.create(prompt=prompt, max_tokens=4, extra_body=LONG, **greedy())
        .choices[0]
        .text
        for _ in range(2)
    ]
    after = scrape(server)[1]
    hits = after["omniserve_prefix_cache_hits_total"] - before["omniserve_prefix_cache_hits_total"]
    queries = "omniserve_prefix_cache_queries_total"
    assert hits >= 3 * 16 and after[queries] - before[queries] > hits
    assert texts[0] == texts[1] and after["omniserve_prefix_cache_pages"] > 0


def test_overloaded_queue_answers_503(server: ServerThread, client: openai.OpenAI) -> None:
    server.engine.max_queued_requests = 0  # nothing may wait: every new request is one too many
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    finally:
        server.engine.max_queued_requests = 1000
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "server_error"


def test_client_disconnect_mid_stream_frees_pages(
    server: ServerThread, client: openai.OpenAI
) -> None:
    wait_idle(server.engine)
    aborted = 'omniserve_requests_finished_total{finish_reason="abort"}'
    aborted_before = scrape(server)[1].get(aborted, 0)
    stream = client.completions.create(
        prompt="Hello", max_tokens=400, stream=True, extra_body=LONG, **greedy()
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    busy = server.engine.stats()
    assert busy.running == 1 and busy.dense_pages_used > 0
    generated_before = busy.generated_tokens_total
    stream.close()
    idle = wait_idle(server.engine)
    assert idle.generated_tokens_total - generated_before < 390, (
        "the request ran on after the client left"
    )
    assert scrape(server)[1][aborted] == aborted_before + 1, "a cancelled request is counted"


def test_client_disconnect_before_the_answer_aborts(server: ServerThread) -> None:
    engine = server.engine
    wait_idle(engine)
    before = engine.stats()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions",
            json=greedy(prompt="Hello", max_tokens=400, ignore_eos=True),
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=httpx.Timeout(10, read=0.3),
        )
    after = wait_idle(engine)
    assert 0 < after.generated_tokens_total - before.generated_tokens_total < 400


async def test_200_concurrent_streams_match_running_alone(server: ServerThread) -> None:
    prompts = [f"Request number {i}: " + "abc " * (i % 5) for i in range(20)]
    async with server.async_client() as client:
        alone = []
        for prompt in prompts:
            out = await client.completions.create(prompt=prompt, max_tokens=6, **greedy())
            alone.append((out.choices[0].text, out.choices[0].finish_reason))

        async def stream(i: int) -> tuple[str, str | None]:
            chunks = await client.completions.create(
                prompt=prompts[i % len(prompts)], max_tokens=6, stream=True, **greedy()
            )
            text, reason = "", None
            async for chunk in chunks:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            return text, reason

        results = await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(200))), 60)
    for i, result in enumerate(results):
        assert result == alone[i % len(prompts)], f"stream {i} differs from running alone"
    stats = await asyncio.to_thread(wait_idle, server.engine)
    assert stats.running == stats.waiting == 0
    assert not server.engine._streams and not server.engine._by_request_id


def test_engine_failure_is_reported_not_hung(model_dir: Path) -> None:
    srv = start_server(model_dir)
    runner = srv.engine.engine.runner
    real_launch = runner.launch
    steps = 0

    def launch(*args: Any, **kwargs: Any) -> Any:
        nonlocal steps
        steps += 1
        if steps > 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_launch(*args, **kwargs)

    runner.launch = launch  # type: ignore[method-assign]
    try:
        client = srv.client()
        stream = client.completions.create(
            prompt="Hi", max_tokens=100, stream=True, extra_body=LONG, **greedy()
        )
        with pytest.raises(openai.APIError, match="illegal memory access"):
            for _ in stream:  # a few chunks, then the error arrives in-band
                pass
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(prompt="Hi", max_tokens=4, **greedy())
        assert info.value.status_code == 500 and "illegal memory access" in str(info.value)
        assert httpx.get(srv.url + "/health").status_code == 503
    finally:
        srv.stop()


async def test_graceful_shutdown_drains_then_aborts(model_dir: Path) -> None:
    """Requests that finish within the drain finish; the rest are aborted and still answered in
    OpenAI's shape (an SSE error event and [DONE]; a 503), never a cut connection."""
    srv = start_server(model_dir, drain=1.5)
    real_step = srv.engine.engine.step

    def slow_step() -> Any:  # 20 ms per step: the long request cannot finish within the drain
        time.sleep(0.02)
        return real_step()

    srv.engine.engine.step = slow_step  # type: ignore[method-assign]
    async with srv.async_client() as client:

        async def consume(max_tokens: int, started: asyncio.Event) -> str | None:
            reason = None
            stream = await client.completions.create(
                prompt="Hello", max_tokens=max_tokens, stream=True, extra_body=LONG, **greedy()
            )
            async for chunk in stream:
                started.set()
                reason = chunk.choices[0].finish_reason or reason
            return reason

        started = [asyncio.Event(), asyncio.Event()]
        short = asyncio.create_task(consume(20, started[0]))
        long = asyncio.create_task(consume(400, started[1]))
        whole = asyncio.create_task(
            client.completions.create(prompt="Hello", max_tokens=400, extra_body=LONG, **greedy())
        )
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
        stopping = asyncio.create_task(asyncio.to_thread(srv.stop))
        assert await asyncio.wait_for(short, 10) == "length"  # drained
        cut, refused = await asyncio.gather(long, whole, return_exceptions=True)
        assert isinstance(cut, openai.APIError) and "shutting down" in str(cut), cut
        assert isinstance(refused, openai.APIStatusError) and refused.status_code == 503
        assert "shutting down" in str(refused)
        await asyncio.wait_for(stopping, 30)
    assert not srv.engine.is_running
    assert srv.engine._thread is not None and not srv.engine._thread.is_alive()
    stats = srv.engine.stats()
    assert stats.running == stats.waiting == stats.dense_pages_used == 0


def test_serve_command_line() -> None:
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["serve", "--model", "ckpt", "--api-key", "k", "--max-queued-requests", "8"]
        + ["--port", "0", "--num-kv-pages", "64", "--shutdown-timeout", "5"]
    )
    assert args.func is serve.run
    assert (args.model, args.api_key, args.max_queued_requests, args.port) == ("ckpt", "k", 8, 0)
    assert (args.host, args.shutdown_timeout) == ("127.0.0.1", 5.0)
    assert engine_kwargs(args) == {"num_kv_pages": 64}
