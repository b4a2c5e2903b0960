"""Interrupts are exact: real SIGINT / SIGTERM to real training processes, at chosen points (during a step,
an evaluation, a checkpoint write, and a second signal during the interrupt's own save), then --resume:
the final weights equal, bit for bit, those of the same run left alone."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tinylm.checkpoint import load_run
from tinylm.train import train

pytestmark = pytest.mark.numerics

# dropout > 0 and gradient accumulation in every case; 12 optimizer steps; evaluations at 4/8/12 (steps)
# or at each epoch's end (6 steps per epoch).
COMMON = {"dropout": 0.1, "grad_accum": 2, "batch_size": 4, "log_interval": 1, "eval_batches": 2}
MODES = {
    "step": {"max_steps": 12, "epochs": 0, "eval_interval": 4},
    "epoch": {"epochs": 2, "max_steps": 0, "window_stride": 1800},
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
if point == "step":  # in the middle of optimizer step `at` (0-based)
    step = T.Trainer.train_step
    T.Trainer.train_step = lambda self, s: (fire() if s == at else None, step(self, s))[1]
elif point == "eval":  # during the evaluation after `at` steps
    evaluate = T.Trainer.evaluate
    T.Trainer.evaluate = lambda self: (fire() if self.step == at else None, evaluate(self))[1]
elif point in ("save", "save-twice"):  # while a checkpoint after `at` steps is half written
    write, save = C.save_state_dict, C.save_checkpoint
    def writing(state, path):
        write(state, path)
        fire()
    def save_checkpoint(run_dir, name, weights, state, meta):
        C.save_state_dict = writing if meta["step"] == at or (point == "save-twice" and meta["step"] > at) else write
        return save(run_dir, name, weights, state, meta)
    C.save_checkpoint = save_checkpoint  # what save_training calls
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


def _train_argv(char_data, out, optimizer, mode):
    """`tinylm train` on the tiny preset with the reference run's optimizer and mode."""
    argv = [
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
    return argv + _sets(_overrides(optimizer, mode))


def _child(char_data, out, optimizer, mode, point, at, sig):
    argv = _train_argv(char_data, out, optimizer, mode)
    cmd = [sys.executable, "-c", CHILD, point, str(at), sig, str(torch.get_num_threads()), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


CASES = [  # (optimizer, mode, point, at, signal)
    ("adamw", "step", "step", 0, "SIGINT"),  # the very first step
    ("muon", "epoch", "step", 1, "SIGTERM"),
    ("muon", "step", "step", 6, "SIGINT"),  # mid-run, between evaluations
    ("adamw", "epoch", "eval", 6, "SIGINT"),  # during an evaluation
    ("adamw", "step", "save", 8, "SIGTERM"),  # during a checkpoint write
    ("muon", "epoch", "save-twice", 6, "SIGINT"),  # and a second Ctrl-C during the interrupt's save
]


@pytest.mark.parametrize("optimizer, mode, point, at, sig", CASES, ids=lambda v: str(v))
def test_interrupt_then_resume_is_bitwise_exact(
    char_data, tmp_path, reference, optimizer, mode, point, at, sig
):
    out = tmp_path / "run"
    proc = _child(char_data, out, optimizer, mode, point, at, sig)
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr[-2000:]
    assert f"Resume with: tinylm train --resume {out}" in proc.stderr and "Traceback" not in proc.stderr
    stopped = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())["step"]
    assert stopped == at + 1 if point == "step" else stopped == at
    result = train(out=out, resume=True, progress=False)
    assert result.steps == 12 and result.start_step == stopped
    _assert_bitwise_equal(_weights(out), reference(optimizer, mode))


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


def test_in_process_signal_handlers_are_restored(char_data, tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    train(char_data, tmp_path / "r", "tiny", {"max_steps": 2, "eval_interval": 2}, progress=False)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert os.getpid()  # the test process itself was never interrupted
