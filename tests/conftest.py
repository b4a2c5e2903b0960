"""Shared fixtures: real text from ../shared/datasets, tiny prepared data, and a tiny trained run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tinylm.config import ModelConfig

# No network in tests: Hugging Face libraries read these once, at import, so set them before any import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# A fixed thread count for every tinylm process the tests start (runs compared bit for bit must not each
# pick their own from the machine's load); tests/test_threads.py unsets it to test tinylm's own choice.
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, os.cpu_count() or 1))))

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("TINYLM_DATA_DIR", ROOT.parent / "shared" / "datasets"))
SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"
WIKITEXT_VALID = DATA_DIR / "wikitext-2" / "valid.txt"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINYLM_DATA_DIR", str(DATA_DIR))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    assert SHAKESPEARE.is_file(), f"Tiny Shakespeare not found at {SHAKESPEARE}; set TINYLM_DATA_DIR"
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def shakespeare_slice(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """The first 100k characters of Tiny Shakespeare as a text file."""
    path = tmp_path_factory.mktemp("text") / "slice.txt"
    path.write_text(shakespeare_text[:100_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory: pytest.TempPathFactory, shakespeare_slice: Path) -> Path:
    from tinylm.data import prepare

    out = tmp_path_factory.mktemp("char_data")
    prepare([str(shakespeare_slice)], out, "char")
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, char_data: Path) -> Path:
    """A tiny GPT trained for 60 steps on the Shakespeare slice."""
    from tinylm.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(char_data, out, "tiny", {"max_steps": 60, "eval_interval": 30}, progress=False)
    return out


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer, 32-wide model config; overrides pick the flavour."""
    values = dict(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=32)
    values.update(overrides)
    return ModelConfig(**values)


GPT = dict(position="learned", norm="layernorm", mlp="gelu")
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
FLAVOURS = {
    "gpt": GPT,
    "llama": LLAMA,
    "gpt-moe": {**GPT, "n_expert": 4, "n_expert_active": 2},
    "llama-moe": {**LLAMA, "n_expert": 4, "n_expert_active": 2},
    "llama-gqa": {**LLAMA, "n_kv_head": 2},
    # issue 22's speedrun options, all on (zero_init aside: it only changes the initial weights), 3 layers so
    # the U-net skip joins two different blocks and one layer has no value embedding
    "speedrun": {
        **LLAMA,
        "n_layer": 3,
        "mlp": "relu2",
        "qk_norm": True,
        "value_embeds": 1,
        "embed_skip": True,
        "unet_skips": True,
        "logit_softcap": 15.0,
    },  # fmt: skip
}


def start_server(app):
    """Run an ASGI `app` with uvicorn on a free 127.0.0.1 port in a thread; (server, thread, url)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"
