"""Progress for long work: a tqdm bar on a terminal, occasional plain lines when output is a file or pipe."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.auto import tqdm


class PlainProgress:
    """tqdm's interface, printing one plain line per tenth of the work (no carriage returns)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", delay: float = 0.0) -> None:
        self.total, self.n, self.desc, self.delay = total, initial, desc, delay
        self.start, self.start_n = time.perf_counter(), initial
        self.postfix: dict[str, Any] = {}
        self._next = initial + max(1, total // 10)

    def set_description(self, desc: str, refresh: bool = False) -> None:
        self.desc = desc

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next or self.n == self.total:
            self._next = self.n + max(1, self.total // 10)
            self._print()

    def _print(self) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed < self.delay and self.n < self.total:
            return
        done = self.n - self.start_n
        eta = elapsed / done * (self.total - self.n) if done else float("nan")
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(
            f"{self.desc}: {self.n}/{self.total} ({100 * self.n / max(1, self.total):.0f}%), "
            f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s{extra}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        pass


class NoProgress(PlainProgress):
    """Progress that shows nothing."""

    def _print(self) -> None:
        pass


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


def show_step(bar: tqdm | PlainProgress, desc: str, stats: dict[str, float]) -> None:
    """Advance a training bar by one step, showing its loss, learning rate and throughput."""
    bar.set_description(desc, refresh=False)
    bar.set_postfix(
        loss=f"{stats['loss']:.3f}",
        lr=f"{stats['lr']:.6f}",
        tok_s=f"{stats['tokens_per_sec']:.0f}",
        refresh=False,
    )
    bar.update(1)


def write(message: str) -> None:
    """Print a line without breaking a terminal progress bar."""
    tqdm.write(message)
