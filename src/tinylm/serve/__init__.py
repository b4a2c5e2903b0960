"""`tinylm serve`: an OpenAI-compatible HTTP server with a batching scheduler and a web playground."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

from fastapi import FastAPI

from tinylm.config import ServeConfig
from tinylm.errors import TinyLMError
from tinylm.serve.app import create_app
from tinylm.serve.engine import Engine

__all__ = ["Engine", "bind", "create_app", "load_app", "run_app"]


def load_app(
    run_dir: str | Path,
    checkpoint: str = "last",
    device: str = "auto",
    name: str | None = None,
    limits: ServeConfig | None = None,
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
    return create_app(run, name, limits, retriever)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one clear error when the port is taken or the address is wrong."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as exc:
        sock.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TinyLMError(
            f"Cannot listen on {host}:{port} ({why}); choose another --port or --host."
        ) from None
    return sock


def run_app(app: FastAPI, sock: socket.socket, access_log: bool = True) -> None:
    """Serve `app` with uvicorn on the bound socket until interrupted; one access-log line per request."""
    import uvicorn

    log = logging.getLogger("tinylm.serve.access")
    if access_log and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for (as uvicorn.run does: done)
        pass
