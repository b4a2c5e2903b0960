import json
import math

import pytest
import torch

from conftest import tiny_config
from tinylm import checkpoint as ckpt_mod
from tinylm import runtime as rt
from tinylm.checkpoint import RunRecord, checkpoint_dir, load_run
from tinylm.config import TrainConfig, build_configs
from tinylm.data import TokenData, token_batches
from tinylm.errors import TinyLMError
from tinylm.model import Transformer
from tinylm.runtime import setup
from tinylm.train import Trainer, train
from tinylm.viz import read_metrics

pytestmark = pytest.mark.numerics


def test_short_real_run_loss_falls_clearly(tiny_run):
    rows = read_metrics(tiny_run)
    train_rows = [r for r in rows if r["type"] == "train"]
    evals = [r for r in rows if r["type"] == "eval"]
    assert train_rows[0]["loss"] > 4.0  # ~ln(65) at initialisation
    assert evals[-1]["val_loss"] < 3.2 and evals[-1]["step"] == 60
    assert {"lr", "grad_norm", "tokens_per_sec"} <= set(train_rows[-1])
    for name in ("last", "best"):
        assert (checkpoint_dir(tiny_run, name) / "model.safetensors").is_file()
    run = load_run(tiny_run)  # self-contained: config + tokenizer + weights
    assert run.tokenizer.vocab_size == run.model_cfg.vocab_size and not run.model.training


def test_resume_is_exact(char_data, tmp_path):
    overrides = {"max_steps": 40, "eval_interval": 10, "dropout": 0.1, "grad_accum": 2}
    one = train(char_data, tmp_path / "one", "tiny", overrides, progress=False)
    train(char_data, tmp_path / "two", "tiny", overrides, stop_after=20, progress=False)
    two = train(out=tmp_path / "two", resume=True, progress=False)
    assert two.steps == one.steps == 40
    a, b = load_run(tmp_path / "one").model.state_dict(), load_run(tmp_path / "two").model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    with pytest.raises(TinyLMError, match="already finished"):
        train(out=tmp_path / "two", resume=True, progress=False)
    with pytest.raises(TinyLMError, match="different model config"):
        train(out=tmp_path / "two", resume=True, overrides={"n_layer": 3, "max_steps": 50}, progress=False)
    with pytest.raises(TinyLMError, match=r"already holds a finished run \(40 of 40 steps\)"):
        train(char_data, tmp_path / "two", "tiny", overrides, progress=False)


def test_muon_run_learns_and_resumes_exactly(char_data, tmp_path):
    overrides = {"max_steps": 30, "eval_interval": 10, "optimizer": "muon", "muon_lr": 0.02, "lr": 3e-3}
    one = train(char_data, tmp_path / "one", "tiny", overrides, progress=False)
    losses = [row["loss"] for row in one.val_losses]
    assert losses[-1] < losses[0] - 0.3
    train(char_data, tmp_path / "two", "tiny", overrides, stop_after=15, progress=False)
    with pytest.raises(TinyLMError, match="does not fit optimizer 'adamw'"):
        train(out=tmp_path / "two", resume=True, overrides={"optimizer": "adamw"}, progress=False)
    train(out=tmp_path / "two", resume=True, progress=False)
    a, b = load_run(tmp_path / "one").model.state_dict(), load_run(tmp_path / "two").model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


SPEEDRUN = {  # issue 22: every speedrun option on, the ramps still running when the run is split
    "mlp": "relu2", "qk_norm": True, "zero_init": True, "value_embeds": 1, "embed_skip": True, "unet_skips": True,
    "tie_embeddings": False, "logit_softcap": 15.0, "optimizer": "muon", "orthogonalizer": "polar-express",
    "normuon": True, "batch_size_start": 4, "block_size_start": 8, "ramp_steps": 12,
}  # fmt: skip


def test_speedrun_options_learn_and_resume_bit_for_bit(char_data, tmp_path):
    overrides = {**SPEEDRUN, "max_steps": 20, "eval_interval": 10, "n_layer": 3, "lr": 3e-3, "muon_lr": 0.02}
    one = train(char_data, tmp_path / "one", "tiny", overrides, progress=False)
    losses = [row["loss"] for row in one.val_losses]
    assert losses[-1] < losses[0] - 0.2 and losses[0] < 4.0  # from ln(65) = 4.17 (the zero-initialised head)
    train(char_data, tmp_path / "two", "tiny", overrides, stop_after=7, progress=False)  # mid-ramp
    train(out=tmp_path / "two", resume=True, progress=False)
    a, b = load_run(tmp_path / "one").model.state_dict(), load_run(tmp_path / "two").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ramped_steps_train_on_cropped_batches(char_data, tmp_path):
    trainer = _trainer(char_data, tmp_path, "ramp", batch_size_start=2, block_size_start=8, ramp_steps=4)
    shapes = [tuple(next(trainer.micro_batches(step))[0].shape) for step in range(6)]
    assert shapes == [(2, 8), (4, 16), (5, 24), (7, 24), (8, 32), (8, 32)]
    full = next(_trainer(char_data, tmp_path, "full").micro_batches(0))
    x, y = next(trainer.micro_batches(0))
    assert torch.equal(x, full[0][:2, :8]) and torch.equal(y, full[1][:2, :8])  # the same windows, cropped


def _trainer(char_data, tmp_path, name, **overrides):
    data = TokenData(char_data)
    model_cfg, cfg = build_configs(
        "tiny", {"max_steps": 5, "device": "cpu", **overrides}, vocab_size=data.tokenizer.vocab_size
    )
    source, val = token_batches(data, model_cfg.block_size, cfg)
    record = RunRecord(model_cfg, cfg, data=str(char_data))
    runtime = setup(cfg.device, cfg.dtype, cfg.seed)
    return Trainer(record, source, val, tmp_path / name, data.tokenizer, runtime, progress=False)


def test_gradient_accumulation_equals_larger_batch(char_data, tmp_path):
    accum = _trainer(char_data, tmp_path, "a", batch_size=4, grad_accum=2)
    big = _trainer(char_data, tmp_path, "b", batch_size=8, grad_accum=1)
    big.model.load_state_dict(accum.model.state_dict())
    micro = list(accum.micro_batches(0))
    big.micro_batches = lambda step: [(torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro]))]
    sa, sb = accum.train_step(0), big.train_step(0)
    assert sa["loss"] == pytest.approx(sb["loss"], rel=1e-5)
    assert sa["grad_norm"] == pytest.approx(sb["grad_norm"], rel=1e-4)
    for pa, pb in zip(accum.model.parameters(), big.model.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_the_trainer_builds_the_seeds_initial_weights_with_a_tied_head(char_data, tmp_path):
    trainer = _trainer(char_data, tmp_path, "t", seed=5)
    model = trainer.model
    assert model.lm_head.weight is model.tok_emb.weight  # tied again after the meta device
    reference = Transformer(model.cfg)
    reference.reset_parameters(seed=5)
    for name, p in reference.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name


def test_epoch_mode_logs_and_checkpoints_each_epoch(char_data, tmp_path):
    lines = []
    result = train(
        char_data,
        tmp_path / "ep",
        "tiny",
        {"epochs": 2, "max_steps": 0, "window_stride": 64},
        progress=False,
        log=lines.append,
    )
    assert [l.split(":")[0] for l in lines] == ["Epoch 1/2", "Epoch 2/2"]
    assert "average loss" in lines[0] and "validation loss" in lines[0]
    assert [e["epoch"] for e in result.epoch_losses] == [1, 2]
    assert {p.name for p in (tmp_path / "ep" / "checkpoints").iterdir()} >= {
        "epoch_1",
        "epoch_2",
        "last",
        "best",
    }


def test_a_failed_save_keeps_the_previous_checkpoint(tiny_run, monkeypatch):
    before = load_run(tiny_run).model.state_dict()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_state_dict", crash)
    with pytest.raises(OSError):
        ckpt_mod.save_checkpoint(tiny_run, "last", before, None, {})
    after = load_run(tiny_run).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in (tiny_run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_nan_loss_stops_with_last_good_checkpoint(char_data, tmp_path):
    trainer = _trainer(char_data, tmp_path, "nan", max_steps=20, eval_interval=5)
    trainer.train(stop_after=5)
    with torch.no_grad():
        trainer.model.tok_emb.weight.fill_(float("nan"))
    with pytest.raises(TinyLMError, match="Loss became nan"):
        trainer.train()
    weights = load_run(tmp_path / "nan").model.tok_emb.weight
    assert torch.isfinite(weights).all()


def test_unwritable_run_directory_is_a_clear_error(char_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TinyLMError, match="Cannot write to the run directory"):
        train(char_data, blocker / "run", "tiny", progress=False)


def test_moe_preset_trains(char_data, tmp_path):
    result = train(
        char_data,
        tmp_path / "moe",
        "seed-char-moe",
        {"max_steps": 8, "batch_size": 4, "block_size": 32, "eval_interval": 8, "eval_batches": 2},
        progress=False,
    )
    assert math.isfinite(result.val_loss) and result.val_loss < 4.2


def test_ctrl_c_saves_a_resumable_checkpoint_at_the_step_boundary(char_data, tmp_path):
    import os
    import signal

    from tinylm.train import TrainingInterrupted

    trainer = _trainer(char_data, tmp_path, "int", max_steps=20, eval_interval=50)
    real_step = trainer.train_step

    def interrupt_during_step_7(step, stop=None):
        if step == 7:  # a real SIGINT in the middle of a one-micro-batch step: the step still completes
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(step, stop)

    trainer.train_step = interrupt_during_step_7
    with pytest.raises(TrainingInterrupted, match="tinylm train --resume") as info:
        trainer.train()
    assert info.value.exit_code == 130
    assert json.loads((checkpoint_dir(tmp_path / "int", "last") / "meta.json").read_text())["step"] == 8
    assert train(out=tmp_path / "int", resume=True, progress=False).steps == 20


def test_warmup_longer_than_the_run_is_clamped_with_a_warning(char_data, tmp_path):
    with pytest.warns(
        UserWarning, match="warmup_steps \\(500\\) is not shorter than the run \\(20 steps\\); using 2"
    ):
        train(
            char_data,
            tmp_path / "w",
            "tiny",
            {"max_steps": 20, "warmup_steps": 500, "log_interval": 1},
            progress=False,
        )
    rows = read_metrics(tmp_path / "w")
    assert max(r["lr"] for r in rows if r["type"] == "train") == pytest.approx(3e-3)  # the peak is reached


def test_no_preset_spends_more_than_a_tenth_of_training_on_validation():
    import numpy as np

    from tinylm.config import PRESETS
    from tinylm.data import RandomWindows
    from tinylm.train import eval_share

    for name in PRESETS:
        model_cfg, cfg = build_configs(name, vocab_size=65)
        source = RandomWindows(np.zeros(5000, dtype=np.uint16), 8, 1, 0, total_steps=cfg.max_steps)
        assert eval_share(source, cfg) <= 0.1, name


def test_ramps_keep_their_global_start_on_another_number_of_processes_and_refuse_epochs():
    from tinylm.train import _keep_global_batch

    record = RunRecord(tiny_config(), TrainConfig(batch_size=8, batch_size_start=4, ramp_steps=10))
    one = _keep_global_batch(record, saved=2, runtime=rt.Runtime(torch.device("cpu"), torch.float32))
    assert (one.train.batch_size, one.train.batch_size_start) == (16, 8)
    four = rt.Runtime(torch.device("cpu"), torch.float32, rank=1, world_size=4)
    assert (_keep_global_batch(record, 2, four).train.batch_size_start) == 2
    with pytest.raises(TinyLMError, match="not --epochs"):
        TrainConfig(epochs=1, block_size_start=8, ramp_steps=10)


def test_tokens_per_second_counts_the_ramped_batches(char_data, tmp_path):
    trainer = _trainer(char_data, tmp_path, "ramp", batch_size_start=2, block_size_start=8, ramp_steps=4)
    assert [trainer.tokens_at(s) for s in (0, 1, 4)] == [2 * 8, 4 * 16, 8 * 32]
