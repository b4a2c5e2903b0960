"""`tinylm serve`: a real uvicorn server on a free port, driven by the official openai client."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import start_server  # noqa: E402
from tinylm.chat import CHAT_STOP, render_chat  # noqa: E402
from tinylm.checkpoint import LoadedRun, load_run  # noqa: E402
from tinylm.generate import generate  # noqa: E402
from tinylm.serve import create_app  # noqa: E402

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
    app = create_app(run, name="tiny", max_batch=4, max_queue=6)
    server, thread, url = start_server(app)
    yield Running(url, app, run)
    server.should_exit = True
    thread.join(timeout=30)


def alone(run: LoadedRun, prompt: str, max_tokens: int, temperature: float = 1.0, **kw) -> str:
    """The same request decoded alone, by the CLI's generate()."""
    kw.setdefault("top_k", 0)
    kw.setdefault("top_p", 1.0)
    greedy = temperature == 0
    return generate(
        run.model,
        run.tokenizer,
        prompt,
        max_new_tokens=max_tokens,
        temperature=1.0 if greedy else temperature,
        do_sample=not greedy,
        **kw,
    )[0].text


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
    assert [c.text for c in many.choices] == [alone(served.run, "KING", 12, seed=11 + i) for i in range(3)]
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
    engine.pause()  # requests line up while the engine waits, so they really arrive together
    try:
        with ThreadPoolExecutor(len(asks)) as pool:
            futures = [pool.submit(client.completions.create, model="tiny", **a) for a in asks[:6]]
            wait_for(lambda: engine.waiting == 6, "6 waiting sequences")
            engine.resume()
            futures += [pool.submit(client.completions.create, model="tiny", **a) for a in asks[6:]]
            texts = [f.result().choices[0].text for f in futures]
    finally:
        engine.resume()
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
    engine.pause()
    try:
        body = {"model": "tiny", "prompt": "A", "max_tokens": 30, "stream": True}
        with httpx.stream("POST", f"{served.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            wait_for(lambda: engine.waiting == 1, "the request to queue")
        wait_for(lambda: server.cancelled == cancelled + 1, "the server to notice the client left")
    finally:
        engine.resume()
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
        "max_tokens beyond the context",
        {"model": "tiny", "prompt": "ABC", "max_tokens": 30},
        400,
        "max_tokens",
    ),
    ("unknown model", {"model": "gpt-4", "prompt": "A"}, 404, "model"),
    ("characters outside the vocabulary", {"model": "tiny", "prompt": "naïve ☃"}, 400, "prompt"),
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
    engine.pause()
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.completions.create, model="tiny", prompt="A", max_tokens=3, n=5)
            wait_for(lambda: engine.waiting == 5, "5 waiting sequences")
            with pytest.raises(openai.RateLimitError) as info:
                client.completions.create(model="tiny", prompt="B", max_tokens=3, n=2)  # 5 + 2 > 6
            assert info.value.body["code"] == "queue_full"
            engine.resume()
            assert len(waiting.result().choices) == 5
    finally:
        engine.resume()
    assert client.completions.create(model="tiny", prompt="C", max_tokens=2).choices[0].text


@pytest.mark.parametrize("flavour", ["gpt", "llama", "llama-moe", "llama-gqa"])
def test_engine_rows_at_different_positions_equal_each_alone(flavour: str) -> None:
    """The scheduler without HTTP: sequences join and leave the batch mid-flight in every flavour."""
    import torch

    from conftest import FLAVOURS, tiny_config
    from tinylm.config import SampleConfig
    from tinylm.model import Transformer
    from tinylm.serve.engine import Engine
    from tinylm.tokenizer import CharTokenizer

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


def alone_model(model, tokenizer, prompt: str, n: int, seed: int) -> str:
    return generate(
        model, tokenizer, prompt, max_new_tokens=n, temperature=0.9, top_k=0, top_p=1.0, seed=seed
    )[0].text


class _ShoutRetriever:
    """A stand-in for tinylm.rag's retriever: prepends one fixed passage and names it."""

    def augment(self, query: str, prompt: str, budget: int) -> tuple[str, list[dict]]:
        return "ROMEO. " + prompt, [{"file": "play.txt", "passage": 3, "score": 1.5, "query": query}]


def test_retrieval_hook_augments_prompts_and_returns_sources(tiny_run: Path) -> None:
    run = load_run(tiny_run)
    server, thread, url = start_server(create_app(run, name="tiny", retriever=_ShoutRetriever()))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="tiny", prompt="Who", max_tokens=6, seed=1)
        assert out.model_extra["sources"] == [
            {"file": "play.txt", "passage": 3, "score": 1.5, "query": "Who"}
        ]
        assert out.choices[0].text == alone(run, "ROMEO. Who", 6, seed=1)
        assert out.usage.prompt_tokens == len("ROMEO. Who")
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True
        )
        assert next(iter(chat)).model_extra["sources"][0]["query"] == "Hi"
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
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and f"http://127.0.0.1:{port}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    bad = subprocess.run([*cmd[:3], "serve", str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
