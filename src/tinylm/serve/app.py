"""The HTTP app: OpenAI-compatible routes over the engine, server-sent events, metrics and the playground.

A request passes, in order: the body limit (BodyLimit, before any parsing), JSON and schema
(pydantic: fixed ranges), the operator's limits (ServeConfig: n, max_tokens, logprobs, stop strings,
before any work), tokenization and retrieval on a worker thread (never on the event loop) with the
prompt limit, then the engine's queue. Every refusal or failure leaves as OpenAI's error body, and
one request's failure never reaches another request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tinylm.chat import CHAT_STOP, render_chat
from tinylm.checkpoint import LoadedRun
from tinylm.config import SampleConfig, ServeConfig, sample_config
from tinylm.errors import TinyLMError
from tinylm.generate import prompt_ids
from tinylm.serve.engine import Engine, EngineDead, Event, QueueFull, Ticket
from tinylm.serve.errors import APIError, error_body, install_error_handlers
from tinylm.serve.metrics import AccessLog, BodyLimit, Metrics
from tinylm.serve.playground import attention_data, run_card
from tinylm.serve.retrieval import Retriever
from tinylm.serve.schemas import AttentionRequest, ChatRequest, CompletionRequest, SamplingRequest

STATIC = Path(__file__).parent / "static"
POLL_SECONDS = 0.5  # how often a waiting request checks that its client and the engine are still there
INLINE_CHARS = 2048  # prompts up to this many characters are tokenized on the event loop (microseconds)
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "max_tokens")


@dataclass
class Job:
    """A validated request: one prompt per choice, its sampling settings and what to report."""

    prompts: list[list[int]]
    cfgs: list[SampleConfig]
    prompt_tokens: int
    logprobs: int | None = None
    sources: list[dict] = field(default_factory=list)


class Inbox:
    """One request's events on the event loop; awaited with a timeout but without a task per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.items, self.waiter = loop, deque(), None

    def put(self, event: Event) -> None:
        self.items.append(event)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self, timeout: float) -> Event | None:
        """The next event, or None when `timeout` seconds pass without one."""
        if not self.items:
            self.waiter = waiter = self.loop.create_future()
            handle = self.loop.call_later(timeout, lambda: waiter.done() or waiter.set_result(None))
            try:
                await waiter
            finally:
                handle.cancel()
                self.waiter = None
        return self.items.popleft() if self.items else None


class Mailbox:
    """Events from the engine thread to one event loop: a single wake-up of the loop per burst of events
    (one decode step's), not one per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.lock = loop, threading.Lock()
        self.pending: list[tuple[Inbox, Event]] = []
        self.scheduled = False

    def sink(self, inbox: Inbox) -> Callable[[Event], None]:
        """What the engine calls with each event of the request that reads `inbox` (any thread)."""

        def post(event: Event) -> None:
            with self.lock:
                self.pending.append((inbox, event))
                if self.scheduled:
                    return
                self.scheduled = True
            self.loop.call_soon_threadsafe(self._deliver)

        return post

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for inbox, event in items:
            inbox.put(event)


def _characters(text: str, param: str) -> None:
    """Refuse a lone UTF-16 surrogate (JSON's "\\ud800" decodes to one): it is no character, and tokenizers
    cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(
            f"The {param} holds {text[exc.start]!r}, a lone UTF-16 surrogate, which is not a character.",
            400,
            param=param,
            code="unsupported_characters",
        ) from None


def _limit(message: str, param: str | None) -> APIError:
    return APIError(message, 400, param=param, code="limit_exceeded")


class Server:
    """The state behind the routes: the run, its engine, the limits, and request preparation."""

    def __init__(
        self,
        run: LoadedRun,
        engine: Engine,
        name: str,
        retriever: Retriever | None,
        limits: ServeConfig,
    ) -> None:
        self.run, self.engine, self.name, self.retriever, self.limits = run, engine, name, retriever, limits
        self.block_size = run.model.cfg.block_size
        self.max_prompt_tokens = limits.max_prompt_tokens or self.block_size
        self.created = int(time.time())
        self.cancelled = 0  # requests whose client went away before they finished
        self.metrics = Metrics(engine)
        self.mailbox: Mailbox | None = None  # made on the event loop by the first request

    # ----- checks before any work (on the event loop: cheap) ----------------------------------
    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(
                f"The model {model!r} does not exist; this server serves {self.name!r}.",
                404,
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def check(self, req: SamplingRequest, prompts: int, logprobs: int | None, logprobs_param: str) -> None:
        """The operator's limits (ServeConfig), each refusal naming its limit and flag."""
        self.check_model(req.model)
        lim = self.limits
        if req.n * prompts > lim.max_n:
            raise _limit(
                f"n ({req.n}) x {prompts} prompt(s) asks for {req.n * prompts} choices; this server allows "
                f"at most {lim.max_n} per request (tinylm serve --max-n).",
                "n",
            )
        if req.max_tokens is not None and req.max_tokens > lim.max_tokens:
            raise _limit(
                f"max_tokens ({req.max_tokens}) is above this server's limit of {lim.max_tokens} "
                "(tinylm serve --max-tokens-limit).",
                "max_tokens",
            )
        if logprobs is not None and logprobs > lim.max_logprobs:
            raise _limit(
                f"{logprobs_param} ({logprobs}) is above this server's limit of {lim.max_logprobs} "
                "(tinylm serve --max-logprobs).",
                logprobs_param,
            )
        stops = req.stops()
        if len(stops) > lim.max_stop:
            raise _limit(
                f"{len(stops)} stop strings given; this server takes at most {lim.max_stop} "
                "(tinylm serve --max-stop).",
                "stop",
            )
        if any(len(s) > lim.max_stop_chars for s in stops):
            raise _limit(
                f"A stop string is longer than this server's limit of {lim.max_stop_chars} characters "
                "(tinylm serve --max-stop-chars).",
                "stop",
            )

    def sample_configs(self, req: SamplingRequest, n: int, stops: tuple[str, ...]) -> list[SampleConfig]:
        """n SampleConfigs (choice i: seed + i); fields the request leaves out take SampleConfig's defaults."""
        max_tokens = req.max_tokens or min(SampleConfig.max_new_tokens, self.limits.max_tokens)
        greedy = req.temperature == 0
        base = dict(
            max_new_tokens=max_tokens,
            temperature=None if greedy else req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            repetition_penalty=req.repetition_penalty,
            greedy=greedy,
            stop=stops + req.stops(),
        )
        try:
            return [
                sample_config(None, **base, seed=None if req.seed is None else req.seed + i) for i in range(n)
            ]
        except TinyLMError as exc:  # a range SampleConfig refuses (e.g. a temperature too small to be finite)
            word = str(exc).split(" ", 1)[0]
            raise APIError(str(exc), 400, param=word if word in SAMPLING_FIELDS else None) from None

    # ----- preparation (on a worker thread: tokenizing and retrieval may take a while) -----------
    def encode(self, text: str, param: str) -> list[int]:
        """Prompt ids as generate.prompt_ids makes them, refusing text the vocabulary cannot hold."""
        _characters(text, param)
        try:
            ids = prompt_ids(self.run.tokenizer, text)
        except TinyLMError as exc:
            raise APIError(str(exc), 400, param=param, code="unsupported_characters") from None
        if len(ids) > self.max_prompt_tokens:
            raise APIError(
                f"The prompt has {len(ids)} tokens; this server takes at most {self.max_prompt_tokens} per "
                "prompt (the model's context unless tinylm serve --max-prompt-tokens says otherwise).",
                400,
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def prepare(
        self, req: SamplingRequest, texts: list[str], param: str, cfgs: list[SampleConfig], query: str | None
    ) -> Job:
        """Retrieve passages (with --index), encode each prompt, and pair each with its n configs."""
        for text in texts:
            _characters(text, param)  # before retrieval too
        sources: list[dict] = []
        if self.retriever is not None and req.retrieval is not False:
            augmented = []
            for text in texts:
                prompt, used = self.retriever.augment(
                    text if query is None else query, text, cfgs[0].max_new_tokens
                )
                augmented.append(prompt)
                sources.extend(used)
            texts = augmented
        encoded = [self.encode(t, param) for t in texts]
        prompts = [ids for ids in encoded for _ in range(req.n)]
        return Job(prompts, cfgs * len(encoded), sum(map(len, encoded)), sources=sources)

    async def prepare_off_loop(
        self, req: SamplingRequest, texts: list[str], param: str, cfgs: list[SampleConfig], query: str | None
    ) -> Job:
        """prepare() on a worker thread, so the event loop keeps serving while long prompts are tokenized
        or passages retrieved; short prompts without retrieval (microseconds of work) skip the hop."""
        if self.retriever is None and sum(map(len, texts)) <= INLINE_CHARS:
            return self.prepare(req, texts, param, cfgs, query)
        return await asyncio.to_thread(self.prepare, req, texts, param, cfgs, query)

    def submit(self, job: Job) -> tuple[Ticket, Inbox]:
        """Queue the job's sequences; their events arrive in the returned inbox."""
        loop = asyncio.get_running_loop()
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = Mailbox(loop)
        inbox = Inbox(loop)
        try:
            return self.engine.submit(job.prompts, job.cfgs, self.mailbox.sink(inbox), job.logprobs), inbox
        except QueueFull as exc:
            raise APIError(str(exc), 429, "rate_limit_error", code="queue_full") from None
        except EngineDead as exc:
            raise APIError(str(exc), 503, "server_error", code="engine_stopped") from None

    def failure(self, event: Event) -> APIError:
        """The error ending a request whose sequence failed (the engine stopping, or this sequence alone)."""
        if not self.engine.alive:
            return APIError(event.error or "The engine stopped.", 503, "server_error", code="engine_stopped")
        return APIError(f"Generation failed: {event.error}", 500, "server_error", code="generation_failed")


async def _events(
    server: Server, ticket: Ticket, inbox: Inbox, n: int, request: Request | None, started: float
) -> AsyncIterator[Event]:
    """Events of all n choices until each has finished; the client going away cancels the rest, and the
    engine stopping ends them with errors (nobody waits for a dead engine)."""
    unfinished, last = set(range(n)), {}
    metrics = server.metrics
    try:
        while unfinished:
            event = await inbox.get(POLL_SECONDS)
            if event is None:  # nothing for a while: is anyone still there?
                if not server.engine.alive:
                    for i in sorted(unfinished):
                        yield Event(i, finish_reason="error", error=server.engine.dead_message())
                    unfinished.clear()
                    return
                if request is not None and await request.is_disconnected():
                    return
                continue
            now = time.perf_counter()
            if not last:
                metrics.ttft.observe(now - started)
            elif event.index in last:
                metrics.token_latency.observe(now - last[event.index])
            last[event.index] = now
            if event.finish_reason is not None:
                unfinished.discard(event.index)
            yield event
    finally:
        if unfinished:
            ticket.cancel()
            server.cancelled += 1


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _Choice:
    """The accumulated text, log-probabilities and finish reason of one choice."""

    def __init__(self, strip_leading: bool) -> None:
        self.pieces: list[str] = []
        self.tokens, self.finish_reason, self.count, self.length = [], None, 0, 0
        self.strip_leading = strip_leading  # chat replies follow "Assistant:" and start with a space

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, event: Event) -> str:
        piece = event.text
        if self.strip_leading and not self.length:
            piece = piece.lstrip(" ")
        self.pieces.append(piece)
        self.length += len(piece)
        if event.token is not None:
            self.tokens.append(event.token)
        self.count = event.completion_tokens
        self.finish_reason = event.finish_reason or self.finish_reason
        return piece


def _completion_logprobs(tokens: list, offset: int = 0) -> dict:
    text_offset, pos = [], offset
    for t in tokens:
        text_offset.append(pos)
        pos += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": text_offset,
    }


def _chat_logprobs(tokens: list) -> dict:
    entry = lambda text, lp: {"token": text, "logprob": lp, "bytes": list(text.encode())}  # noqa: E731
    return {
        "content": [
            {**entry(t.text, t.logprob), "top_logprobs": [entry(a, b) for a, b in t.top]} for t in tokens
        ]
    }


def create_app(
    run: LoadedRun,
    name: str | None = None,
    limits: ServeConfig | None = None,
    retriever: Retriever | None = None,
    engine: Engine | None = None,
) -> FastAPI:
    """The FastAPI app serving `run` under the model id `name` (default: the run directory's name)."""
    limits = limits or ServeConfig()
    engine = engine or Engine(run.model, run.tokenizer, limits.max_batch, limits.max_queue)
    server = Server(run, engine, name or run.path.name, retriever, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="tinylm", lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> Any:
        body = {
            "status": "ok" if engine.alive else "error",
            "model": server.name,
            "active": engine.active,
            "waiting": engine.waiting,
        }
        if not engine.alive:
            return JSONResponse({**body, "error": engine.dead_message()}, status_code=503)
        return body

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "tinylm"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != server.name:
            raise APIError(
                f"The model {model_id!r} does not exist.", 404, param="model", code="model_not_found"
            )
        return model_card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        started = time.perf_counter()
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        server.check(req, len(texts), req.logprobs, "logprobs")
        cfgs = server.sample_configs(req, req.n, ())
        job = await server.prepare_off_loop(req, texts, "prompt", cfgs, None)
        job.logprobs = req.logprobs
        echo = texts if req.echo else None
        return await _respond(server, job, req, request, chat=False, echo=echo, started=started)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        started = time.perf_counter()
        server.check(req, 1, req.top_logprobs if req.logprobs else None, "top_logprobs")
        cfgs = server.sample_configs(req, req.n, CHAT_STOP)
        prompt = render_chat([m.model_dump() for m in req.messages])
        query = req.messages[-1].content
        job = await server.prepare_off_loop(req, [prompt], "messages", cfgs, query)
        job.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return await _respond(server, job, req, request, chat=True, started=started)

    @app.get("/v1/playground/run")
    async def playground_run() -> dict[str, Any]:
        return run_card(run, server.name)

    @app.post("/v1/playground/attention")
    async def playground_attention(req: AttentionRequest) -> dict[str, Any]:
        # refuse characters outside the vocabulary (and prompts over the limit) as the API does
        await asyncio.to_thread(server.encode, req.prompt, "prompt")
        future = engine.call(lambda: attention_data(run, req.prompt, req.n_tokens))
        try:
            return await asyncio.wrap_future(future)
        except TinyLMError as exc:
            raise APIError(str(exc), 400, param="n_tokens") from None
        except EngineDead as exc:
            raise APIError(str(exc), 503, "server_error", code="engine_stopped") from None

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _with_limits(
                get_openapi(title=app.title, version="1", routes=app.routes), limits
            )
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    routes = frozenset(getattr(r, "path", "") for r in app.routes)
    app.add_middleware(AccessLog, metrics=server.metrics, routes=routes)  # outermost: sees 413s too
    return app


def _with_limits(schema: dict[str, Any], limits: ServeConfig) -> dict[str, Any]:
    """The OpenAPI schema with this server's limits written into the request bodies (clients and fuzzers see
    them; the server checks them anyway)."""
    bounds = {
        "n": {"maximum": limits.max_n},
        "max_tokens": {"maximum": limits.max_tokens},
        "logprobs": {"maximum": limits.max_logprobs},
        "top_logprobs": {"maximum": limits.max_logprobs},
        "stop": {"maxItems": limits.max_stop, "maxLength": limits.max_stop_chars},
    }
    for model in schema.get("components", {}).get("schemas", {}).values():
        for name, extra in bounds.items():
            prop = model.get("properties", {}).get(name)
            for branch in [prop] if prop and "anyOf" not in prop else (prop or {}).get("anyOf", []):
                kind = branch.get("type")
                if kind == "integer":
                    branch.update({k: v for k, v in extra.items() if k == "maximum"})
                elif kind == "array":
                    branch["maxItems"] = extra["maxItems"]
                    branch.setdefault("items", {})["maxLength"] = extra["maxLength"]
                elif kind == "string" and "maxLength" in extra:
                    branch["maxLength"] = extra["maxLength"]
    return schema


async def _respond(
    server: Server,
    job: Job,
    req: SamplingRequest,
    request: Request,
    chat: bool,
    echo: list[str] | None = None,
    started: float = 0.0,
) -> Any:
    ticket, inbox = server.submit(job)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    head = {"id": rid, "created": int(time.time()), "model": server.name}
    if job.sources:
        head["sources"] = job.sources
    n = len(job.prompts)
    if req.stream:
        stream = _stream(server, job, req, ticket, inbox, head, chat, started)
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    choices = [_Choice(chat) for _ in range(n)]
    async for event in _events(server, ticket, inbox, n, request, started):
        if event.error:
            raise server.failure(event)
        choices[event.index].add(event)
    if any(c.finish_reason is None for c in choices):  # the client left
        return JSONResponse(error_body("The client closed the request.", "invalid_request_error"), 499)
    usage = _usage(job.prompt_tokens, sum(c.count for c in choices))
    if chat:
        body = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c.tokens) if job.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ]
        return {**head, "object": "chat.completion", "choices": body, "usage": usage}
    per_prompt = n // max(1, len(echo)) if echo else n
    body = []
    for i, c in enumerate(choices):
        prefix = echo[i // per_prompt] if echo else ""
        logprobs = _completion_logprobs(c.tokens, len(prefix)) if job.logprobs is not None else None
        body.append(
            {"index": i, "text": prefix + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}
        )
    return {**head, "object": "text_completion", "choices": body, "usage": usage}


async def _stream(
    server: Server,
    job: Job,
    req: SamplingRequest,
    ticket: Ticket,
    inbox: Inbox,
    head: dict,
    chat: bool,
    started: float,
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per event with new text, then usage (if asked) and [DONE]."""
    n = len(job.prompts)
    kind = "chat.completion.chunk" if chat else "text_completion"
    choices = [_Choice(chat) for _ in range(n)]
    if chat:
        for i in range(n):
            delta = {"role": "assistant", "content": ""}
            yield _sse(
                {
                    **head,
                    "object": kind,
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}],
                }
            )
    async for event in _events(server, ticket, inbox, n, None, started):
        if event.error:
            failure = server.failure(event)
            yield _sse(error_body(failure.message, failure.type, None, failure.code))
            break
        choice = choices[event.index]
        offset = choice.length
        piece = choice.add(event)
        if not piece and event.token is None and event.finish_reason is None:
            continue
        tokens = [event.token] if event.token is not None else []
        if chat:
            logprobs = _chat_logprobs(tokens) if job.logprobs is not None else None
            delta = {"content": piece} if piece else {}
            entry = {
                "index": event.index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": event.finish_reason,
            }
        else:
            logprobs = _completion_logprobs(tokens, offset) if job.logprobs is not None else None
            entry = {
                "index": event.index,
                "text": piece,
                "logprobs": logprobs,
                "finish_reason": event.finish_reason,
            }
        yield _sse({**head, "object": kind, "choices": [entry]})
    if req.stream_options is not None and req.stream_options.include_usage:
        usage = _usage(job.prompt_tokens, sum(c.count for c in choices))
        yield _sse({**head, "object": kind, "choices": [], "usage": usage})
    yield _sse("[DONE]")
