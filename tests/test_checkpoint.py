"""Run directories: the RunRecord reads old config.json files, checkpoints survive SIGKILL at any moment,
corrupt files are one sentence naming the file, and files follow the user's umask."""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings

import pytest
import torch

from tinylm.checkpoint import RunRecord, checkpoint_dir, load_run, recover_checkpoints
from tinylm.cli import main
from tinylm.config import ModelConfig, TrainConfig
from tinylm.errors import TinyLMError
from tinylm.train import train

pytestmark = pytest.mark.numerics

RUN = {
    "max_steps": 10,
    "eval_interval": 3,
    "warmup_steps": 2,
    "save_interval": 1,
    "log_interval": 1,
    "dropout": 0.1,
    "eval_batches": 2,
}

# In the child: SIGKILL this process at a chosen moment of the checkpoint write after `at` steps.
CHILD = r"""
import importlib, os, pathlib, signal, sys
import torch
C = importlib.import_module("tinylm.checkpoint")
moment, at = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
save, rename, write = C.save_checkpoint, pathlib.Path.rename, C.save_state_dict
def save_checkpoint(run_dir, name, weights, state, meta):
    if meta["step"] == at and name == "last":
        renames = []
        def renaming(self, target):
            renames.append(target)
            if moment == "swap" and len(renames) == 2:
                kill()  # `last` moved aside, the new one not yet in place
            return rename(self, target)
        def writing(state, path):
            write(state, path)
            if moment == "write":
                kill()  # half-written temporary directory
        pathlib.Path.rename, C.save_state_dict = renaming, writing
        save(run_dir, name, weights, state, meta)
        kill()  # moment "after": the new `last` is in place
    return save(run_dir, name, weights, state, meta)
C.save_checkpoint = save_checkpoint  # what save_training calls
from tinylm.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _argv(char_data, out):
    sets = [a for k, v in RUN.items() for a in ("--set", f"{k}={v}")]
    return ["train", "--data", char_data, "--out", out, "--device", "cpu", "--no-progress", *sets]


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(char_data, out, "tiny", {**RUN, "device": "cpu"}, progress=False)
    return load_run(out).model.state_dict()


def _resume_and_compare(out, reference):
    assert load_run(out).model is not None  # the previous `last` loads
    train(out=out, resume=True, progress=False)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    final = load_run(out).model.state_dict()
    assert all(torch.equal(final[k], reference[k]) for k in reference)


@pytest.mark.parametrize(
    "moment, background",
    [("write", False), ("swap", False), ("after", False), ("write", True), ("after", True)],
    ids=["write", "swap", "after", "write-async", "after-async"],
)
def test_sigkill_during_a_checkpoint_write_leaves_a_resumable_last(
    char_data, tmp_path, reference, moment, background
):
    """Also with --async-save, where the kill lands in the background writer while training goes on."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", CHILD, moment, "6", str(torch.get_num_threads())]
    argv = [*_argv(char_data, out), *(["--async-save"] if background else [])]
    proc = subprocess.run([*cmd, *map(str, argv)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    step = json.loads((checkpoint_dir(out, "last") / "meta.json").read_text())["step"]
    assert step == (6 if moment == "after" else 3)
    _resume_and_compare(out, reference)


def test_repeated_sigkill_from_outside_while_saving_every_step(char_data, tmp_path, reference):
    """Kill -9 the run three times while it checkpoints every step, resuming after each; then finish."""
    out, metrics = tmp_path / "run", tmp_path / "run" / "metrics.jsonl"
    for attempt, target in enumerate((4, 7, 9)):  # after the first `last` (step 3)
        argv = _argv(char_data, out) if attempt == 0 else ["train", "--resume", out, "--no-progress"]
        proc = subprocess.Popen([sys.executable, "-m", "tinylm", *map(str, argv)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and f'"step": {target},' in metrics.read_text():
                break
            time.sleep(0.005)
        proc.kill()
        proc.communicate(timeout=60)
        checkpoint_dir(out, "last")  # always a loadable last
    _resume_and_compare(out, reference)


def test_stale_temporary_checkpoints_are_removed_and_an_interrupted_swap_restored(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    root = run / "checkpoints"
    (root / ".last.tmp.abc").mkdir()
    (root / "best").rename(root / ".best.old")  # cut short between the two renames
    recover_checkpoints(run)
    assert sorted(p.name for p in root.iterdir()) == ["best", "last"]


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "meta.json", "config.json"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_files_are_one_sentence_naming_the_file(capsys, char_data, tmp_path, name, damage):
    run = tmp_path / "run"
    train(char_data, run, "tiny", {"max_steps": 6, "eval_interval": 3, "save_interval": 3}, progress=False)
    path = run / name if name == "config.json" else run / "checkpoints" / "last" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    capsys.readouterr()
    warnings.simplefilter("always")  # (this test's filters only) so the setup notes would show if said first
    code = main(["train", "--resume", str(run), "--max-steps", "9", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and name in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    if name != "config.json":  # resume names the newest good checkpoint, and it works
        good = re.search(r"newest good checkpoint is '(\w+)' \(step 6\)", err).group(1)
        assert f"--checkpoint {good}" in err
        code = main(
            ["train", "--resume", str(run), "--checkpoint", good, "--max-steps", "9", "--no-progress"]
        )
        assert code == 0


def test_checkpoints_follow_the_umask(char_data, tmp_path):
    old = os.umask(0o022)
    try:
        train(char_data, tmp_path / "r", "tiny", {"max_steps": 2, "eval_interval": 2}, progress=False)
    finally:
        os.umask(old)
    last = tmp_path / "r" / "checkpoints" / "last"
    assert stat.S_IMODE(last.stat().st_mode) == 0o755
    for name in ("model.safetensors", "state.pt", "meta.json"):
        assert stat.S_IMODE((last / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE((tmp_path / "r" / "config.json").stat().st_mode) == 0o644


def test_record_reads_the_config_json_of_older_versions(tiny_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(tiny_run, run)
    record = RunRecord.read(run)
    old = {
        "model": json.loads((run / "config.json").read_text())["model"],
        "train": json.loads((run / "config.json").read_text())["train"],
        "preset": "tiny",
        "data": record.data,
        "data_meta": {"tokenizer": "char"},
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["wq"], "experts": False},
        "finetune": {"base": "/somewhere", "data": "/pairs.jsonl", "checkpoint": "last"},
    }
    (run / "config.json").write_text(json.dumps(old))
    back = RunRecord.read(run)
    assert back.lora.targets == ("wq",) and back.finetune.base == "/somewhere" and back.preset == "tiny"
    assert back.resume_command(run) == f"tinylm finetune --resume {run}"
    plain = RunRecord(ModelConfig(vocab_size=65), TrainConfig())
    assert RunRecord.from_json(json.loads(json.dumps(plain.to_json()))) == plain


def test_resume_with_a_different_model_is_refused():
    record = RunRecord(ModelConfig(vocab_size=65), TrainConfig())
    with pytest.raises(TinyLMError, match="different model config \\(n_layer\\)"):
        record.resumed({"n_layer": 3})
    assert record.resumed({"max_steps": 5}).train.max_steps == 5


def test_what_a_checkpoint_holds_does_not_grow_with_the_run(char_data, tmp_path):
    """Histories live in metrics.jsonl: the checkpoints at step 100 and 1,000 of one run are the same size."""
    run = tmp_path / "r"
    overrides = {"max_steps": 1000, "save_interval": 100, "eval_interval": 250, "log_interval": 1}
    overrides.update(n_layer=1, batch_size=2, eval_batches=1)  # 1,000 steps in seconds
    torch.set_num_threads(1)  # tiny steps: a second thread only waits (the fixture resets it)
    result = train(char_data, run, "tiny", overrides, progress=False)
    assert len(result.train_losses) == 1000 and len(result.val_losses) == 4  # all in metrics.jsonl

    def size(name):
        return sum(f.stat().st_size for f in (run / "checkpoints" / name).iterdir())

    early, late = size("step_0000100"), size("step_0001000")
    assert abs(late - early) / early < 0.01, (early, late)
