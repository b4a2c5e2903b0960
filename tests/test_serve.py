"""`tinylm serve`: a real uvicorn server on a free port, driven by the official openai client."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import torch  # noqa: E402

from conftest import FLAVOURS, start_server, tiny_config  # noqa: E402
from tinylm.chat import CHAT_STOP, render_chat  # noqa: E402
from tinylm.checkpoint import LoadedRun, load_run  # noqa: E402
from tinylm.config import SampleConfig, ServeConfig  # noqa: E402
from tinylm.generate import generate  # noqa: E402
from tinylm.model import Transformer  # noqa: E402
from tinylm.serve import create_app  # noqa: E402
from tinylm.serve.engine import Engine  # noqa: E402
from tinylm.tokenizer import CharTokenizer, HFTokenizer  # noqa: E402

pytestmark = pytest.mark.numerics  # texts are compared with texts decoded alone


@dataclass
class Running:
    """A server running in this process: its URL, app state and the loaded run."""

    url: str
    app: object
    run: LoadedRun

    @property
    def engine(self):
        return self.app.state.server.engine

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(tiny_run: Path) -> Iterator[Running]:
    run = load_run(tiny_run)
    app = create_app(run, name="tiny", limits=ServeConfig(max_batch=4, max_queue=6))
    server, thread, url = start_server(app)
    yield Running(url, app, run)
    server.should_exit = True
    thread.join(timeout=30)


def alone(run: LoadedRun, prompt: str, max_tokens: int, temperature: float | None = None, **kw) -> str:
    """The same request decoded alone, by the CLI's generate(); unset options take SampleConfig's defaults,
    as the server's do."""
    greedy = temperature == 0
    return generate(
        run.model,
        run.tokenizer,
        prompt,
        max_new_tokens=max_tokens,
        temperature=None if greedy else temperature,
        do_sample=not greedy,
        **kw,
    )[0].text


@contextlib.contextmanager
def paused(engine):
    """The engine holds its steps inside (requests line up), and goes on afterwards whatever happened."""
    engine.pause()
    try:
        yield
    finally:
        engine.resume()


def wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_health_and_models(served: Running) -> None:
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_equals_generate_alone(served: Running) -> None:
    out = served.client().completions.create(
        model="tiny", prompt="ROMEO:\n", max_tokens=20, temperature=0.9, top_p=0.9, seed=7
    )
    expected = alone(served.run, "ROMEO:\n", 20, 0.9, top_p=0.9, seed=7)
    assert out.choices[0].text == expected and len(expected) == 20
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (7, 20, 27)


def test_greedy_repetition_penalty_and_top_k(served: Running) -> None:
    client = served.client()
    greedy = client.completions.create(model="tiny", prompt="First", max_tokens=15, temperature=0)
    assert greedy.choices[0].text == alone(served.run, "First", 15, 0)
    extra = {"top_k": 5, "repetition_penalty": 1.3}
    out = client.completions.create(model="tiny", prompt="First", max_tokens=15, seed=3, extra_body=extra)
    assert out.choices[0].text == alone(served.run, "First", 15, seed=3, **extra)


def test_seed_determinism_and_n(served: Running) -> None:
    client = served.client()
    ask = dict(model="tiny", prompt="KING", max_tokens=12, temperature=1.0, seed=11)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    assert first.choices[0].text == again.choices[0].text
    many = client.completions.create(**{**ask, "n": 3})
    assert [c.index for c in many.choices] == [0, 1, 2]
    # choice i samples with seed + i: each equals that request decoded alone
    expected = [alone(served.run, "KING", 12, 1.0, seed=11 + i) for i in range(3)]
    assert [c.text for c in many.choices] == expected
    assert len({c.text for c in many.choices}) > 1
    assert many.usage.completion_tokens == 36


def test_stop_strings(served: Running) -> None:
    client = served.client()
    full = alone(served.run, "the ", 25, seed=5)
    stop = full[8:10]  # a string the unstopped text contains
    out = client.completions.create(model="tiny", prompt="the ", max_tokens=25, seed=5, stop=[stop, "@@"])
    assert out.choices[0].text == full[: full.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny", prompt="the ", max_tokens=25, seed=5, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[: full.find(stop)]


def test_streaming_completion(served: Running) -> None:
    stream = served.client().completions.create(
        model="tiny", prompt="O", max_tokens=16, seed=2, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == alone(served.run, "O", 16, seed=2)
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # it really streamed
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]


def test_raw_sse_ends_with_done(served: Running) -> None:
    body = {"model": "tiny", "prompt": "A", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_chat_uses_the_template(served: Running) -> None:
    messages = [{"role": "user", "content": "Thou?"}]  # the tiny model's context is 32 characters
    client = served.client()
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, seed=4)
    expected = alone(served.run, render_chat(messages), 10, seed=4, stop=CHAT_STOP).lstrip(" ")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(render_chat(messages))
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, seed=4, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_logprobs_and_alternatives(served: Running) -> None:
    out = served.client().completions.create(
        model="tiny", prompt="Th", max_tokens=6, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob)  # greedy picks the top token
        assert top[token] == pytest.approx(logprob)
    chat = served.client().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
    )
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)


def test_concurrent_requests_batch_and_equal_each_alone(served: Running) -> None:
    prompts = ["ROMEO", "JULIET:", "What, ", "Good morrow", "A", "O, she", "KING:", "My lord"]
    asks = [
        dict(prompt=p, max_tokens=10 + i, seed=100 + i, temperature=0.8 + 0.05 * i)
        for i, p in enumerate(prompts)
    ]
    engine, client = served.engine, served.client()
    with paused(engine):  # requests line up while the engine waits, so they really arrive together
        with ThreadPoolExecutor(len(asks)) as pool:
            futures = [pool.submit(client.completions.create, model="tiny", **a) for a in asks[:6]]
            wait_for(lambda: engine.waiting == 6, "6 waiting sequences")
            engine.resume()
            futures += [pool.submit(client.completions.create, model="tiny", **a) for a in asks[6:]]
            texts = [f.result().choices[0].text for f in futures]
    assert engine.stats["max_rows"] == 4  # 4 rows (max_batch) decoded in one step
    expected = [
        alone(served.run, a["prompt"], a["max_tokens"], a["temperature"], seed=a["seed"]) for a in asks
    ]
    assert texts == expected


def test_health_answers_during_a_long_generation(served: Running) -> None:
    engine = served.engine
    with httpx.stream(
        "POST",
        f"{served.url}/v1/completions",
        json={"model": "tiny", "prompt": "A", "max_tokens": 30, "stream": True},
    ) as r:
        lines = r.iter_lines()
        next(lines)
        assert httpx.get(f"{served.url}/health", timeout=10).json()["status"] == "ok"
        assert list(lines)[-2] == "data: [DONE]"
    assert engine.active == 0


def test_a_client_that_leaves_stops_its_generation(served: Running) -> None:
    engine, server = served.engine, served.app.state.server
    cancelled, admitted = server.cancelled, engine.stats["admitted"]
    with paused(engine):
        body = {"model": "tiny", "prompt": "A", "max_tokens": 30, "stream": True}
        with httpx.stream("POST", f"{served.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            wait_for(lambda: engine.waiting == 1, "the request to queue")
        wait_for(lambda: server.cancelled == cancelled + 1, "the server to notice the client left")
    wait_for(lambda: engine.waiting == 0, "the queue to drain")
    assert engine.stats["admitted"] == admitted  # never decoded
    assert served.client().completions.create(model="tiny", prompt="B", max_tokens=2).choices[0].text


BAD = [
    ("malformed JSON", b'{"model": "tiny", "prompt": ', 400, None),
    ("missing prompt", {"model": "tiny"}, 400, "prompt"),
    ("missing model", {"prompt": "A"}, 400, "model"),
    ("prompt wrongly typed", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("max_tokens wrongly typed", {"model": "tiny", "prompt": "A", "max_tokens": "9"}, 400, "max_tokens"),
    ("temperature negative", {"model": "tiny", "prompt": "A", "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", {"model": "tiny", "prompt": "A", "top_p": 0}, 400, "top_p"),
    ("n zero", {"model": "tiny", "prompt": "A", "n": 0}, 400, "n"),
    (
        "max_tokens beyond the server's limit",
        {"model": "tiny", "prompt": "ABC", "max_tokens": 10**6},
        400,
        "max_tokens",
    ),
    ("unknown model", {"model": "gpt-4", "prompt": "A"}, 404, "model"),
    ("characters outside the vocabulary", {"model": "tiny", "prompt": "naïve ☃"}, 400, "prompt"),
    # the server's limits (ServeConfig defaults; the tiny model's context is 32 tokens)
    ("n above the limit", {"model": "tiny", "prompt": "A", "n": 17}, 400, "n"),
    ("prompts times n above the limit", {"model": "tiny", "prompt": ["A"] * 5, "n": 4}, 400, "n"),
    ("logprobs above the limit", {"model": "tiny", "prompt": "A", "logprobs": 21}, 400, "logprobs"),
    ("five stop strings", {"model": "tiny", "prompt": "A", "stop": list("abcde")}, 400, "stop"),
    ("thousands of stop strings", {"model": "tiny", "prompt": "A", "stop": ["x"] * 5000}, 400, "stop"),
    ("a stop string too long", {"model": "tiny", "prompt": "A", "stop": "x" * 65}, 400, "stop"),
    ("prompt longer than the context", {"model": "tiny", "prompt": "A" * 33}, 400, "prompt"),
    (
        "temperature too small to stay finite",
        {"model": "tiny", "prompt": "A", "temperature": 1e-40},
        400,
        "temperature",
    ),
    (
        "repetition penalty huge",
        {"model": "tiny", "prompt": "A", "repetition_penalty": 1e40},
        400,
        "repetition_penalty",
    ),
    (
        "repetition penalty tiny",
        {"model": "tiny", "prompt": "A", "repetition_penalty": 1e-40},
        400,
        "repetition_penalty",
    ),
    ("seed as a float", {"model": "tiny", "prompt": "A", "seed": 1.5}, 400, "seed"),
]


@pytest.mark.parametrize("body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(served: Running, body, status: int, param: str | None) -> None:
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(f"{served.url}/v1/completions", **kwargs)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert httpx.get(f"{served.url}/health").status_code == 200  # still serving


def test_bad_chat_requests(served: Running) -> None:
    for messages in (
        [],
        [{"role": "wizard", "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
    ):
        r = httpx.post(f"{served.url}/v1/chat/completions", json={"model": "tiny", "messages": messages})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "A"}])


def test_more_waiting_than_the_queue_allows(served: Running) -> None:
    engine, client = served.engine, served.client()
    with paused(engine):
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.completions.create, model="tiny", prompt="A", max_tokens=3, n=5)
            wait_for(lambda: engine.waiting == 5, "5 waiting sequences")
            with pytest.raises(openai.RateLimitError) as info:
                client.completions.create(model="tiny", prompt="B", max_tokens=3, n=2)  # 5 + 2 > 6
            assert info.value.body["code"] == "queue_full"
            engine.resume()
            assert len(waiting.result().choices) == 5
    assert client.completions.create(model="tiny", prompt="C", max_tokens=2).choices[0].text


@pytest.mark.parametrize("flavour", ["gpt", "llama", "llama-moe", "llama-gqa"])
def test_engine_rows_at_different_positions_equal_each_alone(flavour: str) -> None:
    """The scheduler without HTTP: sequences join and leave the batch mid-flight in every flavour."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz ,.\n")
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, **FLAVOURS[flavour])).eval()
    asks = [("hello", 9, 1), ("a", 20, 2), ("the quick fox", 5, 3), ("zz", 14, 4), ("many more words", 12, 5)]
    events: dict[int, list] = {}
    engine = Engine(
        model, tokenizer, max_batch=3, max_queue=16
    )  # 5 requests, 3 rows: later ones join mid-flight
    engine.pause()
    engine.start()
    try:
        for i, (prompt, n, seed) in enumerate(asks):
            cfg = SampleConfig(max_new_tokens=n, temperature=0.9, top_k=0, top_p=1.0, seed=seed)
            engine.submit(
                [tokenizer.encode(prompt)], [cfg], lambda e, i=i: events.setdefault(i, []).append(e)
            )
        engine.resume()
        wait_for(
            lambda: sum(any(e.finish_reason for e in v) for v in events.values()) == len(asks), "all done"
        )
    finally:
        engine.close()
    texts = ["".join(e.text for e in events[i]) for i in range(len(asks))]
    assert texts == [alone_model(model, tokenizer, p, n, seed) for p, n, seed in asks]
    assert engine.stats["max_rows"] == 3


def alone_model(model, tokenizer, prompt: str, n: int, seed: int, temperature: float = 0.9) -> str:
    top_k = 0 if temperature == 0.9 else SampleConfig.top_k  # the first test's settings, else the defaults
    return generate(
        model, tokenizer, prompt, max_new_tokens=n, temperature=temperature, top_k=top_k, top_p=1.0, seed=seed
    )[0].text


class _ShoutRetriever:
    """A stand-in for tinylm.rag's retriever: prepends one fixed passage and names it."""

    def augment(self, query: str, prompt: str, max_new_tokens: int) -> tuple[str, list[dict]]:
        source = {"file": "play.txt", "passage": 3, "score": 1.5, "query": query, "room": max_new_tokens}
        return "ROMEO. " + prompt, [source]


def test_retrieval_hook_augments_prompts_and_returns_sources(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    server, thread, url = start_server(create_app(run, name="tiny", retriever=_ShoutRetriever()))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="tiny", prompt="Who", max_tokens=6, seed=1)
        assert out.model_extra["sources"] == [
            {"file": "play.txt", "passage": 3, "score": 1.5, "query": "Who", "room": 6}
        ]
        assert out.choices[0].text == alone(run, "ROMEO. Who", 6, seed=1)
        assert out.usage.prompt_tokens == len("ROMEO. Who")
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
        )
        first = next(iter(chat)).model_extra["sources"][0]
        assert first["query"] == "Hi" and first["room"] == 4
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
        # no max_tokens: the answer's room is SampleConfig's max_new_tokens, which rag's rule caps at a quarter
        assert chat.model_extra["sources"][0]["room"] == SampleConfig.max_new_tokens
        plain = client.completions.create(
            model="tiny", prompt="Who", max_tokens=6, seed=1, extra_body={"retrieval": False}
        )
        assert "sources" not in plain.model_extra and plain.choices[0].text == alone(run, "Who", 6, seed=1)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_tinylm_serve_command(tiny_run: Path, tmp_path: Path) -> None:
    """The real command in a subprocess: it serves on the given port and stops cleanly on Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tinylm", "serve", str(tiny_run), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read() if proc.poll() else "slow"
            )
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert health["model"] == tiny_run.name
        taken = subprocess.run([*cmd[:4], str(tiny_run), "--port", str(port)], capture_output=True, text=True)
        assert taken.returncode == 2 and "Serving" not in taken.stdout  # nothing claims to serve
        assert (
            taken.stderr.startswith("error: Cannot listen on 127.0.0.1:")
            and len(taken.stderr.splitlines()) == 1
        )
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and f"http://127.0.0.1:{port}" in out
        assert err.count('"GET /health"') >= 1  # one access-log line per request
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    bad = subprocess.run([*cmd[:3], "serve", str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


# ----- limits, isolation, the engine's death, past the context, metrics (issue 23) ---------------------
def test_bodies_over_the_limit_get_413_before_parsing(served: Running) -> None:
    big = json.dumps({"model": "tiny", "prompt": "A" * 10_000_000}).encode()  # a 10 MB prompt
    for kwargs in ({"content": big}, {"content": iter([big[:500_000], big[500_000:]])}):  # sized, chunked
        r = httpx.post(f"{served.url}/v1/completions", headers={"content-type": "application/json"}, **kwargs)
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "request_too_large" and "1,000,000 bytes" in error["message"]
    assert httpx.get(f"{served.url}/health").status_code == 200


def test_seeds_of_any_size_are_reduced_modulo_2_64(served: Running) -> None:
    """A seed above 2**64 - 1 killed the engine thread (issue 23); now seeds wrap as torch's negative ones do."""
    client = served.client()
    ask = dict(model="tiny", prompt="KING", max_tokens=8, temperature=1.0)
    huge = client.completions.create(**ask, seed=2**70 + 5, n=2)
    wrapped = client.completions.create(**ask, seed=5, n=2)
    assert [c.text for c in huge.choices] == [c.text for c in wrapped.choices]
    assert huge.choices[0].text == alone(served.run, "KING", 8, 1.0, seed=5)
    top = client.completions.create(**ask, seed=2**64 - 1, n=2)  # choice 1 samples with seed 0
    assert top.choices[1].text == alone(served.run, "KING", 8, 1.0, seed=0)
    negative = client.completions.create(**ask, seed=-1)
    assert negative.choices[0].text == alone(served.run, "KING", 8, 1.0, seed=2**64 - 1)
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok" and served.engine.alive


def test_a_request_that_waits_longer_than_the_poll_interval(served: Running) -> None:
    """On Python 3.10 asyncio.wait_for raises asyncio.TimeoutError, not the builtin: a wait over 0.5 s was a 500."""
    from tinylm.serve.app import POLL_SECONDS

    engine, client = served.engine, served.client()
    with paused(engine):
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.completions.create, model="tiny", prompt="O", max_tokens=6, seed=1)
            wait_for(lambda: engine.waiting == 1, "the request to queue")
            time.sleep(3 * POLL_SECONDS)
            engine.resume()
            assert waiting.result().choices[0].text == alone(served.run, "O", 6, seed=1)


class _GatedTokenizer:
    """The run's tokenizer, except that encoding a prompt starting with "SLOW" waits until released."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def encode(self, text: str) -> list[int]:
        if text.startswith("SLOW"):
            self.entered.set()
            self.release.wait(60)
        return self.inner.encode(text)


def test_tokenizing_never_blocks_the_event_loop(tiny_run: Path) -> None:
    """A 50 MB prompt was tokenized on the event loop (5 s with /health blocked); long prompts now are
    tokenized on a worker thread, and the prompt limit is checked there."""
    from tinylm.serve.app import INLINE_CHARS

    run = load_run(tiny_run)
    gated = _GatedTokenizer(run.tokenizer)
    server, thread, url = start_server(create_app(replace(run, tokenizer=gated), name="tiny"))
    try:
        with ThreadPoolExecutor(1) as pool:
            body = {"model": "tiny", "prompt": "SLOW" + "A" * INLINE_CHARS, "max_tokens": 3}
            slow = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)
            assert gated.entered.wait(30), "the long prompt was never tokenized"
            assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"  # answered meanwhile
            gated.release.set()
            refused = slow.result()
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
            assert f"{INLINE_CHARS + 4} tokens" in refused.json()["error"]["message"]
    finally:
        gated.release.set()
        server.should_exit = True
        thread.join(timeout=30)


class _Exploding:
    """Stands in for a sequence's RowText: detokenizing fails."""

    done = False

    def push(self, token: int) -> str:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken byte")

    def finish(self) -> str:
        return ""


def test_a_failing_sequence_ends_alone_and_its_neighbours_are_exact() -> None:
    """Admission, sampling and detokenization failures each end their own sequence; the rows decoded in the
    same steps finish with the text they get alone, and the engine keeps serving."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz ,.\n")
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, **FLAVOURS["gpt"])).eval()
    good = [("hello", 12, 1), ("the fox", 9, 2), ("a", 14, 3)]
    bad_sampling = SampleConfig(max_new_tokens=10, temperature=1.0, seed=4)
    bad_sampling.temperature = 1e-40  # past validation: logits / 1e-40 overflow, the old 500 for everyone
    bad_seed = SampleConfig(max_new_tokens=10)
    bad_seed.seed = "not a seed"  # fails when its generator is made, at admission
    events: dict[int, list] = {}
    engine = Engine(model, tokenizer, max_batch=6, max_queue=16)
    engine.pause()
    engine.start()
    try:
        cfgs = [SampleConfig(max_new_tokens=n, seed=seed) for _, n, seed in good]
        cfgs += [bad_sampling, bad_seed, SampleConfig(max_new_tokens=10, seed=5)]
        prompts = [p for p, _, _ in good] + ["zz", "qq", "yy"]
        for i, (prompt, cfg) in enumerate(zip(prompts, cfgs)):
            engine.submit(
                [tokenizer.encode(prompt)], [cfg], lambda e, i=i: events.setdefault(i, []).append(e)
            )
        engine._waiting[-1].text = _Exploding()  # the last one fails while detokenizing
        engine.resume()
        wait_for(lambda: sum(any(e.finish_reason for e in v) for v in events.values()) == 6, "all six done")
        texts = ["".join(e.text for e in events[i]) for i in range(3)]
        assert texts == [alone_model(model, tokenizer, p, n, seed, 0.8) for p, n, seed in good]
        reasons = [events[i][-1].finish_reason for i in range(6)]
        assert reasons == ["length"] * 3 + ["error"] * 3
        assert "not finite" in events[3][-1].error and "TypeError" in events[4][-1].error
        assert "UnicodeDecodeError" in events[5][-1].error
        assert engine.alive and engine.stats["failed"] == 3 and engine.stats["max_rows"] >= 4
        after: list = []
        engine.submit([tokenizer.encode("ok")], [SampleConfig(max_new_tokens=4, seed=6)], after.append)
        wait_for(lambda: after and after[-1].finish_reason, "a later request")
        assert "".join(e.text for e in after) == alone_model(model, tokenizer, "ok", 4, 6, 0.8)
    finally:
        engine.close()


class _Kill(BaseException):
    """What the test raises on the engine thread to kill it (not an Exception: nothing catches it)."""


def _kill(engine: Engine) -> None:
    def die() -> None:
        raise _Kill("killed by the test")

    engine.call(die)


@pytest.mark.parametrize("backstop", [False, True], ids=["engine reports", "engine silent"])
def test_a_dead_engine_says_so_and_requests_fail_fast(
    tiny_run: Path, backstop: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the engine thread dies, /health is 503 and every request ends at once with an error (issue 23: the
    thread died and later requests waited forever while /health said ok). `backstop`: the dying thread
    reports nothing, and the requests notice by themselves."""
    run = load_run(tiny_run)
    app = create_app(run, name="tiny")
    engine = app.state.server.engine
    if backstop:
        monkeypatch.setattr(engine, "_fail_everything", lambda: None)
    server, thread, url = start_server(app)
    try:
        body = {"model": "tiny", "prompt": "A", "max_tokens": 4000, "seed": 1}
        with ThreadPoolExecutor(1) as pool:
            plain = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)
            with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                wait_for(lambda: engine.active == 2, "both requests decoding")
                _kill(engine)
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert any('"code": "engine_stopped"' in line for line in rest)
            assert plain.result().status_code == 503
            assert plain.result().json()["error"]["code"] == "engine_stopped"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert "_Kill: killed by the test" in health.json()["error"]
        start = time.monotonic()
        late = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "B"}, timeout=30)
        assert late.status_code == 503 and time.monotonic() - start < 2  # fails fast, does not wait
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _chain_run(out: Path, tokenizer: HFTokenizer, chain: list[int]) -> Path:
    """A real run whose model (one GPT block, silenced) greedily continues chain[i] with chain[i + 1]."""
    from tinylm.checkpoint import RunRecord, save_checkpoint
    from tinylm.config import TrainConfig

    vocab = tokenizer.vocab_size
    cfg = tiny_config(
        vocab_size=vocab, n_embd=vocab, n_head=1, n_layer=1, tie_embeddings=False, **FLAVOURS["gpt"]
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the block adds nothing to the residual stream: logits come from the embedding
        model.tok_emb.weight.copy_(torch.eye(vocab))
        model.norm_f.weight.fill_(1.0)
        for a, b in zip(chain, chain[1:]):
            model.lm_head.weight[b, a] = 10.0
    RunRecord(cfg, TrainConfig()).write(out, tokenizer)
    save_checkpoint(out, "last", model.state_dict(), None, {"step": 0})
    return out


def test_a_stop_string_partly_matched_at_end_of_text_keeps_its_text(
    tmp_path: Path, shakespeare_text: str
) -> None:
    """The server streams through generate()'s one stop/end-of-text rule: text held back because it may begin
    a stop string is kept when end-of-text arrives (the server dropped it: "Hello " vs generate's "Hello E")."""
    tokenizer = HFTokenizer.train_bpe([shakespeare_text[:50_000]], 300)
    prompt, continuation = tokenizer.encode("A"), tokenizer.encode(" my lord.E")
    chain = [prompt[-1], *continuation, tokenizer.eot_id]
    assert len(set(chain)) == len(chain), "the chain must not repeat a token"
    run = load_run(_chain_run(tmp_path / "chain", tokenizer, chain))
    expected = generate(run.model, run.tokenizer, "A", max_new_tokens=20, do_sample=False, stop=["EN"])[0]
    assert expected.text == " my lord.E" and expected.ids == continuation  # held "E", then end-of-text
    server, thread, url = start_server(create_app(run, name="chain"))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ask = dict(model="chain", prompt="A", max_tokens=20, temperature=0, stop=["EN"])
        out = client.completions.create(**ask)
        assert out.choices[0].text == " my lord.E" and out.choices[0].finish_reason == "stop"
        streamed = list(client.completions.create(**ask, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == " my lord.E"
        # a lone surrogate (no character; the BPE tokenizer raised TypeError: a 500) is a 400 naming it
        for route, body in (
            ("completions", {"prompt": "A\ud800"}),
            ("chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}),
        ):
            raw = json.dumps({"model": "chain", **body})  # ASCII: the surrogate travels as "\\ud800"
            r = httpx.post(f"{url}/v1/{route}", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_characters", r.text
            assert "surrogate" in r.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_requests_past_the_context_equal_generate(served: Running) -> None:
    """max_tokens beyond the context (a 400 before): learned positions re-encode the last block_size tokens,
    as generate() does, batched with rows still inside the context."""
    engine, client = served.engine, served.client()
    asks = [("ROMEO:", 70, 3, 2), ("What, ", 12, 4, 1), ("KING", 45, 5, 1)]  # context: 32 tokens
    with paused(engine):
        with ThreadPoolExecutor(len(asks)) as pool:
            futures = [
                pool.submit(client.completions.create, model="tiny", prompt=p, max_tokens=m, seed=s, n=n)
                for p, m, s, n in asks
            ]
            wait_for(lambda: engine.waiting == 4, "4 waiting sequences")
            engine.resume()
            outs = [f.result() for f in futures]
    for out, (prompt, max_tokens, seed, n) in zip(outs, asks):
        assert [c.text for c in out.choices] == [
            alone(served.run, prompt, max_tokens, seed=seed + i) for i in range(n)
        ]
        assert out.usage.completion_tokens == n * max_tokens
    streamed = client.completions.create(model="tiny", prompt="O", max_tokens=50, seed=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == alone(served.run, "O", 50, seed=8)


@pytest.mark.parametrize("flavour", ["llama", "llama-gqa", "gpt"])
def test_engine_rows_past_the_context_equal_generate(flavour: str) -> None:
    """Engine alone: RoPE rows continue with the rolling cache, learned-position rows re-encode (generate()'s
    two rules), joining and leaving the batch mid-flight at different positions, with penalties and top-k."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz ,.\n")
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, **FLAVOURS[flavour])).eval()
    rolling = model.cfg.position == "rope"
    asks = [
        ("hello", 70, 1, {}),
        ("a", 20, 2, {"top_k": 5}),
        ("the quick fox", 90, 3, {"repetition_penalty": 1.3}),
    ]
    asks += [("zz", 40, 4, {"do_sample": False, "repetition_penalty": 1.2}), ("x y", 33, 5, {"top_p": 0.8})]
    events: dict[int, list] = {}
    engine = Engine(model, tokenizer, max_batch=3, max_queue=16)
    engine.pause()
    engine.start()
    try:
        for i, (prompt, n, seed, kw) in enumerate(asks):
            cfg = SampleConfig(max_new_tokens=n, seed=seed, **kw)
            engine.submit(
                [tokenizer.encode(prompt)], [cfg], lambda e, i=i: events.setdefault(i, []).append(e)
            )
        engine.resume()
        wait_for(
            lambda: sum(any(e.finish_reason for e in v) for v in events.values()) == len(asks), "all done"
        )
    finally:
        engine.close()
    texts = ["".join(e.text for e in events[i]) for i in range(len(asks))]
    expected = [
        generate(model, tokenizer, p, max_new_tokens=n, seed=s, rolling_cache=rolling, **kw)[0].text
        for p, n, s, kw in asks
    ]
    assert texts == expected and all(len(t) == n for t, (_, n, _, _) in zip(texts, asks))


def test_metrics_and_one_access_log_line_per_request(
    served: Running, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    caplog.set_level(logging.INFO, logger="tinylm.serve.access")
    client = served.client()
    client.completions.create(model="tiny", prompt="A", max_tokens=5, seed=1)
    list(client.completions.create(model="tiny", prompt="B", max_tokens=5, seed=1, stream=True))
    assert httpx.post(f"{served.url}/v1/completions", json={"model": "tiny"}).status_code == 400
    r = httpx.get(f"{served.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["tinylm_requests"].samples
        if s.name == "tinylm_requests_total"
    }
    assert requests[("/v1/completions", "200")] >= 2 and requests[("/v1/completions", "400")] >= 1
    value = lambda name, sample: next(s.value for s in families[name].samples if s.name == sample)  # noqa: E731
    assert value("tinylm_generated_tokens", "tinylm_generated_tokens_total") >= 10
    assert value("tinylm_time_to_first_token_seconds", "tinylm_time_to_first_token_seconds_count") >= 2
    assert value("tinylm_time_per_output_token_seconds", "tinylm_time_per_output_token_seconds_count") >= 8
    assert value("tinylm_queue_depth", "tinylm_queue_depth") == 0
    assert value("tinylm_active_rows", "tinylm_active_rows") == 0
    assert value("tinylm_engine_up", "tinylm_engine_up") == 1
    lines = lambda: [r.getMessage() for r in caplog.records if r.name == "tinylm.serve.access"]  # noqa: E731
    wait_for(lambda: len(lines()) == 4, "4 access-log lines")
    assert [line.split('"')[1] for line in lines()] == ["POST /v1/completions"] * 3 + ["GET /metrics"]
    assert [line.split('"')[2].split()[0] for line in lines()] == ["200", "200", "400", "200"]


def test_every_limit_is_configurable_and_its_refusal_names_its_flag(tiny_run: Path) -> None:
    """Each ServeConfig limit, set away from its default: a request at the limit is served, one past it gets
    a 4xx naming the limit's `tinylm serve` flag; and the CLI has exactly those flags, with those defaults."""
    from tinylm.cli import build_parser
    from tinylm.config import field_names

    serve = next(
        p for a in build_parser()._subparsers._group_actions for n, p in a.choices.items() if n == "serve"
    )
    flags = {opt: action for action in serve._actions for opt in action.option_strings}
    for name in field_names(ServeConfig):
        action = flags[ServeConfig.flag(name)]
        assert action.dest == name and action.default == getattr(ServeConfig(), name)

    run = load_run(tiny_run)
    limits = ServeConfig(
        max_body_bytes=400,
        max_prompt_tokens=4,
        max_tokens=5,
        max_n=2,
        max_logprobs=1,
        max_stop=1,
        max_stop_chars=3,
    )
    server, thread, url = start_server(create_app(run, name="tiny", limits=limits))
    ok = {
        "model": "tiny",
        "prompt": "ABCD",
        "max_tokens": 5,
        "n": 2,
        "logprobs": 1,
        "stop": ["xyz"],
        "seed": 1,
    }
    over = [
        ({"prompt": "ABCDE"}, 400, "--max-prompt-tokens"),
        ({"max_tokens": 6}, 400, "--max-tokens-limit"),
        ({"n": 3}, 400, "--max-n"),
        ({"prompt": ["A", "B"]}, 400, "--max-n"),  # 2 prompts x n=2
        ({"logprobs": 2}, 400, "--max-logprobs"),
        ({"stop": ["x", "y"]}, 400, "--max-stop"),
        ({"stop": "wxyz"}, 400, "--max-stop-chars"),
        ({"user": "u" * 400}, 413, "--max-body-bytes"),
    ]
    try:
        r = httpx.post(f"{url}/v1/completions", json=ok, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2 and r.json()["usage"]["completion_tokens"] <= 10
        for change, status, flag in over:
            r = httpx.post(f"{url}/v1/completions", json={**ok, **change}, timeout=60)
            assert r.status_code == status, (change, r.text)
            assert re.search(rf"tinylm serve {flag}(?![-\w])", r.json()["error"]["message"]), (change, r.text)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
