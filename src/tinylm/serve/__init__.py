"""`tinylm serve`: an OpenAI-compatible HTTP server with a batching scheduler and a web playground."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from tinylm.serve.app import create_app
from tinylm.serve.engine import Engine

__all__ = ["Engine", "create_app", "load_app", "run_app"]


def load_app(
    run_dir: str | Path,
    checkpoint: str = "last",
    device: str = "auto",
    name: str | None = None,
    max_batch: int = 16,
    max_queue: int = 256,
    index_dir: str | Path | None = None,
) -> FastAPI:
    """The app serving RUN_DIR (with retrieval over INDEX_DIR when given)."""
    from tinylm.checkpoint import load_run
    from tinylm.runtime import resolve_device

    run = load_run(run_dir, checkpoint, resolve_device(device))
    retriever = None
    if index_dir is not None:
        from tinylm.serve.retrieval import load_retriever

        retriever = load_retriever(index_dir, run.tokenizer, run.model.cfg.block_size)
    return create_app(run, name, max_batch, max_queue, retriever)


def run_app(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
