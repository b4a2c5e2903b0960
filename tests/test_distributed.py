"""Multiple processes on CPU (gloo): per-rank seeds and RNG on resume, exact DDP / FSDP2 resume, gradient
synchronisation once per step, data prepared once, clean exits."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import tiny_config
from tinylm import runtime as rt
from tinylm.errors import TinyLMError
from tinylm.model import Transformer

pytestmark = pytest.mark.numerics


def _torchrun(*args: object) -> subprocess.CompletedProcess:
    """`tinylm ARGS` in 2 processes under torchrun; asserts a clean exit on every rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run(
        [*cmd, "-m", "tinylm", *map(str, args)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "terminate called" not in out.stderr
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


# issue 22's speedrun options (model and ramps; NorMuon / Polar Express where Muon runs, i.e. not under FSDP)
SPEEDRUN = (
    "mlp=relu2 qk_norm=true zero_init=true value_embeds=1 embed_skip=true unet_skips=true logit_softcap=15"
)
SPEEDRUN += " tie_embeddings=false batch_size_start=2 block_size_start=8 ramp_steps=5"
MUON = "optimizer=muon orthogonalizer=polar-express normuon=true"


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-speedrun", "fsdp-speedrun"])
def test_multi_process_resume_is_bitwise_and_ranks_draw_their_own_dropout(char_data, tmp_path, mode):
    # dropout > 0 and gradient accumulation: exact only if each rank resumes its own RNG stream
    train = ["train", "--data", char_data, "--preset", "tiny", "--max-steps", 6, "--eval-interval", 3]
    train += ["--set", "eval_batches=2", "--set", "dropout=0.2", "--batch-size", 4, "--grad-accum", 2]
    train += ["--device", "cpu", "--no-progress", *(["--fsdp"] if mode.startswith("fsdp") else [])]
    if mode.endswith("speedrun"):
        extra = SPEEDRUN if mode.startswith("fsdp") else f"{SPEEDRUN} {MUON}"
        train += [arg for pair in extra.split() for arg in ("--set", pair)]
    _torchrun(*train, "--out", tmp_path / "straight")
    _torchrun(*train, "--out", tmp_path / "split", "--stop-after", 4)  # stops between evaluations
    state = torch.load(tmp_path / "split" / "checkpoints" / "last" / "state.pt", weights_only=True)
    _torchrun("train", "--resume", tmp_path / "split", "--device", "cpu", "--no-progress")

    straight, split = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name

    # every rank's generator was saved, and they differ: the ranks draw different dropout masks
    assert state["step"] == 4 and len(state["rng_ranks"]) == 2
    masks = []
    for rng in state["rng_ranks"]:
        torch.set_rng_state(rng["rng_cpu"])
        masks.append(torch.nn.functional.dropout(torch.ones(4096), 0.2) != 0)
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(state["rng_cpu"], state["rng_ranks"][0]["rng_cpu"])  # rank 0's at the top, as before


def test_finetune_under_torchrun_prepares_text_once(tiny_run, shakespeare_slice, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", tiny_run, "--data", shakespeare_slice, "--out", out, "--max-steps", 2]
    _torchrun(*args, "--no-progress", "--set", "eval_batches=1")  # rank 0 prepares OUT/data, then both train
    assert (out / "data" / "meta.json").is_file() and (out / "checkpoints" / "last").is_dir()


# ----- in-process gloo groups (torch.multiprocessing), for what a CLI run cannot show --------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, log: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    # rank 0 runs the body before rank 1 enters it; a failure on rank 0 stops rank 1 too (no hang)
    with rt.main_process_first() as first:
        assert first == (rank == 0)
        with open(log, "a") as f:
            f.write(f"{rank}\n")
    try:
        with rt.main_process_first():
            if rank == 0:
                raise ValueError("rank 0 failed")
    except (ValueError, TinyLMError) as exc:
        assert isinstance(exc, ValueError if rank == 0 else TinyLMError)
    else:
        raise AssertionError("no error")

    runtime = rt.setup("cpu", "fp32", seed=0)
    cfg = tiny_config(n_layer=2, dropout=0.0)
    x = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(rank))

    # DDP: no buffer broadcast per step; a skipped micro-batch keeps local gradients, the last averages
    model = Transformer(cfg)
    ddp = rt.wrap_model(model, runtime)
    assert ddp.broadcast_buffers is False
    with rt.skip_grad_sync(ddp):
        ddp(x).float().square().mean().backward()
    local = next(model.parameters()).grad.clone()
    grads = [torch.zeros_like(local) for _ in range(2)]
    dist.all_gather(grads, local)
    assert not torch.equal(grads[0], grads[1])  # not synchronised
    ddp(x).float().square().mean().backward()
    synced = [p.grad for p in model.parameters() if p.grad is not None]
    for g in synced:
        both = [torch.zeros_like(g) for _ in range(2)]
        dist.all_gather(both, g)
        assert torch.equal(both[0], both[1])

    # FSDP2: no reduce-scatter for a skipped micro-batch, one per parameter group for the last
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg

    calls = []
    original = pg.foreach_reduce
    pg.foreach_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    model = Transformer(cfg)
    fsdp = rt.wrap_model(model, runtime, fsdp=True)
    with rt.skip_grad_sync(fsdp):
        fsdp(x).float().square().mean().backward()
    assert calls == []
    fsdp(x).float().square().mean().backward()
    assert len(calls) == cfg.n_layer + 1  # each block and the root
    pg.foreach_reduce = original
    rt.teardown()


def test_in_process_groups_prepare_once_and_sync_once_per_step(tmp_path):
    log = tmp_path / "order"
    mp.spawn(_worker, args=(_free_port(), str(log)), nprocs=2, join=True)
    assert log.read_text() == "0\n1\n"


def test_single_process_helpers_are_no_ops():
    with rt.main_process_first() as first:
        assert first
    runtime = rt.Runtime(torch.device("cpu"), torch.float32)
    assert rt.gather_objects({"a": 1}, runtime) == [{"a": 1}]
    torch.manual_seed(5)
    rt.seed_rank(99, runtime)  # one process keeps the run's seed stream
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(5).get_state())
    assert json.dumps(rt._launch_env()) == "[0, 1, 0]"
