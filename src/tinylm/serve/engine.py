"""The scheduler: requests join and leave one shared KV-cache decode loop between decode steps.

One engine thread owns the model. Each step it admits waiting sequences into free rows (prefilling
each one's prompt into its row of the caches), then advances every active row by one token with a
single batched forward pass. Each row samples with generate.py's `select_next`, its own
SampleConfig and its own seeded torch.Generator, so a request's text is the text the same request
gets when decoded alone; batching changes only when its tokens are computed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from tinylm.config import SampleConfig
from tinylm.generate import make_generator, select_next
from tinylm.serve.forward import RowForward, make_forward
from tinylm.serve.text import TextStream
from tinylm.tokenizer import Tokenizer


class QueueFull(Exception):
    """More sequences are waiting than the queue allows."""


@dataclass
class TokenInfo:
    """A generated token, its log-probability under the model and the most likely alternatives."""

    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Event:
    """What happened to one choice of a request in one step (sent to the request's sink)."""

    index: int  # choice index within the request
    text: str = ""  # new text safe to show
    token: TokenInfo | None = None
    finish_reason: str | None = None  # "stop", "length" or "error"
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Ticket:
    """One request in the engine: its choices report to `sink`; `cancel()` stops them all."""

    sink: Callable[[Event], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Sequence:
    """One choice being generated: its prompt, sampling settings, generator, row and text."""

    ticket: Ticket
    index: int
    prompt: list[int]
    cfg: SampleConfig
    stream: TextStream
    logprobs: int | None = None  # alternatives to report per token; None = no log-probabilities
    generator: torch.Generator | None = None
    ids: list[int] = field(default_factory=list)  # prompt + generated so far
    row: int = -1

    @property
    def generated(self) -> int:
        return len(self.ids) - len(self.prompt)


class Engine:
    """A background thread that decodes all admitted sequences together, one token per step."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        max_queue: int = 256,
        forward: RowForward | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.forward = forward or make_forward(model, max_batch)
        self.device = next(model.parameters()).device
        self.eot = tokenizer.eot_id if tokenizer.kind != "char" else None  # as generate.py does
        self._waiting: deque[Sequence] = deque()
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()  # run between steps
        self._active: list[Sequence] = []
        self._free_rows = list(range(max_batch))
        self._wake = threading.Condition()
        self._running = threading.Event()  # cleared by pause(): tests line requests up deterministically
        self._running.set()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="tinylm-engine", daemon=True)
        self.stats = {"steps": 0, "tokens": 0, "max_rows": 0, "admitted": 0}

    # ----- the request side (any thread) -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._running.set()
            self._wake.notify()
        self._thread.join(timeout=10)

    def pause(self) -> None:
        """Stop admitting and stepping (requests still queue up) until resume()."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        with self._wake:
            self._wake.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the engine thread between two steps (it may use the model alone); its future."""
        future: Future = Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(
        self,
        prompts: list[list[int]],
        cfgs: list[SampleConfig],
        sink: Callable[[Event], None],
        logprobs: int | None = None,
    ) -> Ticket:
        """Queue one sequence per (prompt, cfg) pair as choices 0, 1, ...; raises QueueFull."""
        ticket = Ticket(sink)
        seqs = [
            Sequence(ticket, i, ids, cfg, TextStream(self.tokenizer, cfg.stop), logprobs)
            for i, (ids, cfg) in enumerate(zip(prompts, cfgs))
        ]
        with self._wake:
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} sequences are waiting and the queue holds {self.max_queue}; retry later."
                )
            self._waiting.extend(seqs)
            self._wake.notify()
        return ticket

    # ----- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._running.wait()
            with self._wake:
                if self._closing:
                    return
                self._drop_cancelled()
                calls, self._calls = list(self._calls), deque()
                admitted = self._admit()
                if not admitted and not self._active and not calls:
                    self._wake.wait()
                    continue
            for fn, future in calls:
                self._run_call(fn, future)
            try:
                with torch.no_grad():
                    for seq in admitted:
                        self._prefill(seq)
                    if self._active:
                        self._decode_step()
            except Exception as exc:  # a bug must not take the server down: fail the rows in flight
                for seq in list(self._active):
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _run_call(fn: Callable[[], object], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            with torch.no_grad():
                future.set_result(fn())
        except Exception as exc:
            future.set_exception(exc)

    def _drop_cancelled(self) -> None:
        self._waiting = deque(s for s in self._waiting if not s.ticket.cancelled)
        for seq in [s for s in self._active if s.ticket.cancelled]:
            self._release(seq)

    def _admit(self) -> list[Sequence]:
        admitted = []
        while self._waiting and self._free_rows:
            seq = self._waiting.popleft()
            seq.row = self._free_rows.pop(0)  # lowest free row: active rows stay packed at the front
            seq.generator = make_generator(seq.cfg.seed, self.device)
            seq.ids = list(seq.prompt)
            self._active.append(seq)
            admitted.append(seq)
        self.stats["admitted"] += len(admitted)
        return admitted

    def _release(self, seq: Sequence) -> None:
        self._active.remove(seq)
        self._free_rows.append(seq.row)
        self._free_rows.sort()

    def _prefill(self, seq: Sequence) -> None:
        idx = torch.tensor([seq.prompt], device=self.device)
        logits = self.forward.prefill(seq.row, idx)  # (1, V)
        self._take(seq, logits)

    def _decode_step(self) -> None:
        rows = list(self._active)
        tokens = torch.tensor([s.ids[-1] for s in rows], device=self.device)
        positions = torch.tensor([len(s.ids) - 1 for s in rows], device=self.device)
        logits = self.forward.decode([s.row for s in rows], tokens, positions)  # (n, V)
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        for i, seq in enumerate(rows):
            self._take(seq, logits[i : i + 1])

    def _take(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample seq's next token from its (1, V) logits, report it, and finish the row if it is done."""
        previous = torch.tensor([seq.ids], device=self.device)
        token = int(select_next(logits, seq.cfg, previous, seq.generator)[0])
        self.stats["tokens"] += 1
        info = self._token_info(seq, logits[0], token) if seq.logprobs is not None else None
        if token == self.eot:
            self._finish(seq, "stop", token=info)
            return
        seq.ids.append(token)
        text, stopped = seq.stream.push(token)
        if stopped:
            self._finish(seq, "stop", text, info)
        elif seq.generated >= seq.cfg.max_new_tokens:
            self._finish(seq, "length", text + seq.stream.flush(), info)
        else:
            seq.ticket.sink(Event(seq.index, text, info, completion_tokens=seq.generated))

    def _token_info(self, seq: Sequence, logits: torch.Tensor, token: int) -> TokenInfo:
        logp = logits.float().log_softmax(dim=-1)
        k = min(seq.logprobs or 0, logp.numel())
        values, ids = logp.topk(k) if k else (logp[:0], logp[:0].long())
        top = [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]
        return TokenInfo(self.tokenizer.decode([token]), float(logp[token]), top)

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        text: str = "",
        token: TokenInfo | None = None,
        error: str | None = None,
    ) -> None:
        if seq in self._active:
            self._release(seq)
        seq.ticket.sink(Event(seq.index, text, token, reason, seq.generated, error))
