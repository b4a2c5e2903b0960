"""CPU threads that fit the machine: how many intra-op threads a command uses, chosen as it starts.

PyTorch's default (one thread per core) is right on an idle machine and several times slower than one
thread on a busy one: its OpenMP threads wait for each other at every operation, so when the OS gives
one of their cores to another process the others stall (spinning, then sleeping) until it comes back
(benchmarks/RESULTS.md, issue 22). So a command measures, for WINDOW seconds as it starts, how much of
the CPU other processes use, and runs on the cores they leave free. A user's --threads or
OMP_NUM_THREADS always wins. torch.set_num_threads is all it needs (measured: it matches
OMP_NUM_THREADS=1 on a loaded machine), so the OpenMP wait policy is left as the user has it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from tinylm.errors import TinyLMError

SPARE = 0.25  # cores of background work (a browser, an editor) that still count as free
WINDOW = 0.1  # seconds over which a command measures the other processes' CPU use as it starts


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count a command runs with, and why."""

    threads: int
    source: str  # "--threads", "OMP_NUM_THREADS" or "auto"
    cores: int  # usable cores
    others: float | None = None  # cores other processes used while measured (auto only; None: unknown)
    kept: int = 0  # cores left to the command's own Python threads (auto only)

    @property
    def auto(self) -> bool:
        return self.source == "auto"

    def describe(self) -> str:
        """One line for the user, e.g. "threads: 1 of 2 cores (other processes use 1.6; --threads N to override)"."""
        if not self.auto:
            return f"threads: {self.threads} ({self.source})"
        load = "load unknown" if self.others is None else f"other processes use {self.others:.1f}"
        kept = f"; {self.kept} kept for the server's own threads" if self.kept else ""
        return f"threads: {self.threads} of {self.cores} cores ({load}{kept}; --threads N to override)"


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)  # macOS has no affinity masks


def threads_for(cores: int, others: float | None) -> int:
    """Threads for `cores` usable cores of which other processes keep `others` busy: the cores left over,
    counting up to SPARE of a core as free, at least 1; all of them when the load is unknown."""
    if others is None:
        return cores
    return max(1, min(cores, cores - math.ceil(others - SPARE)))


@dataclass(frozen=True)
class CpuSample:
    """The machine's busy CPU time and this process's own, at one moment (seconds)."""

    wall: float
    busy: float
    own: float


def cpu_sample() -> CpuSample:
    """Busy time of all CPUs (everything but idle and I/O wait, so other virtual machines' steal counts as
    busy) and this process's own CPU time, from psutil (Linux, macOS, Windows)."""
    import psutil

    times = psutil.cpu_times()
    busy = sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(times, "guest", 0.0)
    busy -= getattr(times, "guest_nice", 0.0)  # guest time is already counted in user time on Linux
    return CpuSample(time.monotonic(), busy, time.process_time())


def others_busy(before: CpuSample, after: CpuSample) -> float | None:
    """Cores kept busy by other processes between two samples (None when no time passed)."""
    elapsed = after.wall - before.wall
    if elapsed <= 0:
        return None
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / elapsed)


def requested_threads(flag: int | None, env: dict[str, str]) -> tuple[int, str] | None:
    """The user's own choice: --threads, else OMP_NUM_THREADS; None when neither is given."""
    if flag is not None:
        if flag < 1:
            raise TinyLMError(f"--threads must be at least 1, not {flag}.")
        return flag, "--threads"
    value = env.get("OMP_NUM_THREADS", "").strip()
    if value:
        first = value.split(",")[0]  # OpenMP allows a per-nesting-level list; the first level is ours
        if not first.isdigit() or int(first) < 1:
            raise TinyLMError(
                f"OMP_NUM_THREADS={value!r} is not a positive whole number; unset it or fix it."
            )
        return int(first), "OMP_NUM_THREADS"
    return None


def fit_threads(flag: int | None = None, env: dict[str, str] | None = None, keep: int = 0) -> ThreadChoice:
    """Choose and apply (torch.set_num_threads) this process's intra-op thread count: --threads N, else
    OMP_NUM_THREADS, else the cores other processes leave free, measured over WINDOW seconds, less `keep`
    cores for the command's own Python threads (a server's event loop: intra-op threads waiting for each
    other on every core starve it; measured, RESULTS.md), at least 1."""
    import torch

    env = os.environ if env is None else env
    cores = usable_cpus()
    requested = requested_threads(flag, env)
    if requested is not None:
        choice = ThreadChoice(requested[0], requested[1], cores)
    else:
        before = cpu_sample()
        time.sleep(WINDOW)
        others = others_busy(before, cpu_sample())
        free = threads_for(cores, others)
        kept = min(keep, free - 1)
        choice = ThreadChoice(free - kept, "auto", cores, others, kept)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice
