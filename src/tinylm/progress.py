"""Progress for long work: a tqdm bar on a terminal, plain time-based lines when output is a file or pipe."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

PLAIN_EVERY = 10.0  # seconds between plain progress lines off a terminal; TINYLM_PROGRESS_SECONDS overrides
RATE_SMOOTHING = 0.1  # weight of the newest step in the smoothed tokens/s (an average over ~10 steps)


class PlainProgress:
    """tqdm's interface off a terminal: one plain line (no carriage returns) after the first update, then
    at least every `every` seconds while updates come, when the description changes (an epoch ends) and
    at the end; nothing for work that ends within `delay` seconds."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "",
        delay: float = 0.0,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.n, self.desc, self.delay = total, initial, desc, delay
        self.every = plain_every() if every is None else every
        self.clock = clock
        self.start = self.last = clock()
        self.start_n, self.shown_n = initial, initial
        self.postfix: dict[str, Any] = {}

    def set_description(self, desc: str, refresh: bool = False) -> None:
        if desc != self.desc and self.n != self.shown_n:  # the end of a phase, e.g. "Epoch 1/3"
            self._print()
        self.desc = desc

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        first = self.shown_n == self.start_n
        if now - self.start >= self.delay and (
            first or now - self.last >= self.every or self.n >= self.total
        ):
            self._print()

    def close(self) -> None:
        """The final line, unless it is already printed (or the work ended within `delay`)."""
        if self.n != self.shown_n and self.clock() - self.start >= self.delay:
            self._print()

    def _print(self) -> None:
        now = self.clock()
        elapsed, done = now - self.start, self.n - self.start_n
        eta = elapsed / done * (self.total - self.n) if done else float("nan")
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(
            f"{self.desc}: {self.n}/{self.total} ({100 * self.n / max(1, self.total):.0f}%), "
            f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s{extra}",
            file=sys.stderr,
            flush=True,
        )
        self.last, self.shown_n = now, self.n


class NoProgress(PlainProgress):
    """Progress that shows nothing."""

    def _print(self) -> None:
        self.shown_n = self.n


def plain_every() -> float:
    """Seconds between plain progress lines: PLAIN_EVERY, or $TINYLM_PROGRESS_SECONDS when set."""
    raw = os.environ.get("TINYLM_PROGRESS_SECONDS", "")
    try:
        return max(0.0, float(raw)) if raw else PLAIN_EVERY
    except ValueError:
        return PLAIN_EVERY


def progress_bar(
    total: int, *, initial: int = 0, desc: str = "", enabled: bool = True, delay: float = 0.0
) -> tqdm | PlainProgress:
    """A bar with an ETA: tqdm on a terminal, plain lines otherwise; `delay` seconds pass before it shows."""
    if not enabled:
        return NoProgress(total, initial, desc)
    if sys.stderr.isatty():
        return tqdm(
            total=total, initial=initial, desc=desc, dynamic_ncols=True, delay=delay, leave=delay == 0
        )
    return PlainProgress(total, initial, desc, delay)


class SmoothedRate:
    """Tokens per second averaged over recent steps: an exponential average of seconds per token (so slow
    and fast steps weigh by their time), bias-corrected while few steps have been seen."""

    def __init__(self, smoothing: float = RATE_SMOOTHING) -> None:
        self.smoothing, self.seconds_per_token, self.weight = smoothing, 0.0, 0.0

    def add(self, tokens_per_sec: float) -> float:
        """Add one step's rate; the smoothed rate so far."""
        a = self.smoothing
        self.seconds_per_token = (1 - a) * self.seconds_per_token + a / max(tokens_per_sec, 1e-9)
        self.weight = (1 - a) * self.weight + a
        return self.weight / self.seconds_per_token


def show_step(bar: tqdm | PlainProgress, desc: str, stats: dict[str, float]) -> None:
    """Advance a training bar by one step, showing its loss, learning rate and smoothed throughput; `desc` is
    the label after the step (set after the update, so an epoch's last line still carries that epoch)."""
    rate = getattr(bar, "tinylm_rate", None)
    if rate is None:
        rate = bar.tinylm_rate = SmoothedRate()
    bar.set_postfix(
        loss=f"{stats['loss']:.3f}",
        lr=f"{stats['lr']:.6f}",
        tok_s=f"{rate.add(stats['tokens_per_sec']):.0f}",
        refresh=False,
    )
    bar.update(1)
    bar.set_description(desc, refresh=False)


def write(message: str) -> None:
    """Print a line without breaking a terminal progress bar."""
    tqdm.write(message)
