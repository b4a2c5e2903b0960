"""Interrupts are prompt and exact: real SIGINT / SIGTERM to real training processes, at chosen points (during a
step, between the micro-batches of a long step, an evaluation, a checkpoint write; a second signal, which says
what is happening, and a third, which ends the process at once), then --resume: the final weights equal, bit
for bit, those of the same run left alone. A step of many micro-batches stops within one micro-batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinylm.checkpoint import load_run
from tinylm.train import SECOND_SIGNAL, train
from tinylm.viz import read_metrics

pytestmark = pytest.mark.numerics

# dropout > 0 and gradient accumulation in every case; 12 optimizer steps; evaluations at 4/8/12 (steps)
# or at each epoch's end (6 steps per epoch).
COMMON = {"dropout": 0.1, "grad_accum": 2, "batch_size": 4, "log_interval": 1, "eval_batches": 2}
MODES = {
    "step": {"max_steps": 12, "epochs": 0, "eval_interval": 4},
    "epoch": {"epochs": 2, "max_steps": 0, "window_stride": 1800},
    "accum": {"max_steps": 4, "epochs": 0, "eval_interval": 2, "grad_accum": 12, "batch_size": 2},
}
OPTIMIZERS = {"adamw": {"optimizer": "adamw"}, "muon": {"optimizer": "muon", "muon_lr": 0.02}}

# Runs in the child: make the chosen point send a real signal to this very process, then run the CLI.
CHILD = r"""
import importlib, os, signal, sys
import torch
C, T = importlib.import_module("tinylm.checkpoint"), importlib.import_module("tinylm.train")
point, at, sig, threads = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
fire = lambda: os.kill(os.getpid(), sig)
if point == "step":  # as optimizer step `at` (0-based) begins
    step = T.Trainer.train_step
    T.Trainer.train_step = lambda self, s, stop=None: (fire() if s == at else None, step(self, s, stop))[1]
elif point == "micro":  # during micro-batch 5 of optimizer step `at`
    micro = T.Trainer.micro_batches
    def micro_batches(self, s):
        for m, batch in enumerate(micro(self, s)):
            if s == at and m == 5:
                fire()
            yield batch
    T.Trainer.micro_batches = micro_batches
elif point == "eval":  # during the evaluation after `at` steps
    evaluate = T.Trainer.evaluate
    T.Trainer.evaluate = lambda self, stop=None: (fire() if self.step == at else None, evaluate(self, stop))[1]
elif point.startswith("save"):  # 1, 2 or 3 signals while the first checkpoint after `at` steps is half written
    times = {"save": 1, "save-twice": 2, "save-thrice": 3}[point]
    write, save, fired = C.save_state_dict, C.save_checkpoint, []
    def writing(state, path):
        write(state, path)
        if not fired:
            fired.append(1)
            for _ in range(times):
                fire()
    def save_checkpoint(run_dir, name, weights, state, meta):
        C.save_state_dict = writing if meta["step"] == at else write
        return save(run_dir, name, weights, state, meta)
    C.save_checkpoint = save_checkpoint  # what the Checkpointer calls
from tinylm.cli import main
sys.exit(main(sys.argv[5:]))
"""


def _sets(values):
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _overrides(optimizer, mode):
    return {**COMMON, **MODES[mode], **OPTIMIZERS[optimizer]}


def _weights(run_dir):
    return load_run(run_dir).model.state_dict()


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max():.3g}"


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory):
    """The runs left alone, one per (optimizer, mode), trained once."""
    cache = {}

    def get(optimizer, mode):
        if (optimizer, mode) not in cache:
            out = tmp_path_factory.mktemp("ref") / f"{optimizer}-{mode}"
            train(char_data, out, "tiny", {**_overrides(optimizer, mode), "device": "cpu"}, progress=False)
            cache[optimizer, mode] = _weights(out)
        return cache[optimizer, mode]

    return get


def _base_argv(char_data, out):
    """`tinylm train` on the tiny preset, on the CPU, quietly."""
    return [
        "train",
        "--data",
        char_data,
        "--out",
        out,
        "--device",
        "cpu",
        "--no-progress",
        "--preset",
        "tiny",
    ]


def _train_argv(char_data, out, optimizer, mode):
    """`tinylm train` on the tiny preset with the reference run's optimizer and mode."""
    return _base_argv(char_data, out) + _sets(_overrides(optimizer, mode))


def _child(char_data, out, optimizer, mode, point, at, sig):
    argv = _train_argv(char_data, out, optimizer, mode)
    cmd = [sys.executable, "-c", CHILD, point, str(at), sig, str(torch.get_num_threads()), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _meta_step(out, name="last"):
    return json.loads((out / "checkpoints" / name / "meta.json").read_text())["step"]


CASES = [  # (optimizer, mode, point, at, signal)
    ("adamw", "step", "step", 0, "SIGINT"),  # the very first step
    ("muon", "epoch", "step", 1, "SIGTERM"),
    ("muon", "step", "step", 6, "SIGINT"),  # mid-run, between evaluations
    ("adamw", "accum", "micro", 2, "SIGTERM"),  # in the middle of a step of 12 micro-batches
    ("muon", "accum", "micro", 0, "SIGINT"),  # ... of the very first step
    ("adamw", "epoch", "eval", 6, "SIGINT"),  # during an evaluation
    ("adamw", "step", "save", 8, "SIGTERM"),  # during a checkpoint write
    ("muon", "epoch", "save-twice", 6, "SIGINT"),  # and a second Ctrl-C: it says what is going on
]


@pytest.mark.parametrize("optimizer, mode, point, at, sig", CASES, ids=lambda v: str(v))
def test_interrupt_then_resume_is_bitwise_exact(
    char_data, tmp_path, reference, optimizer, mode, point, at, sig
):
    out = tmp_path / "run"
    proc = _child(char_data, out, optimizer, mode, point, at, sig)
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr[-2000:]
    assert f"Resume with: tinylm train --resume {out}" in proc.stderr and "Traceback" not in proc.stderr
    assert (SECOND_SIGNAL in proc.stderr) == (point == "save-twice")
    stopped = _meta_step(out)
    assert stopped == at  # a step cut short is discarded: `last` is the state after the steps completed
    if point == "eval":  # the evaluation was cut short, not waited for: the resumed run does it first
        assert 6 not in _rows(out, "eval")
    result = train(out=out, resume=True, progress=False)
    assert result.steps == (4 if mode == "accum" else 12)
    assert result.start_step == stopped
    _assert_bitwise_equal(_weights(out), reference(optimizer, mode))
    if point == "eval":  # ... so the history is the run's left alone: each evaluation and epoch once
        assert _rows(out, "eval") == [6, 12] and _rows(out, "epoch") == [6, 12]


def _rows(out, kind):
    """The steps of the metrics.jsonl rows of one type."""
    return [r["step"] for r in read_metrics(out) if r["type"] == kind]


def test_a_third_signal_ends_the_run_at_once_and_the_previous_checkpoint_resumes_exactly(
    char_data, tmp_path, reference
):
    out = tmp_path / "run"
    proc = _child(char_data, out, "adamw", "step", "save-thrice", 8, "SIGINT")
    assert proc.returncode == -signal.SIGINT, proc.stderr[-2000:]  # killed by the signal itself
    assert SECOND_SIGNAL in proc.stderr
    assert [p.name for p in (out / "checkpoints").iterdir() if ".tmp." in p.name]  # the save it abandoned
    assert _meta_step(out) == 4  # the previous `last`, intact
    assert train(out=out, resume=True, progress=False).start_step == 4
    _assert_bitwise_equal(_weights(out), reference("adamw", "step"))


def test_sigterm_from_outside_when_the_metrics_show_progress(char_data, tmp_path, reference):
    """As a scheduler would: the signal comes from another process, whenever the run has got going."""
    out = tmp_path / "run"
    argv = _train_argv(char_data, out, "adamw", "step")
    cmd = [sys.executable, "-c", CHILD, "none", "0", "SIGTERM", str(torch.get_num_threads()), *map(str, argv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and any('"step": 2,' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    if proc.returncode == 0:  # it finished before the signal landed: nothing to resume
        pytest.skip("the run ended before the signal arrived")
    assert proc.returncode == 143, err[-2000:]
    train(out=out, resume=True, progress=False)
    _assert_bitwise_equal(_weights(out), reference("adamw", "step"))


def _peak_rss_mb(proc: subprocess.Popen, until: float) -> float:
    """The child's peak resident memory (VmHWM) once `until` (a monotonic time) has passed, in MB."""
    peak = 0.0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = (
                float(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
                / 1024
            )
        except (OSError, StopIteration):
            pass
        if time.monotonic() > until:
            return peak
        time.sleep(0.05)
    return peak


def test_a_step_of_100000_micro_batches_stops_within_one_and_never_holds_them_all(char_data, tmp_path):
    """SIGTERM from outside in the middle of one optimizer step of 100,000 micro-batches (minutes of work): the
    run exits within seconds with `last` before that step, and its memory is that of a one-micro-batch run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(out, accum):
        argv = _base_argv(char_data, out)
        argv += ["--grad-accum", accum, "--max-steps", 3, "--batch-size", 4, "--set", "eval_batches=1"]
        cmd = [sys.executable, "-m", "tinylm", *map(str, argv)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    small = start(tmp_path / "small", 1)
    baseline = _peak_rss_mb(small, until=time.monotonic() + 300)
    assert small.wait(timeout=60) == 0
    out = tmp_path / "big"
    proc = start(out, 100_000)
    deadline = time.monotonic() + 240
    while not (out / "config.json").is_file() and time.monotonic() < deadline:  # written as training starts
        time.sleep(0.05)
    peak = _peak_rss_mb(proc, until=time.monotonic() + 4)  # well into the step's micro-batches
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # only if it is still running: it ignored the signal
    waited = time.monotonic() - sent
    assert proc.returncode == 143, err[-2000:]
    assert f"Resume with: tinylm train --resume {out}" in err
    assert _meta_step(out) == 0  # the step cut short is discarded
    assert waited < 30, f"{waited:.1f} s from SIGTERM to exit"  # the whole step would take minutes
    assert peak < baseline + 100, f"peak RSS {peak:.0f} MB against {baseline:.0f} MB with one micro-batch"


def test_in_process_signal_handlers_are_restored(char_data, tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    train(char_data, tmp_path / "r", "tiny", {"max_steps": 2, "eval_interval": 2}, progress=False)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert os.getpid()  # the test process itself was never interrupted
