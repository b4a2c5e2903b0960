"""The scheduler: requests join and leave one shared KV-cache decode loop between decode steps.

One engine thread owns the model. Each step it decodes every active row by one token with a single
batched forward pass (plus one for rows past the context of a model with learned positions, which
re-encode their last block_size tokens: generate()'s cropping rule; RoPE models keep a rolling cache
instead), prefills the sequences admitted into free rows, samples all rows' next tokens in one call
(generate.sample_rows: each row its own SampleConfig and seeded generator, so a request's text is
the text generate() gives it alone) and copies the new tokens to the host once. Text goes through
generate.RowText, the one stop-string and end-of-text rule. Per step the host work is O(1) per row:
no history tensors, no per-row syncs, incremental detokenization.

Isolation: whatever fails for one sequence (its admission or prefill, non-finite sampling numbers,
its detokenization, its client) ends that sequence alone with an error event. If the thread dies
anyway, `alive` turns False, every waiting and active sequence gets an error event, and submit()
raises EngineDead.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.nn as nn

from tinylm.config import SampleConfig, ServeConfig
from tinylm.generate import NOT_FINITE, RowSampling, RowText, end_of_text, make_generator, sample_rows
from tinylm.serve.forward import BatchedForward
from tinylm.tokenizer import Tokenizer

LOG = logging.getLogger("tinylm.serve")


class QueueFull(Exception):
    """More sequences are waiting than the queue allows."""


class EngineDead(Exception):
    """The engine thread has stopped: nothing can be decoded any more."""


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
    text: RowText
    logprobs: int | None = None  # alternatives to report per token; None = no log-probabilities
    generator: torch.Generator | None = None
    row: int = -1
    generated: int = 0  # tokens sampled so far
    position: int = 0  # position of the newest token (the one fed next)
    crop: bool = False  # past the context of a learned-position model: re-encoded every step


@dataclass
class Running:
    """The rows that were active before this step, as the forward passes take them (cached until they change)."""

    decoded: list[Sequence]  # fed one token each through the batched decode forward, in row order
    cropped: list[Sequence]  # past a learned-position context: re-encoded through their windows
    decoded_rows: torch.Tensor  # (n_decoded,) their rows
    cropped_rows: torch.Tensor  # (n_cropped,)
    span: int  # the decode forward covers rows 0..span-1


@dataclass
class Batch:
    """All rows sampled in a step, in the order of their logits, with their sampling settings."""

    seqs: list[Sequence]  # decoded rows, cropped rows, then rows prefilled this step
    order: torch.Tensor  # (n,) their rows
    sampling: RowSampling
    generators: list[torch.Generator | None]
    logprobs: list[int]  # indices into seqs of rows reporting log-probabilities
    chosen: torch.Tensor  # ... the same, on the device
    top: int  # the most alternatives any of them asks for


class Engine:
    """A background thread that decodes all admitted sequences together, one token per step."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        max_batch: int = ServeConfig.max_batch,
        max_queue: int = ServeConfig.max_queue,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.block, self.vocab = model.cfg.block_size, model.cfg.vocab_size
        self.rolling = model.cfg.position == "rope"  # past the context: rolling cache, else re-encoding
        self.forward = BatchedForward(model, max_batch, self.rolling)
        self.device = next(model.parameters()).device
        self.eot = end_of_text(tokenizer)  # as generate() ends rows
        # Per-row state on the device: the newest token of each row and its position; free rows are
        # parked at token 0, position 0. `window` holds each row's last block_size tokens (by
        # position modulo block_size) for the cropping rule; `seen` marks tokens for repetition penalties.
        zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=self.device)  # noqa: E731
        self.tokens, self.positions = zeros(max_batch), zeros(max_batch)
        self.window = None if self.rolling else zeros(max_batch, self.block)
        self.parked = None if self.rolling else zeros(max_batch, dtype=torch.bool)  # rows re-encoding
        self.back = torch.arange(self.block - 1, -1, -1, device=self.device)  # block-1 ... 0, for cropping
        self.seen: torch.Tensor | None = None  # made when a request first asks for a penalty
        self._waiting: deque[Sequence] = deque()
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()  # run between steps
        self._active: list[Sequence] = []
        self._admitted: list[Sequence] = []  # prefilled in the current step
        self._running_cache: Running | None = None  # None: rebuild before the next step
        self._batch: Batch | None = None
        self._free_rows = list(range(max_batch))
        self._wake = threading.Condition()
        self._running = threading.Event()  # cleared by pause(): tests line requests up deterministically
        self._running.set()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="tinylm-engine", daemon=True)
        self.error: str | None = None  # why the thread died, if it did
        self.stats = {"steps": 0, "tokens": 0, "max_rows": 0, "admitted": 0, "failed": 0}

    # ----- the request side (any thread) -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._running.set()
            self._wake.notify()
        if self._thread.is_alive():
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
            if not self.alive:
                future.set_exception(EngineDead(self.dead_message()))
                return future
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running (or not started yet) and will decode what is submitted."""
        return (
            self.error is None and not self._closing and (self._thread.is_alive() or not self._thread.ident)
        )

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
        """Queue one sequence per (prompt, cfg) pair as choices 0, 1, ...; raises QueueFull or EngineDead.

        Prompts longer than the context keep their last block_size tokens (as generate() does)."""
        ticket = Ticket(sink)
        seqs = [
            Sequence(
                ticket, i, ids[-self.block :], cfg, RowText(self.tokenizer, cfg.stop, self.eot), logprobs
            )
            for i, (ids, cfg) in enumerate(zip(prompts, cfgs))
        ]
        with self._wake:
            if not self.alive:
                raise EngineDead(self.dead_message())
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} sequences are waiting and the queue holds {self.max_queue}; retry later."
                )
            self._waiting.extend(seqs)
            self._wake.notify()
        return ticket

    def dead_message(self) -> str:
        return f"The engine has stopped ({self.error or 'closed'}); restart the server."

    # ----- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # whatever ends the thread is recorded, logged and reported to all
            self.error = f"{type(exc).__name__}: {exc}"
            LOG.error("The engine thread stopped: %s", self.error, exc_info=exc)
        finally:
            self._fail_everything()

    def _run(self) -> None:
        while True:
            self._running.wait()
            with self._wake:
                if self._closing:
                    return
                self._drop_cancelled()
                calls, self._calls = list(self._calls), deque()
                self._admit()
                if not self._active and not calls:
                    self._wake.wait()
                    continue
            for fn, future in calls:
                self._run_call(fn, future)
            if self._active:
                self._step()

    def _fail_everything(self) -> None:
        """The thread is ending: every sequence and call still pending gets an error."""
        self.error = self.error or "closed"
        with self._wake:
            pending, self._waiting = [*self._active, *self._waiting], deque()
            calls, self._calls = list(self._calls), deque()
        for seq in pending:
            self._report(seq, Event(seq.index, "", None, "error", seq.generated, self.dead_message()))
        self._active = []
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineDead(self.dead_message()))

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

    def _admit(self) -> None:
        """Move waiting sequences into free rows; one that cannot start fails alone."""
        while self._waiting and self._free_rows:
            seq = self._waiting.popleft()
            try:
                seq.generator = make_generator(seq.cfg.seed, self.device) if seq.cfg.do_sample else None
                if seq.cfg.repetition_penalty != 1.0 and self.seen is None:
                    self.seen = torch.zeros(self.max_batch, self.vocab, dtype=torch.bool, device=self.device)
            except Exception as exc:
                self._fail(seq, exc)
                continue
            seq.row = self._free_rows.pop(0)  # lowest free row: active rows stay packed at the front
            self._active.append(seq)
            self._admitted.append(seq)
            self._invalidate()
            self.stats["admitted"] += 1

    def _release(self, seq: Sequence) -> None:
        if seq in self._active:
            self._active.remove(seq)
            self._free_rows.append(seq.row)
            self._free_rows.sort()
            self.tokens[seq.row] = 0  # parked: fed at position 0 of its free cache
            self.positions[seq.row] = 0
            if self.parked is not None:
                self.parked[seq.row] = False
            self._invalidate()
        if seq in self._admitted:
            self._admitted.remove(seq)

    def _fail(self, seq: Sequence, exc: BaseException | str) -> None:
        """End one sequence with an error; the others carry on."""
        self.stats["failed"] += 1
        message = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self._finish(seq, "error", error=message)

    def _report(self, seq: Sequence, event: Event) -> None:
        try:
            seq.ticket.sink(event)
        except Exception:  # the client's side is gone (e.g. its event loop closed): stop its choices
            seq.ticket.cancel()

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        text: str = "",
        token: TokenInfo | None = None,
        error: str | None = None,
    ) -> None:
        self._release(seq)
        self._report(seq, Event(seq.index, text, token, reason, seq.generated, error))

    # ----- one step -----------------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._running_cache, self._batch = None, None

    def _step(self) -> None:
        """Decode the running rows, prefill the admitted ones, sample all of them and report."""
        try:
            with torch.no_grad():
                parts, fresh = self._forward_all(list(self._admitted))
                if not parts:
                    return
                batch = self._batch if self._batch is not None and not fresh else self._build_batch(fresh)
                logits = torch.cat(parts) if len(parts) > 1 else parts[0]
                tokens = sample_rows(logits, batch.sampling, self._seen_rows(batch), batch.generators)
                host = self._advance(batch, logits, tokens)
        except Exception as exc:  # not one request's fault (e.g. out of memory): fail the rows in flight
            for seq in list(self._active):
                self._fail(seq, exc)
            return
        finally:
            if self._admitted:
                self._admitted.clear()
                self._invalidate()  # the admitted rows are decoded rows from the next step on
        self.stats["steps"] += 1
        self.stats["tokens"] += len(batch.seqs)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(batch.seqs))
        self._report_tokens(batch, host)

    def _running_rows(self) -> Running:
        if self._running_cache is None:
            fresh = set(map(id, self._admitted))
            seqs = [s for s in self._active if id(s) not in fresh]
            decoded = sorted((s for s in seqs if not s.crop), key=lambda s: s.row)
            cropped = [s for s in seqs if s.crop]
            self._running_cache = Running(
                decoded,
                cropped,
                self._rows(decoded),
                self._rows(cropped),
                span=decoded[-1].row + 1 if decoded else 0,
            )
        return self._running_cache

    def _rows(self, seqs: list[Sequence]) -> torch.Tensor:
        return torch.tensor([s.row for s in seqs], dtype=torch.long, device=self.device)

    def _forward_all(self, fresh: list[Sequence]) -> tuple[list[torch.Tensor], list[Sequence]]:
        """Logits of the running rows (decoded, then cropped), then of each admitted prompt that prefilled."""
        running, parts = self._running_rows(), []
        if running.span:
            tokens, positions = self.tokens[: running.span], self.positions[: running.span]
            if running.cropped:  # rows that re-encode are fed token 0 at position 0, like free ones
                parked = self.parked[: running.span]
                tokens, positions = tokens.masked_fill(parked, 0), positions.masked_fill(parked, 0)
            logits = self.forward.decode(running.span, tokens, positions)  # (span, V)
            parts.append(logits if running.span == len(running.decoded) else logits[running.decoded_rows])
        if running.cropped:
            last = self.positions[running.cropped_rows][:, None]  # (n, 1): the newest token's position
            slots = (last - self.back) % self.block  # the last block_size positions, oldest first
            parts.append(self.forward.crop(self.window[running.cropped_rows[:, None], slots]))
        prefilled = []
        for seq in fresh:
            try:
                parts.append(self._prefill(seq))
                prefilled.append(seq)
            except Exception as exc:  # this prompt alone fails
                self._fail(seq, exc)
        return parts, prefilled

    def _prefill(self, seq: Sequence) -> torch.Tensor:
        """Encode an admitted prompt into its row; logits (1, V). Its row's state: the prompt's last token."""
        idx = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
        logits = self.forward.prefill(seq.row, idx)
        seq.position = len(seq.prompt) - 1
        self.tokens[seq.row] = seq.prompt[-1]
        self.positions[seq.row] = seq.position
        if self.window is not None:
            self.window[seq.row, : idx.size(1)] = idx[0]
        if self.seen is not None and seq.cfg.repetition_penalty != 1.0:
            self.seen[seq.row] = False
            self.seen[seq.row, idx[0]] = True  # the prompt counts as already present
        return logits

    def _build_batch(self, fresh: list[Sequence]) -> Batch:
        running = self._running_rows()
        seqs = running.decoded + running.cropped + fresh
        wanting = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        self._batch = Batch(
            seqs=seqs,
            order=self._rows(seqs),
            sampling=RowSampling.of([s.cfg for s in seqs], self.vocab, self.device),
            generators=[s.generator for s in seqs],
            logprobs=wanting,
            chosen=torch.tensor(wanting, dtype=torch.long, device=self.device),
            top=min(self.vocab, max((seqs[i].logprobs or 0 for i in wanting), default=0)),
        )
        return self._batch

    def _seen_rows(self, batch: Batch) -> torch.Tensor | None:
        return self.seen[batch.order] if batch.sampling.penalize and self.seen is not None else None

    def _advance(self, batch: Batch, logits: torch.Tensor, tokens: torch.Tensor) -> list:
        """Update the rows' device state with the new tokens; bring tokens (and log-probabilities) to the host
        in one copy."""
        fed = tokens.clamp(min=0)
        self.tokens[batch.order] = fed
        self.positions[batch.order] += 1
        if self.window is not None:
            self.window[batch.order, self.positions[batch.order] % self.block] = fed
        if batch.sampling.penalize and self.seen is not None:
            self.seen[batch.order, fed] = True
        if not batch.logprobs:
            return tokens.tolist()
        chosen = batch.chosen
        logp = logits[chosen].float().log_softmax(dim=-1)  # (m, V), before any sampling filter
        picked = logp.gather(-1, fed[chosen][:, None])  # (m, 1)
        values, ids = logp.topk(min(batch.top, self.vocab), dim=-1) if batch.top else (picked[:, :0],) * 2
        extra = torch.cat([picked, values, ids.to(logp.dtype)], dim=-1).double()  # (m, 1 + 2 top)
        return torch.cat([tokens.double(), extra.flatten()]).tolist()  # one copy to the host

    def _report_tokens(self, batch: Batch, host: list) -> None:
        """Per row: the new text through RowText, then an event; finished rows leave the batch."""
        n = len(batch.seqs)
        tokens = [int(t) for t in host[:n]]
        infos = self._token_infos(batch, tokens, host[n:]) if batch.logprobs else {}
        for i, (seq, token) in enumerate(zip(batch.seqs, tokens)):
            if seq.ticket.cancelled:
                continue
            if token < 0:
                self._fail(seq, NOT_FINITE)
                continue
            try:
                self._take(seq, token, infos.get(i))
            except Exception as exc:  # e.g. a tokenizer that cannot decode this id
                self._fail(seq, exc)

    def _take(self, seq: Sequence, token: int, info: TokenInfo | None) -> None:
        seq.position += 1
        if token == self.eot:
            self._finish(seq, "stop", seq.text.push(token), info)  # the held-back text is not lost
            return
        seq.generated += 1
        piece = seq.text.push(token)
        if seq.text.done:
            self._finish(seq, "stop", piece, info)
        elif seq.generated >= seq.cfg.max_new_tokens:
            self._finish(seq, "length", piece + seq.text.finish(), info)
        else:
            self._report(seq, Event(seq.index, piece, info, completion_tokens=seq.generated))
            if self.parked is not None and seq.position >= self.block and not seq.crop:
                seq.crop = True  # its next token is past the learned positions: re-encode from now on
                self.parked[seq.row] = True
                self._invalidate()

    def _token_infos(self, batch: Batch, tokens: list[int], extra: list) -> dict[int, TokenInfo]:
        """Log-probability of each reporting row's token and its top alternatives, from the host copy."""
        width, decode = 1 + 2 * batch.top, self.tokenizer.decode
        out = {}
        for j, i in enumerate(batch.logprobs):
            values = extra[j * width : (j + 1) * width]
            k = min(batch.seqs[i].logprobs or 0, self.vocab)
            top_values, top_ids = values[1 : 1 + k], values[1 + batch.top : 1 + batch.top + k]
            top = [(decode([int(t)]), float(v)) for v, t in zip(top_values, top_ids)]
            out[i] = TokenInfo(decode([max(tokens[i], 0)]), float(values[0]), top)
        return out
