"""The HTTP app: OpenAI-compatible routes over the engine, server-sent events, and the playground."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from tinylm.chat import CHAT_STOP, render_chat
from tinylm.checkpoint import LoadedRun
from tinylm.config import SampleConfig
from tinylm.errors import TinyLMError
from tinylm.serve.engine import Engine, Event, QueueFull, Ticket
from tinylm.serve.errors import APIError, error_body, install_error_handlers
from tinylm.serve.playground import attention_data, run_card
from tinylm.serve.retrieval import Retriever
from tinylm.serve.schemas import AttentionRequest, ChatRequest, CompletionRequest, SamplingRequest

STATIC = Path(__file__).parent / "static"


@dataclass
class Job:
    """A validated request: one prompt per choice, its sampling settings and what to report."""

    prompts: list[list[int]]
    cfgs: list[SampleConfig]
    prompt_tokens: int
    logprobs: int | None = None
    sources: list[dict] = field(default_factory=list)


class Server:
    """The state behind the routes: the run, its engine, and request preparation."""

    def __init__(self, run: LoadedRun, engine: Engine, name: str, retriever: Retriever | None) -> None:
        self.run, self.engine, self.name, self.retriever = run, engine, name, retriever
        self.block_size = run.model.cfg.block_size
        self.created = int(time.time())
        self.cancelled = 0  # requests whose client went away before they finished

    def check_model(self, req: SamplingRequest) -> None:
        if req.model != self.name:
            raise APIError(
                f"The model {req.model!r} does not exist; this server serves {self.name!r}.",
                404,
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def encode(self, text: str, param: str) -> list[int]:
        """Prompt ids as generate.encode_prompt makes them, refusing text the vocabulary cannot hold."""
        try:
            ids = self.run.tokenizer.encode(text) if text else []
        except TinyLMError as exc:
            raise APIError(str(exc), 400, param=param, code="unsupported_characters") from None
        eot = self.run.tokenizer.eot_id
        return ids or [eot if eot is not None else 0]

    def job(self, req: SamplingRequest, texts: list[str], param: str, stops: tuple[str, ...] = ()) -> Job:
        """Encode each prompt, check it fits the context with max_tokens, and build n configs per prompt."""
        self.check_model(req)
        sources: list[dict] = []
        if self.retriever is not None and req.retrieval is not False:
            texts, sources = self._retrieve(req, texts)
        encoded = [self.encode(t, param) for t in texts]
        prompts, cfgs = [], []
        for ids in encoded:
            room = self.block_size - len(ids)
            max_tokens = req.max_tokens if req.max_tokens is not None else room
            if max_tokens > room or room < 1:
                raise APIError(
                    f"This model's context is {self.block_size} tokens; the prompt has {len(ids)} and "
                    f"max_tokens is {max_tokens}. Shorten the prompt or lower max_tokens.",
                    400,
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            for i in range(req.n):
                prompts.append(ids)
                cfgs.append(self.sample_config(req, max_tokens, i, stops))
        return Job(prompts, cfgs, sum(len(ids) for ids in encoded), sources=sources)

    @staticmethod
    def sample_config(
        req: SamplingRequest, max_tokens: int, choice: int, stops: tuple[str, ...]
    ) -> SampleConfig:
        greedy = req.temperature == 0
        try:
            return SampleConfig(
                max_new_tokens=max_tokens,
                temperature=1.0 if greedy else req.temperature,
                top_k=req.top_k,
                top_p=req.top_p,
                repetition_penalty=req.repetition_penalty,
                do_sample=not greedy,
                seed=None if req.seed is None else req.seed + choice,
                stop=stops + req.stops(),
            )
        except TinyLMError as exc:
            raise APIError(str(exc), 400) from None

    def _retrieve(self, req: SamplingRequest, texts: list[str]) -> tuple[list[str], list[dict]]:
        query = req.messages[-1].content if isinstance(req, ChatRequest) else texts[0]
        budget = self.block_size - (req.max_tokens or 0)
        out, sources = [], []
        for text in texts:
            prompt, used = self.retriever.augment(
                query if isinstance(req, ChatRequest) else text, text, budget
            )
            out.append(prompt)
            sources.extend(used)
        return out, sources

    def submit(self, job: Job) -> tuple[Ticket, asyncio.Queue]:
        """Queue the job's sequences; their events arrive on the returned asyncio queue."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        sink = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)  # noqa: E731
        try:
            return self.engine.submit(job.prompts, job.cfgs, sink, job.logprobs), queue
        except QueueFull as exc:
            raise APIError(str(exc), 429, "rate_limit_error", code="queue_full") from None


async def _events(
    server: Server, ticket: Ticket, queue: asyncio.Queue, n: int, request: Request | None
) -> AsyncIterator[Event]:
    """Events of all n choices until each has finished; the client going away cancels the rest."""
    finished = 0
    try:
        while finished < n:
            if request is None:
                event = await queue.get()
            else:  # a non-streaming client: notice it leaving while we wait
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
            finished += event.finish_reason is not None
            yield event
    finally:
        if finished < n:
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
        self.text, self.tokens, self.finish_reason, self.count = "", [], None, 0
        self.strip_leading = strip_leading  # chat replies follow "Assistant:" and start with a space

    def add(self, event: Event) -> str:
        piece = event.text
        if self.strip_leading and not self.text:
            piece = piece.lstrip(" ")
        self.text += piece
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
    max_batch: int = 16,
    max_queue: int = 256,
    retriever: Retriever | None = None,
    engine: Engine | None = None,
) -> FastAPI:
    """The FastAPI app serving `run` under the model id `name` (default: the run directory's name)."""
    engine = engine or Engine(run.model, run.tokenizer, max_batch, max_queue)
    server = Server(run, engine, name or run.path.name, retriever)

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
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.name, "active": engine.active, "waiting": engine.waiting}

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
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        job = server.job(req, texts, "prompt")
        job.logprobs = req.logprobs
        return await _respond(server, job, req, request, chat=False, echo=texts if req.echo else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        prompt = render_chat([m.model_dump() for m in req.messages])
        job = server.job(req, [prompt], "messages", CHAT_STOP)
        job.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return await _respond(server, job, req, request, chat=True)

    @app.get("/v1/playground/run")
    async def playground_run() -> dict[str, Any]:
        return run_card(run, server.name)

    @app.post("/v1/playground/attention")
    async def playground_attention(req: AttentionRequest) -> dict[str, Any]:
        server.encode(req.prompt, "prompt")  # refuse characters outside the vocabulary as the API does
        future = engine.call(lambda: attention_data(run, req.prompt, req.n_tokens))
        try:
            return await asyncio.wrap_future(future)
        except TinyLMError as exc:
            raise APIError(str(exc), 400, param="n_tokens") from None

    return app


async def _respond(
    server: Server,
    job: Job,
    req: SamplingRequest,
    request: Request,
    chat: bool,
    echo: list[str] | None = None,
) -> Any:
    ticket, queue = server.submit(job)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    head = {"id": rid, "created": int(time.time()), "model": server.name}
    if job.sources:
        head["sources"] = job.sources
    n = len(job.prompts)
    if req.stream:
        stream = _stream(server, job, req, ticket, queue, head, chat)
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    choices = [_Choice(chat) for _ in range(n)]
    async for event in _events(server, ticket, queue, n, request):
        if event.error:
            raise APIError(f"Generation failed: {event.error}", 500, "server_error")
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
    queue: asyncio.Queue,
    head: dict,
    chat: bool,
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
    async for event in _events(server, ticket, queue, n, None):
        if event.error:
            yield _sse(error_body(f"Generation failed: {event.error}", "server_error"))
            break
        choice = choices[event.index]
        offset = len(choice.text)
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
