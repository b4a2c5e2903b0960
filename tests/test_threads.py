"""CPU threads that fit the machine (issue 22): tinylm's choice under a real load, and the user's always wins."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from tinylm import threads
from tinylm.errors import TinyLMError
from tinylm.threads import CpuSample, fit_threads, others_busy, requested_threads, threads_for

CORES = threads.usable_cpus()


def test_threads_for_leaves_the_busy_cores_to_their_owners():
    assert threads_for(2, 0.0) == 2
    assert threads_for(2, 0.2) == 2  # background work under SPARE of a core
    assert threads_for(2, 0.6) == 1
    assert threads_for(2, 2.0) == threads_for(2, 7.5) == 1  # never fewer than one
    assert threads_for(8, 3.2) == 5 and threads_for(8, 3.3) == 4
    assert threads_for(8, None) == 8  # load unknown: PyTorch's default, one per core


def test_the_users_choice_wins_and_is_checked():
    assert requested_threads(3, {"OMP_NUM_THREADS": "1"}) == (3, "--threads")
    assert requested_threads(None, {"OMP_NUM_THREADS": "4,2"}) == (4, "OMP_NUM_THREADS")
    assert requested_threads(None, {"OMP_NUM_THREADS": " "}) is None
    with pytest.raises(TinyLMError, match="--threads must be at least 1"):
        requested_threads(0, {})
    with pytest.raises(TinyLMError, match="OMP_NUM_THREADS='many' is not a positive whole number"):
        requested_threads(None, {"OMP_NUM_THREADS": "many"})


def test_others_busy_subtracts_this_process():
    before = CpuSample(wall=10.0, busy=100.0, own=5.0)
    after = CpuSample(wall=10.5, busy=101.5, own=5.5)  # 1.5 busy seconds in 0.5 s, 0.5 of them ours
    assert others_busy(before, after) == pytest.approx(2.0)
    assert others_busy(before, CpuSample(10.5, 100.4, 5.5)) == 0.0  # never negative


def test_an_idle_machine_gets_one_thread_per_core(monkeypatch):
    samples = iter([CpuSample(0.0, 50.0, 1.0), CpuSample(0.5, 50.5, 1.5)])  # only this process was busy
    monkeypatch.setattr(threads, "cpu_sample", lambda: next(samples))
    monkeypatch.setattr(threads, "WINDOW", 0.0)
    before = torch.get_num_threads()
    try:
        choice = fit_threads(None, env={})
        assert (choice.threads, choice.source, choice.others) == (CORES, "auto", 0.0)
        assert torch.get_num_threads() == CORES
        assert (
            choice.describe()
            == f"threads: {CORES} of {CORES} cores (other processes use 0.0; --threads N to override)"
        )
    finally:
        torch.set_num_threads(before)


@contextmanager
def busy_cores(n: int):
    """n real CPU-bound processes (a reproducible busy machine)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


CHILD = """
import sys, torch
from tinylm.threads import fit_threads
choice = fit_threads(int(sys.argv[1]) if len(sys.argv) > 1 else None)
print(choice.threads, choice.source, choice.others, torch.get_num_threads())
"""


def _child(*argv: str, env: dict[str, str]) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], env={**base, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_server_keeps_a_core_for_its_own_threads_unless_the_user_chose(monkeypatch):
    samples = iter([CpuSample(0.0, 50.0, 1.0), CpuSample(0.5, 50.5, 1.5)] * 2)  # an idle machine
    monkeypatch.setattr(threads, "cpu_sample", lambda: next(samples))
    monkeypatch.setattr(threads, "WINDOW", 0.0)
    before = torch.get_num_threads()
    try:
        choice = fit_threads(None, env={}, keep=1)
        assert (choice.threads, choice.kept) == (max(1, CORES - 1), min(1, CORES - 1))
        if CORES > 1:
            assert "1 kept for the server's own threads" in choice.describe()
        assert fit_threads(None, env={"OMP_NUM_THREADS": str(CORES)}, keep=1).threads == CORES
    finally:
        torch.set_num_threads(before)


def test_a_loaded_machine_gets_one_thread_and_the_user_still_wins():
    with busy_cores(CORES):
        threads_, source, others, applied = _child(env={})
        assert (threads_, source, applied) == ("1", "auto", "1")
        assert float(others) >= CORES - 0.5  # it saw the load
        assert _child("2", env={"OMP_NUM_THREADS": "1"})[:2] + _child("2", env={})[3:] == [
            "2",
            "--threads",
            "2",
        ]
        assert _child(env={"OMP_NUM_THREADS": "2"})[1::2] == ["OMP_NUM_THREADS", "2"]


def test_the_cli_says_its_choice_once_on_stderr_and_nothing_when_the_user_chose(tiny_run):
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [
        sys.executable,
        "-m",
        "tinylm",
        "generate",
        str(tiny_run),
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    auto = subprocess.run(cmd, env=base, capture_output=True, text=True)
    said = [line for line in auto.stderr.splitlines() if line.startswith("threads: ")]
    assert auto.returncode == 0 and len(said) == 1 and f"of {CORES} cores" in said[0], auto.stderr
    assert "threads: " not in auto.stdout
    for env, flag in (({"OMP_NUM_THREADS": "1"}, []), ({}, ["--threads", "1"])):
        user = subprocess.run(cmd + flag, env={**base, **env}, capture_output=True, text=True)
        assert user.returncode == 0 and "threads: " not in user.stderr, user.stderr
