"""Engine features: activation checkpointing, multi-process training (gloo), plots."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FLAVOURS, tiny_config
from tinylm.model import Transformer
from tinylm.viz import plot_training_progress

pytestmark = pytest.mark.numerics


def _saved_activation_bytes(model, idx):
    """Bytes autograd keeps for backward during one forward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx).logsumexp(-1).mean()
    return loss, total


@pytest.mark.parametrize("flavour", ["gpt", "llama-moe"])
def test_grad_checkpointing_same_gradients_less_memory(flavour):
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_layer=4, **FLAVOURS[flavour])).train()
    idx = torch.randint(0, 65, (4, 32))
    loss, plain_bytes = _saved_activation_bytes(model, idx)
    loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    loss2, ckpt_bytes = _saved_activation_bytes(model, idx)
    loss2.backward()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    assert ckpt_bytes < 0.5 * plain_bytes  # only block inputs are kept


def _train_losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def _cli(*args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    out = subprocess.run(
        [*launcher, "-m", "tinylm", *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_run_matches_single_process(char_data, tmp_path, mode):
    common = [
        "train",
        "--data",
        char_data,
        "--preset",
        "tiny",
        "--max-steps",
        10,
        "--eval-interval",
        5,
        "--device",
        "cpu",
        "--no-progress",
        "--set",
        "log_interval=1",
        "--set",
        "dropout=0",
    ]
    _cli(*common, "--batch-size", 8, "--out", tmp_path / "single")
    stdout = _cli(
        *common,
        "--batch-size",
        4,
        "--out",
        tmp_path / "multi",
        *(["--fsdp"] if mode == "fsdp" else []),
        nproc=2,
    )
    assert stdout.count("Trained 10 steps") == 1  # only rank 0 reports
    single, multi = _train_losses(tmp_path / "single"), _train_losses(tmp_path / "multi")
    assert len(single) == len(multi) == 10
    for a, b in zip(single, multi):
        assert a == pytest.approx(b, abs=2e-3)
    # rank 0's checkpoint loads in a single process
    out = _cli("generate", tmp_path / "multi", "--max-new-tokens", 5, "--seed", 0, "--no-progress", "--json")
    assert json.loads(out.strip().splitlines()[-1])["tokens"] == 5


def test_plot_writes_a_png(tiny_run, tmp_path):
    path = plot_training_progress(tiny_run, tmp_path / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_keep_last_prunes_step_checkpoints(char_data, tmp_path):
    from tinylm.train import train

    train(
        char_data,
        tmp_path / "r",
        "tiny",
        {"max_steps": 12, "save_interval": 3, "keep_last": 2, "eval_interval": 12},
        progress=False,
    )
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["best", "last", "step_0000009", "step_0000012"]


def test_compile_failure_falls_back_with_a_warning(char_data, tmp_path, monkeypatch):
    from tinylm.train import train

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="torch.compile is not available"):
        result = train(char_data, tmp_path / "r", "tiny", {"max_steps": 3, "compile": True}, progress=False)
    assert result.steps == 3


def test_tensorboard_sink_receives_metrics(char_data, tmp_path, monkeypatch):
    import types

    from tinylm.train import train

    written = []

    class Writer:
        def __init__(self, logdir):
            written.append(("dir", logdir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(
        char_data,
        tmp_path / "r",
        "tiny",
        {"max_steps": 4, "eval_interval": 4, "tensorboard": True},
        progress=False,
    )
    assert ("train/loss", 1) in written and ("eval/val_loss", 4) in written


def test_stream_and_dtype_flags(tiny_run):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinylm",
            "generate",
            str(tiny_run),
            "--prompt",
            "ROMEO:",
            "--stream",
            "--max-new-tokens",
            "12",
            "--seed",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.startswith("ROMEO:")
    streamed = json.loads(out.stdout.strip().splitlines()[-1])["text"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinylm",
            "generate",
            str(tiny_run),
            "--prompt",
            "ROMEO:",
            "--no-progress",
            "--max-new-tokens",
            "12",
            "--seed",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1])["text"] == streamed
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinylm",
            "generate",
            str(tiny_run),
            "--prompt",
            "ROMEO:",
            "--no-progress",
            "--dtype",
            "bf16",
            "--max-new-tokens",
            "12",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and json.loads(out.stdout.strip().splitlines()[-1])["tokens"] == 12


def test_dtype_resolution_and_bf16_autocast_training(char_data, tmp_path):
    from tinylm.errors import TinyLMError
    from tinylm.runtime import resolve_dtype
    from tinylm.train import train

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(TinyLMError, match="fp16 mixed precision needs a GPU"):
        resolve_dtype("fp16", torch.device("cpu"))
    result = train(
        char_data,
        tmp_path / "bf16",
        "tiny",
        {"max_steps": 5, "dtype": "bf16", "eval_interval": 5},
        progress=False,
    )
    assert result.steps == 5 and result.val_loss < 4.3
