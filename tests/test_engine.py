"""Engine features: activation checkpointing, multi-process training (gloo), plots."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import FLAVOURS, tiny_config
from tinylm.model import Transformer
from tinylm.viz import plot_training_progress


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
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    out = subprocess.run([*launcher, "-m", "tinylm", *map(str, args)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_run_matches_single_process(char_data, tmp_path, mode):
    common = ["train", "--data", char_data, "--preset", "tiny", "--max-steps", 10, "--eval-interval", 5,
              "--device", "cpu", "--no-progress", "--set", "log_interval=1", "--set", "dropout=0"]
    _cli(*common, "--batch-size", 8, "--out", tmp_path / "single")
    stdout = _cli(*common, "--batch-size", 4, "--out", tmp_path / "multi", *(["--fsdp"] if mode == "fsdp" else []), nproc=2)
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
