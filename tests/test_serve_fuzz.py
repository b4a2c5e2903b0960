"""`tinylm serve` against hostile clients: a live server subprocess on 127.0.0.1, fuzzed by Schemathesis
(requests generated from the app's own OpenAPI schema, valid and invalid, with a fixed example budget),
then a hand-written table of hostile requests. After each: no 5xx, no hang, the engine alive, and a
normal request still answered with the text generate() gives it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from tinylm.checkpoint import load_run  # noqa: E402
from tinylm.generate import generate  # noqa: E402
from tinylm.tokenizer import load_tokenizer  # noqa: E402

EXAMPLES = 25  # generated requests per API operation and mode: about a minute in all on 2 cores
LIMITS = ["--max-tokens-limit", "48", "--max-n", "4", "--max-body-bytes", "200000", "--max-batch", "8"]

pytestmark = pytest.mark.numerics  # the final check compares served text with generate()'s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tinylm serve` in a subprocess (context 32 tokens, max_tokens up to 48: past the context)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    cmd = [
        sys.executable,
        "-m",
        "tinylm",
        "serve",
        str(tiny_run),
        "--port",
        str(port),
        "--model-name",
        "tiny",
    ]
    with log.open("w") as err:
        proc = subprocess.Popen(
            [*cmd, "--device", "cpu", *LIMITS], stdout=subprocess.DEVNULL, stderr=err, env=os.environ.copy()
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stderr = log.read_text()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert proc.returncode == 0, stderr[-2000:]


def _whole(url: str, run_dir: Path) -> None:
    """The server is alive and a normal request gets the text generate() gives it."""
    health = httpx.get(f"{url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 40, "seed": 11, "temperature": 0.9}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    run = load_run(run_dir)
    expected = generate(run.model, run.tokenizer, "ROMEO:", max_new_tokens=40, seed=11, temperature=0.9)
    assert r.json()["choices"][0]["text"] == expected[0].text


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_generated_requests_never_get_a_server_error(live: str, tiny_run: Path, mode: GenerationMode) -> None:
    """Every operation of /openapi.json, EXAMPLES requests each: valid ones (positive) and ones that break
    the schema (negative). Hypothesis runs derandomized, so the budget and the requests are fixed. Valid
    requests name the served model and keep their text in its vocabulary, so that most reach the engine
    (random model names and Unicode stop at a 404 or 400 otherwise)."""
    schema = schemathesis.openapi.from_url(f"{live}/openapi.json")
    vocabulary = set(load_tokenizer(tiny_run / "tokenizer.json").chars)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions"}
    for operation in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case) -> None:
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
                _reach_the_engine(case.body, vocabulary)
            case.call_and_validate(timeout=60, checks=[not_a_server_error])

        try:
            call()
        except Unsatisfiable:  # nothing to break: an operation without parameters or body (GET /health)
            assert mode is GenerationMode.NEGATIVE and operation.method == "get", operation.label


def _reach_the_engine(body: dict, vocabulary: set[str]) -> None:
    """The served model's name, and prompts in its vocabulary within its 32-token context."""
    fit = lambda text, n: "".join(c if c in vocabulary else "e" for c in text[:n])  # noqa: E731
    if isinstance(body.get("model"), str):
        body["model"] = "tiny"
    if isinstance(body.get("prompt"), str):
        body["prompt"] = fit(body["prompt"], 24)
    elif isinstance(body.get("prompt"), list):
        body["prompt"] = [fit(p, 24) if isinstance(p, str) else p for p in body["prompt"]]
    if isinstance(body.get("messages"), list):
        body["messages"] = body["messages"][-1:]  # the chat template takes about 20 tokens per message
        for message in body["messages"]:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                message["content"] = fit(message["content"], 6)


def test_the_server_is_whole_after_the_fuzzing(live: str, tiny_run: Path) -> None:
    counts = _requests(live)
    print("requests by route and status after the fuzzing:", counts)
    assert sum(v for (route, status), v in counts.items() if status == "200" and "completions" in route) >= 25
    assert not [key for key in counts if key[1].startswith("5")]
    _whole(live, tiny_run)


def _requests(url: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "tinylm_requests")
    return {
        (s.labels["route"], s.labels["status"]): s.value for s in family.samples if s.name.endswith("_total")
    }


def _raw(url: str, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions", content=body, headers={"content-type": content_type}, timeout=60
    )


def _json(**fields) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "A", **fields}).encode()


HOSTILE = [
    # (id, body, expected status)
    ("huge max_tokens", _json(max_tokens=10**30), 400),
    ("huge n", _json(n=10**30), 400),
    ("huge seed", _json(seed=10**300, max_tokens=3), 200),
    ("huge negative seed", _json(seed=-(10**300), max_tokens=3), 200),
    ("huge top_k", _json(top_k=10**30, max_tokens=3), 200),  # above the vocabulary: top-k off
    ("huge temperature", _json(temperature=1e308), 400),
    ("tiny temperature", _json(temperature=1e-300), 400),
    ("huge penalty", _json(repetition_penalty=1e308), 400),
    ("huge logprobs", _json(logprobs=10**9), 400),
    (
        "a number of 5,000 digits",
        b'{"model": "tiny", "prompt": "A", "max_tokens": 1' + b"0" * 5000 + b"}",
        400,
    ),
    ("NaN", b'{"model": "tiny", "prompt": "A", "temperature": NaN}', 400),
    ("Infinity", b'{"model": "tiny", "prompt": "A", "top_p": Infinity}', 400),
    ("-Infinity", b'{"model": "tiny", "prompt": "A", "repetition_penalty": -Infinity}', 400),
    ("deep nesting", b'{"model": "tiny", "prompt": ' + b"[" * 90_000 + b"]" * 90_000 + b"}", 400),
    ("invalid UTF-8", b'{"model": "tiny", "prompt": "\xff\xfe\xc3"}', 400),
    ("lone surrogate", b'{"model": "tiny", "prompt": "\\ud800"}', 400),
    ("empty prompt", _json(prompt="", max_tokens=3), 200),
    ("empty prompt list", _json(prompt=[]), 400),
    ("10 MB prompt", _json(prompt="A" * 10_000_000), 413),
    ("prompt over the context", _json(prompt="A" * 100), 400),
    ("10,000 prompts", _json(prompt=["A"] * 10_000), 400),
    ("thousands of stop strings", _json(stop=["x"] * 5000), 400),
    ("a 100 kB stop string", _json(stop="x" * 100_000), 400),
    ("empty stop strings", _json(stop=["", ""], max_tokens=3), 200),
    ("empty body", b"", 400),
    ("null body", b"null", 400),
    ("a list body", b"[1, 2, 3]", 400),
    ("not JSON", b"prompt=A", 400),
    ("unknown fields ignored", _json(max_tokens=3, frequency_penalty=2, user="x" * 1000), 200),
    (
        "messages sent to completions",
        b'{"model": "tiny", "messages": [{"role": "user", "content": "A"}]}',
        400,
    ),
]


@pytest.mark.parametrize("body,status", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_4xx_not_5xx(live: str, body: bytes, status: int) -> None:
    start = time.monotonic()
    r = _raw(live, body)
    assert r.status_code == status, r.text[:500]
    assert time.monotonic() - start < 30  # no hang
    if status >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert httpx.get(f"{live}/health", timeout=10).status_code == 200


def test_hostile_content_types_and_chat(live: str) -> None:
    assert _raw(live, _json(max_tokens=2), "text/plain").status_code < 500
    chat = f"{live}/v1/chat/completions"
    for messages in ([{"role": "user", "content": "A" * 10_000}], [{"role": "user", "content": "\x00"}]):
        r = httpx.post(chat, json={"model": "tiny", "messages": messages}, timeout=60)
        assert r.status_code == 400, r.text
    nested = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "A"}]}]}
    assert httpx.post(chat, json=nested, timeout=60).status_code == 400


def test_clients_that_disconnect_mid_stream(live: str) -> None:
    """Clients that vanish after the first chunk (or before reading anything) cost the server nothing."""
    port = int(live.rsplit(":", 1)[1])
    body = _json(max_tokens=48, n=4, stream=True)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for read in (4096, 0, 1):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head + body)
            if read:
                assert sock.recv(read)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body[: len(body) // 2])  # leaves halfway through its own body
    deadline = time.monotonic() + 30
    while httpx.get(f"{live}/health", timeout=10).json()["active"] > 0:
        assert time.monotonic() < deadline, "the abandoned streams kept decoding"
        time.sleep(0.1)


def test_the_server_is_whole_after_the_hostile_table(live: str, tiny_run: Path) -> None:
    _whole(live, tiny_run)
    metrics = httpx.get(f"{live}/metrics", timeout=10).text
    assert 'tinylm_requests_total{route="/v1/completions",status="413"}' in metrics
    assert not any(
        line.startswith("tinylm_requests_total") and 'status="5' in line for line in metrics.splitlines()
    )
