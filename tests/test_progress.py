"""Progress off a terminal: plain lines by time, at phase ends and at the end; a smoothed tokens/s."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tinylm.progress import PlainProgress, SmoothedRate, show_step


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_a_line_at_the_start_then_at_least_every_n_seconds_and_at_the_end(capsys):
    clock = Clock()
    bar = PlainProgress(35, desc="Training", every=10.0, clock=clock)
    for _ in range(35):
        clock.now += 1.0  # one step a second
        bar.update(1)
    bar.close()
    out = lines(capsys)
    shown = [int(re.match(r"Training: (\d+)/35", line)[1]) for line in out]
    assert shown == [1, 11, 21, 31, 35]  # the first step (an early ETA), every 10 s, and the end
    assert out[-1].startswith("Training: 35/35 (100%), 35s elapsed, ETA 0s")


def test_slow_steps_print_every_step_and_fast_work_within_the_delay_prints_nothing(capsys):
    clock = Clock()
    bar = PlainProgress(3, desc="Training", every=10.0, clock=clock)
    for _ in range(3):
        clock.now += 25.0  # each step longer than the interval
        bar.update(1)
    assert len(lines(capsys)) == 3
    quick = PlainProgress(20, desc="Validating", delay=3.0, every=10.0, clock=clock)
    for _ in range(20):
        clock.now += 0.1
        quick.update(1)
    quick.close()
    assert lines(capsys) == []  # 2 s of validation: like tqdm's delay, no bar at all


def test_an_evaluation_longer_than_its_delay_ends_with_a_line(capsys):
    clock = Clock()
    bar = PlainProgress(20, desc="Validating", delay=3.0, every=10.0, clock=clock)
    for _ in range(19):
        clock.now += 0.5
        bar.update(1)
    bar.close()  # stopped at 19 of 20 (e.g. the last batch was skipped): close prints where it ended
    out = lines(capsys)
    assert [line.split(" (")[0] for line in out] == ["Validating: 6/20", "Validating: 19/20"]


def test_each_epoch_ends_with_a_line_that_carries_its_own_label(capsys):
    clock = Clock()
    bar = PlainProgress(6, desc="Epoch 1/2", every=100.0, clock=clock)
    for step in range(1, 7):
        clock.now += 1.0
        show_step(
            bar, f"Epoch {min(step // 3 + 1, 2)}/2", {"loss": 2.0, "lr": 1e-3, "tokens_per_sec": 1000.0}
        )
    bar.close()
    out = [line.split(" (")[0] for line in lines(capsys)]
    assert out == ["Epoch 1/2: 1/6", "Epoch 1/2: 3/6", "Epoch 2/2: 6/6"]


def test_tokens_per_second_is_smoothed_by_time():
    rate = SmoothedRate(smoothing=0.1)
    assert rate.add(1000.0) == pytest.approx(1000.0)  # bias-corrected: the first step is itself
    shown = [rate.add(r) for r in [154.0, 2129.0] * 20]  # the swing the issue reported, step to step
    # seconds per token average to (1/154 + 1/2129) / 2: the smoothed rate settles near 287 tokens/s
    assert shown[-1] == pytest.approx(2 / (1 / 154 + 1 / 2129), rel=0.1)
    assert max(shown[-10:]) / min(shown[-10:]) < 1.5  # not 14x between consecutive lines


def test_training_to_a_pipe_prints_by_time(char_data, tmp_path):
    """A real run with stderr to a pipe: lines at most ~1 s apart (TINYLM_PROGRESS_SECONDS=1), epoch ends."""
    proc = subprocess.run(
        [sys.executable, "-m", "tinylm", "train", "--data", str(char_data), "--out", str(tmp_path / "r")]
        + ["--epochs", "2", "--set", "window_stride=256", "--set", "batch_size=4", "--device", "cpu"],
        capture_output=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TINYLM_PROGRESS_SECONDS": "1"},
    )
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    rows = [
        re.match(r"Epoch (\d)/2: (\d+)/(\d+) .*?(\d+)s elapsed.*tok_s (\d+)", line)
        for line in err.splitlines()
    ]
    rows = [r for r in rows if r]
    total = int(rows[0][3])
    assert [int(r[2]) for r in rows if int(r[2]) % (total // 2) == 0][-2:] == [total // 2, total]
    assert {r[1] for r in rows if int(r[2]) == total // 2} == {"1"}  # epoch 1's last line says epoch 1
    elapsed = [int(r[4]) for r in rows]
    assert max(b - a for a, b in zip(elapsed, elapsed[1:])) <= 2  # whole seconds, printed by time
