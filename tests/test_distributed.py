"""Multiple processes on CPU (gloo): per-rank seeds and RNG on resume, exact DDP / FSDP2 resume, sharded
initialisation (each rank allocates and draws only its shards, equal to one process's init), sharded DCP
checkpoints that resume on another number of processes and survive a kill during an asynchronous save,
interrupts between micro-batches agreed by every rank, gradient synchronisation once per step, data
prepared once, clean exits."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_config
from tinylm import runtime as rt
from tinylm.checkpoint import RunRecord, is_sharded, load_run
from tinylm.checkpointer import Checkpointer, TrainingParts, _by_name, restore_training
from tinylm.cli import main
from tinylm.config import TrainConfig
from tinylm.errors import TinyLMError
from tinylm.model import Transformer
from tinylm.optim import build_optimizer
from tinylm.train import build_model

pytestmark = pytest.mark.numerics

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: object, script: Path | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    """`tinylm ARGS` (or `python SCRIPT ARGS`) in 2 processes under torchrun; with `ok`, asserts a clean exit on
    every rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(script)] if script else ["-m", "tinylm"]
    out = subprocess.run([*cmd, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300)
    if ok:
        assert out.returncode == 0, out.stderr[-2000:]
    assert "terminate called" not in out.stderr
    return out


def _one(*args: object) -> None:
    """`tinylm ARGS` in this process; asserts it succeeded."""
    assert main([str(a) for a in args]) == 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_run(run).model.state_dict()  # single-file or sharded


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["type"] == "train"}


def _meta(run: Path, name: str = "last") -> dict:
    return json.loads((run / "checkpoints" / name / "meta.json").read_text())


# dropout > 0 and gradient accumulation: exact only if each rank resumes its own RNG stream
EXACT = ["--preset", "tiny", "--max-steps", 6, "--eval-interval", 3, "--set", "eval_batches=2"]
EXACT += ["--set", "dropout=0.2", "--batch-size", 4, "--grad-accum", 2, "--device", "cpu", "--no-progress"]


# issue 22's speedrun options (model and ramps; NorMuon / Polar Express where Muon runs, i.e. not under FSDP)
SPEEDRUN = (
    "mlp=relu2 qk_norm=true zero_init=true value_embeds=1 embed_skip=true unet_skips=true logit_softcap=15"
)
SPEEDRUN += " tie_embeddings=false batch_size_start=2 block_size_start=8 ramp_steps=5"
MUON = "optimizer=muon orthogonalizer=polar-express normuon=true"


def _mode_args(mode: str) -> list:
    """EXACT's arguments for a mode: ddp or fsdp, optionally with every speedrun option (-speedrun)."""
    args = [*EXACT, *(["--fsdp"] if mode.startswith("fsdp") else [])]
    if mode.endswith("speedrun"):
        extra = SPEEDRUN if mode.startswith("fsdp") else f"{SPEEDRUN} {MUON}"
        args += [arg for pair in extra.split() for arg in ("--set", pair)]
    return args


@pytest.fixture(scope="module")
def straight(char_data, tmp_path_factory):
    """The 2-process run left alone, per mode (`_mode_args`), trained once."""
    runs = {}

    def get(mode):
        if mode not in runs:
            out = tmp_path_factory.mktemp("straight") / mode
            _torchrun("train", "--data", char_data, *_mode_args(mode), "--out", out)
            runs[mode] = out
        return runs[mode]

    return get


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-speedrun", "fsdp-speedrun"])
def test_multi_process_resume_is_bitwise_and_ranks_draw_their_own_dropout(
    char_data, tmp_path, straight, mode
):
    train = ["train", "--data", char_data, *_mode_args(mode)]
    _torchrun(*train, "--out", tmp_path / "split", "--stop-after", 4)  # stops between evaluations
    assert is_sharded(tmp_path / "split" / "checkpoints" / "last") == mode.startswith("fsdp")
    state = torch.load(tmp_path / "split" / "checkpoints" / "last" / "state.pt", weights_only=True)
    _torchrun("train", "--resume", tmp_path / "split", "--device", "cpu", "--no-progress")
    _assert_equal(_weights(straight(mode)), _weights(tmp_path / "split"))

    # every rank's generator was saved, and they differ: the ranks draw different dropout masks
    assert state["step"] == 4 and len(state["rng_ranks"]) == 2
    masks = []
    for rng in state["rng_ranks"]:
        torch.set_rng_state(rng["rng_cpu"])
        masks.append(torch.nn.functional.dropout(torch.ones(4096), 0.2) != 0)
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(state["rng_cpu"], state["rng_ranks"][0]["rng_cpu"])  # rank 0's at the top, as before


# Runs in every rank under torchrun: SIGTERM to rank 0 alone, before micro-batch 1 of step 4 (0-based).
INTERRUPT = r"""
import os, signal, sys
import importlib
T = importlib.import_module("tinylm.train")
micro = T.Trainer.micro_batches
def micro_batches(self, step):
    for m, batch in enumerate(micro(self, step)):
        if step == 4 and m == 1 and os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGTERM)
        yield batch
T.Trainer.micro_batches = micro_batches
from tinylm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _served_greedy(run: Path, prompt: str, tokens: int) -> str:
    """A greedy completion from `tinylm serve`'s app for RUN, over HTTP on a free port."""
    import httpx

    from conftest import start_server
    from tinylm.serve import load_app

    server, thread, url = start_server(load_app(run, device="cpu", name="tiny"))
    try:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": tokens, "temperature": 0}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_fsdp_interrupt_between_micro_batches_on_one_rank_resumes_bitwise(
    char_data, tmp_path, straight, capsys
):
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT)
    out = tmp_path / "run"
    proc = _torchrun("train", "--data", char_data, *EXACT, "--fsdp", "--out", out, script=script, ok=False)
    assert proc.returncode != 0 and "Resume with: tinylm train --resume" in proc.stderr, proc.stderr[-2000:]
    assert _meta(out)["step"] == 4  # both ranks discarded step 5 after its first micro-batch
    _torchrun("train", "--resume", out, "--no-progress")
    _assert_equal(_weights(straight("fsdp")), _weights(out))

    # a sharded checkpoint loads in one process on the fly, and `consolidate` makes it one file
    def sample() -> str:
        argv = [
            "generate",
            out,
            "--prompt",
            "ROMEO:",
            "--max-new-tokens",
            8,
            "--greedy",
            "--no-progress",
            "--json",
        ]
        _one(*argv)
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]

    before = sample()
    _one("export", out, "--format", "gguf", "--out", tmp_path / "model.gguf")  # export reads the shards too
    assert _served_greedy(out, "ROMEO:", 8) == before  # and so does serve
    _one("consolidate", out)
    single = out / "checkpoints" / "last" / "model.safetensors"
    assert single.is_file() and is_sharded(single.parent)
    assert sample() == before
    assert main(["consolidate", str(out)]) == 2  # never over an existing file
    from safetensors.torch import load_file

    weights = _weights(out)
    _assert_equal({k: v for k, v in weights.items() if k != "lm_head.weight"}, load_file(str(single)))


def test_a_damaged_shard_is_one_sentence_naming_it(straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight("fsdp"), run)
    shard = run / "checkpoints" / "last" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    code = main(["train", "--resume", str(run), "--max-steps", "9", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(shard) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "newest good checkpoint is 'best' (step 6)" in err


# One global batch of 4 sequences per micro-batch: 4 x 1 process or 2 x 2 processes.
CROSS = ["--preset", "tiny", "--max-steps", 8, "--eval-interval", 4, "--grad-accum", 4, "--device", "cpu"]
CROSS += ["--no-progress", "--set", "eval_batches=2", "--set", "log_interval=1", "--set", "dropout=0"]


def _assert_same_curve(run: Path, reference: dict[int, float], steps: range) -> None:
    losses = _losses(run)
    for step in steps:  # fp32 sums in another order: far below the loss's own noise
        assert losses[step] == pytest.approx(reference[step], abs=1e-4), step


@pytest.fixture(scope="module")
def one_process(char_data, tmp_path_factory):
    """CROSS in one process, left alone: the reference curve."""
    out = tmp_path_factory.mktemp("one") / "run"
    _one("train", "--data", char_data, *CROSS, "--batch-size", 4, "--out", out)
    return _losses(out)


def test_checkpoints_resume_on_another_number_of_processes(char_data, tmp_path, one_process):
    # 2 processes write a sharded checkpoint at step 4; one process continues it (batch_size 2 -> 4)
    two = tmp_path / "two"
    _torchrun(
        "train", "--data", char_data, *CROSS, "--batch-size", 2, "--fsdp", "--out", two, "--stop-after", 4
    )
    assert is_sharded(two / "checkpoints" / "last") and _meta(two)["world_size"] == 2
    _one("train", "--resume", two)
    _assert_same_curve(two, one_process, range(1, 9))
    # one process writes single files at step 4; 2 processes continue them sharded (batch_size 4 -> 2)
    back = tmp_path / "back"
    _one("train", "--data", char_data, *CROSS, "--batch-size", 4, "--out", back, "--stop-after", 4)
    _torchrun("train", "--resume", back, "--fsdp", "--no-progress")
    assert is_sharded(back / "checkpoints" / "last") and _meta(back)["world_size"] == 2
    _assert_same_curve(back, one_process, range(5, 9))


def test_compile_and_grad_checkpointing_compose_with_sharding(char_data, tmp_path, one_process):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        char_data,
        *CROSS,
        "--batch-size",
        2,
        "--fsdp",
        "--out",
        out,
        "--stop-after",
        2,
    ]
    proc = _torchrun(*args, "--compile", "--grad-checkpointing")
    assert "torch.compile is not available" not in proc.stderr  # compiled, not fallen back to eager
    losses = _losses(out)
    for step in (1, 2):  # compiled kernels sum in their own order
        assert losses[step] == pytest.approx(one_process[step], abs=1e-3)


# Runs in every rank under torchrun: rank 1 dies (SIGKILL) as it starts writing its shards of the third save.
KILL_WHILE_SAVING = r"""
import os, signal, sys
from torch.distributed.checkpoint import filesystem
write, calls = filesystem.FileSystemWriter.write_data, []
def write_data(self, plan, planner):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return write(self, plan, planner)
filesystem.FileSystemWriter.write_data = write_data
from tinylm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_an_asynchronous_sharded_save_leaves_the_previous_checkpoint(
    char_data, tmp_path, one_process
):
    script = tmp_path / "kill.py"
    script.write_text(KILL_WHILE_SAVING)
    out = tmp_path / "run"
    args = ["train", "--data", char_data, *CROSS, "--batch-size", 2, "--fsdp", "--async-save", "--out", out]
    proc = _torchrun(*args, script=script, ok=False)
    assert proc.returncode != 0 and "exitcode  : -9" in proc.stderr, proc.stderr[-2000:]  # rank 1 killed
    assert _meta(out)["step"] == _meta(out, "best")["step"] == 4  # the saves after step 4, intact
    _one("train", "--resume", out)
    _assert_same_curve(out, one_process, range(1, 9))


def test_lora_fine_tuning_composes_with_sharding(straight, shakespeare_slice, tmp_path):
    out = tmp_path / "ft"
    args = [
        "finetune",
        straight("fsdp"),
        "--data",
        shakespeare_slice,
        "--out",
        out,
        "--max-steps",
        2,
        "--lora",
    ]
    _torchrun(
        *args, "--no-progress", "--set", "eval_batches=1", "--set", "fsdp=true"
    )  # rank 0 prepares the text
    assert (out / "data" / "meta.json").is_file() and is_sharded(out / "checkpoints" / "last")
    from safetensors.torch import load_file

    adapters = load_file(str(out / "adapter.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)
    base, tuned = _weights(straight("fsdp")), _weights(out)  # the frozen base weights: loaded, then untouched
    assert torch.equal(tuned["blocks.0.attn.wq.base.weight"], base["blocks.0.attn.wq.weight"])
    assert torch.equal(tuned["tok_emb.weight"], base["tok_emb.weight"])


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


# ----- sharded initialisation and resharding, exactly (torch.multiprocessing) ---------------------------------
def _status_kb(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def _gathered(parts: TrainingParts) -> dict:
    """The whole model and optimizer state of a sharded model, on every rank (CPU)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    model = get_model_state_dict(parts.model, options=options)
    return {
        "model": model,
        "optimizer": get_optimizer_state_dict(parts.model, parts.optimizer, options=options),
    }


def _parts(record: RunRecord, runtime: rt.Runtime, fsdp: bool) -> TrainingParts:
    model, _ = build_model(record, runtime, fsdp=fsdp)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainingParts(model, build_optimizer(model, record.train), scaler, runtime, fsdp)


def _train_steps(parts: TrainingParts, steps: int) -> None:
    for step in range(steps):
        x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(step))
        parts.model(x).float().logsumexp(-1).mean().backward()
        parts.optimizer.step()
        parts.optimizer.zero_grad()


SMALL = RunRecord(tiny_config(n_layer=2), TrainConfig(seed=11, fsdp=True))  # a tied head
WIDE = RunRecord(tiny_config(n_layer=8, n_embd=512, n_head=8), TrainConfig(seed=11, fsdp=True))  # 25M, 101 MB


def _sharding_worker(rank: int, port: int, work: str, job: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    runtime = rt.setup("cpu", "fp32", seed=0)
    work = Path(work)
    if job == "init":  # build WIDE sharded: memory, then the whole weights for the parent to compare
        build_model(SMALL, runtime, fsdp=True)  # first use: imports and allocator set-up, not counted below
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak-RSS count here
        rss = _status_kb("VmRSS")
        model, _ = build_model(WIDE, runtime, fsdp=True)
        grew = (_status_kb("VmHWM") - rss) * 1024
        held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        whole = _gathered(TrainingParts(model, torch.optim.SGD(model.parameters()), None, runtime, True))[
            "model"
        ]
        if rank == 0:
            torch.save({"model": whole}, work / "init.pt")
        (work / f"init-{rank}.json").write_text(json.dumps({"grew": grew, "held": held}))
    elif job == "save":  # train SMALL 2 steps sharded, checkpoint it with DCP, and gather what it holds
        parts = _parts(SMALL, runtime, fsdp=True)
        assert parts.model.lm_head.weight is parts.model.tok_emb.weight
        _train_steps(parts, 2)
        Checkpointer(work / "run", parts).save("last", {"step": 2}, {"step": 2})
        reference = _gathered(parts)
        if rank == 0:
            torch.save(reference, work / "reference.pt")
    else:  # job "load": a one-process checkpoint into SMALL sharded, gathered back
        parts = _parts(SMALL, runtime, fsdp=True)
        restore_training(parts, work / "single" / "checkpoints" / "last", "adamw")
        loaded = _gathered(parts)
        if rank == 0:
            torch.save(loaded, work / "loaded.pt")
    rt.teardown()


def _spawn(work: Path, job: str) -> None:
    mp.spawn(_sharding_worker, args=(_free_port(), str(work), job), nprocs=2, join=True)


def _assert_same_state(full: dict, parts: TrainingParts) -> None:
    _assert_equal(full["model"], parts.model.state_dict())
    plain = _by_name(parts.optimizer.state_dict(), parts.model, parts.optimizer)
    assert full["optimizer"]["state"].keys() == plain["state"].keys()
    for name, moments in full["optimizer"]["state"].items():
        _assert_equal(moments, plain["state"][name])


def test_sharded_init_holds_half_per_rank_and_equals_one_process_init(tmp_path):
    _spawn(tmp_path, "init")
    whole = sum(p.numel() * 4 for p in Transformer(WIDE.model).parameters())
    for rank in range(2):
        stats = json.loads((tmp_path / f"init-{rank}.json").read_text())
        assert 0.45 * whole < stats["held"] < 0.55 * whole  # each rank's share of the parameters
        assert stats["grew"] < 0.7 * whole, (
            f"rank {rank} grew {stats['grew'] / 1e6:.0f} MB to build a {whole / 1e6:.0f} MB model"
        )
    one, _ = build_model(WIDE, rt.Runtime(torch.device("cpu"), torch.float32), fsdp=False)
    _assert_equal(torch.load(tmp_path / "init.pt")["model"], one.state_dict())
    assert one.lm_head.weight is one.tok_emb.weight  # still tied after the meta device


def test_sharded_checkpoints_reshard_exactly_both_ways(tmp_path):
    _spawn(tmp_path, "save")  # 2 ranks, DCP
    reference = torch.load(tmp_path / "reference.pt")
    single = _parts(SMALL, rt.Runtime(torch.device("cpu"), torch.float32), fsdp=False)
    restore_training(single, tmp_path / "run" / "checkpoints" / "last", "adamw")  # into one process
    _assert_same_state(reference, single)
    Checkpointer(tmp_path / "single", single).save("last", {"step": 2}, {"step": 2})  # single files
    _spawn(tmp_path, "load")  # back into 2 ranks
    _assert_same_state(torch.load(tmp_path / "loaded.pt"), single)


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
