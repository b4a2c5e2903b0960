"""The training engine: train() -> train_step() / evaluate() / save(), on CPU, one GPU or many."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from tinylm import runtime as rt
from tinylm.checkpoint import (
    STATE,
    WEIGHTS,
    checkpoint_dir,
    load_weights,
    prune_checkpoints,
    read_run_config,
    save_checkpoint,
    write_run_config,
)
from tinylm.config import ModelConfig, TrainConfig, build_configs, from_dict
from tinylm.data import EpochWindows, RandomWindows, SlidingWindowDataset, TokenData, check_length
from tinylm.errors import TinyLMError
from tinylm.evaluate import mean_loss
from tinylm.model import Transformer
from tinylm.optim import build_optimizer, lr_at


@dataclass
class Batches:
    """Training batches by step (an object with .batch(step, micro) -> (x, y)) and fixed validation batches."""

    train: Any
    val: list[tuple[torch.Tensor, torch.Tensor]]


class TrainingInterrupted(TinyLMError):
    """Ctrl-C during training: a checkpoint was saved and the run can be resumed."""


@dataclass
class TrainResult:
    """What a training run produced: where it is, how it ended, and its loss histories."""

    run_dir: Path
    rank: int
    steps: int
    train_loss: float
    val_loss: float
    seconds: float
    tokens_per_sec: float
    train_losses: list[dict] = field(default_factory=list)  # {step, loss}
    val_losses: list[dict] = field(default_factory=list)  # {step, epoch, loss}
    epoch_losses: list[dict] = field(default_factory=list)  # {epoch, train_loss, val_loss}

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "steps": self.steps,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "seconds": round(self.seconds, 3),
            "tokens_per_sec": round(self.tokens_per_sec, 1),
        }


class Trainer:
    """Owns the model, optimizer and data of one run; `train()` is the whole loop."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        data: TokenData,
        run_dir: Path,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
        extra: dict[str, Any] | None = None,
        *,
        model_init: Callable[[Transformer], None] | None = None,
        batches: Batches | None = None,
    ) -> None:
        self.model_cfg, self.cfg, self.data, self.run_dir = model_cfg, cfg, data, Path(run_dir)
        self.extra = (
            extra if extra is not None else {"data": str(data.path.resolve()), "data_meta": data.meta}
        )
        self.rt = rt.setup(cfg.device, cfg.dtype, cfg.seed)
        self.progress = progress and self.rt.is_main
        self.log = (log or tqdm.write) if self.rt.is_main else (lambda msg: None)
        self.model = Transformer(model_cfg).to(self.rt.device)
        if model_init is not None:  # e.g. load pre-trained weights, wrap LoRA adapters
            model_init(self.model)
        self.model.grad_checkpointing = cfg.grad_checkpointing
        self.optimizer = build_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.rt.device.type, enabled=self.rt.dtype == torch.float16)
        self.step, self.best_val = 0, math.inf
        self.history: dict[str, list[dict]] = {"train_losses": [], "val_losses": [], "epoch_losses": []}
        self._make_batches(batches)
        self._fit_warmup()
        self.wrapped = self._wrap(self.model)
        self.sinks = self._make_sinks()

    # ----- set-up -------------------------------------------------------------------------
    def _make_batches(self, batches: Batches | None) -> None:
        cfg, r = self.cfg, self.rt
        if batches is not None:  # the caller brings its own (e.g. masked prompt/response pairs)
            self.sampler, self.val_batches, self.total_steps = batches.train, batches.val, cfg.max_steps
            if cfg.epochs > 0:
                raise TinyLMError("These batches are drawn by step; use --max-steps instead of --epochs.")
            return
        self.train_tokens, self.val_tokens = self.data.split("train"), self.data.split("val")
        check_length(self.train_tokens, self.model_cfg.block_size, "train")
        check_length(self.val_tokens, self.model_cfg.block_size, "validation")
        if cfg.epochs > 0:
            dataset = SlidingWindowDataset(self.train_tokens, self.model_cfg.block_size, cfg.window_stride)
            self.epoch_windows = EpochWindows(dataset, cfg.batch_size, cfg.seed, r.rank, r.world_size)
            self.steps_per_epoch = max(1, self.epoch_windows.batches_per_epoch // cfg.grad_accum)
            self.total_steps = cfg.epochs * self.steps_per_epoch
        else:
            self.sampler = RandomWindows(
                self.train_tokens, self.model_cfg.block_size, cfg.batch_size, cfg.seed, r.rank, r.world_size
            )
            self.total_steps = cfg.max_steps
        # A fixed set of validation windows, so successive estimates are comparable.
        val = RandomWindows(
            self.val_tokens, self.model_cfg.block_size, cfg.batch_size, cfg.seed + 1, r.rank, r.world_size
        )
        self.val_batches = [val.batch(0, i) for i in range(cfg.eval_batches)]

    def _fit_warmup(self) -> None:
        """A warmup as long as the run would never reach the peak lr: use a tenth of the run instead."""
        if self.cfg.warmup_steps >= self.total_steps:
            warmup = max(1, self.total_steps // 10)
            warnings.warn(
                f"warmup_steps ({self.cfg.warmup_steps}) is not shorter than the run ({self.total_steps} steps); using {warmup}."
            )
            self.cfg = replace(self.cfg, warmup_steps=warmup)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """Apply FSDP2 or DDP (under torchrun) and torch.compile from outside the model."""
        if self.rt.distributed:
            if self.cfg.fsdp:
                from torch.distributed.fsdp import fully_shard

                for block in model.blocks:
                    fully_shard(block)
                fully_shard(model)
                self.optimizer = build_optimizer(model, self.cfg)
            else:
                from torch.nn.parallel import DistributedDataParallel

                model = DistributedDataParallel(
                    model, device_ids=[self.rt.local_rank] if self.rt.device.type == "cuda" else None
                )
        if self.cfg.compile:
            try:
                model = torch.compile(model)
            except Exception as exc:  # e.g. no C compiler, unsupported platform
                warnings.warn(f"torch.compile is not available here ({exc}); training without it.")
        return model

    # ----- the loop -----------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> TrainResult:
        """Train until total_steps (or `stop_after` more steps); evaluate, log and checkpoint on the way."""
        if self.step >= self.total_steps:
            raise TinyLMError(
                f"This run already finished ({self.step} of {self.total_steps} steps); "
                "pass a larger --max-steps or --epochs to continue it."
            )
        self._check_writable()
        if self.rt.is_main:
            write_run_config(self.run_dir, self.model_cfg, self.cfg, self.data.tokenizer, self.extra)
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        start_time, start_step = time.perf_counter(), self.step
        bar = tqdm(
            total=end,
            initial=self.step,
            disable=not self.progress,
            desc=self._bar_label(),
            dynamic_ncols=True,
        )
        loss = float("nan")
        try:
            while self.step < end:
                t0 = time.perf_counter()
                stats = self.train_step(self.step)
                loss = stats["loss"]
                self.step += 1
                stats["tokens_per_sec"] = self.tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                self._after_step(stats, bar)
        except KeyboardInterrupt:
            bar.close()
            self.save("last")
            raise TrainingInterrupted(
                f"Interrupted at step {self.step}; saved a checkpoint. Resume with: tinylm train --resume {self.run_dir}"
            ) from None
        bar.close()
        val_loss = self.history["val_losses"][-1]["loss"] if self.history["val_losses"] else float("nan")
        if self.step == end and (
            not self.history["val_losses"] or self.history["val_losses"][-1]["step"] != self.step
        ):
            val_loss = self.evaluate()
            self.save("last")
        seconds = time.perf_counter() - start_time
        return TrainResult(
            self.run_dir,
            self.rt.rank,
            self.step,
            loss,
            val_loss,
            seconds,
            (self.step - start_step) * self.tokens_per_step / max(seconds, 1e-9),
            **self.history,
        )

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches: forward, backward, clip, update."""
        lr = lr_at(step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        micro = self.micro_batches(step)
        total = torch.zeros((), device=self.rt.device)  # summed on device: no sync per micro-batch
        for i, (x, y) in enumerate(micro):
            x, y = x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True)
            sync = i == len(micro) - 1 or not hasattr(self.wrapped, "no_sync")
            with self.wrapped.no_sync() if not sync else contextlib.nullcontext(), self.rt.autocast():
                logits, aux = self.wrapped(x, return_aux=True)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                objective = (loss + self.model_cfg.moe_aux_weight * aux) / len(micro)
            self.scaler.scale(objective).backward()
            total += loss.detach() / len(micro)
        if self.rt.distributed:  # log the global-batch loss, as a single process would see it
            import torch.distributed as dist

            dist.all_reduce(total)
            total /= self.rt.world_size
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = torch.stack(
            [total, grad_norm.float().to(total.device)]
        ).tolist()  # the step's one sync
        if not math.isfinite(loss_value):
            raise TinyLMError(
                f"Loss became {loss_value} at step {step + 1}; stopped. The last good checkpoint in {self.run_dir} is intact; "
                "lower --lr, raise warmup_steps, or use --dtype fp32/bf16 instead of fp16."
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "lr": lr, "grad_norm": norm_value}

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The grad_accum micro-batches of optimizer step `step` (a pure function of the seed)."""
        accum = self.cfg.grad_accum
        if self.cfg.epochs > 0:
            epoch, k = divmod(step, self.steps_per_epoch)
            return [self.epoch_windows.batch(epoch, k * accum + m) for m in range(accum)]
        return [self.sampler.batch(step, m) for m in range(accum)]

    def evaluate(self) -> float:
        """Mean validation loss over the fixed validation batches; records it and keeps `best`."""
        loss = mean_loss(self.wrapped, self.val_batches, self.rt.autocast())
        if self.rt.distributed:
            import torch.distributed as dist

            t = torch.tensor([loss], device=self.rt.device)
            dist.all_reduce(t)
            loss = t.item() / self.rt.world_size
        epoch = self.step / self.steps_per_epoch if self.cfg.epochs > 0 else None
        self.history["val_losses"].append({"step": self.step, "epoch": epoch, "loss": loss})
        self._metrics({"type": "eval", "step": self.step, "epoch": epoch, "val_loss": loss})
        if loss < self.best_val:
            self.best_val = loss
            self.save("best")
        return loss

    # ----- bookkeeping --------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.model_cfg.block_size * self.rt.world_size

    def _bar_label(self) -> str:
        if self.cfg.epochs > 0:
            return f"Epoch {self.step // self.steps_per_epoch + 1}/{self.cfg.epochs}"
        return "Training"

    def _after_step(self, stats: dict[str, float], bar: tqdm) -> None:
        step, cfg = self.step, self.cfg
        self.history["train_losses"].append({"step": step, "loss": stats["loss"]})
        bar.update(1)
        bar.set_description(self._bar_label(), refresh=False)
        bar.set_postfix(
            loss=f"{stats['loss']:.3f}",
            lr=f"{stats['lr']:.6f}",
            tok_s=f"{stats['tokens_per_sec']:.0f}",
            refresh=False,
        )
        if step % cfg.log_interval == 0 or step == 1:
            self._metrics({"type": "train", "step": step, **stats})
        if cfg.epochs > 0 and step % self.steps_per_epoch == 0:
            self._end_epoch(step // self.steps_per_epoch)
        elif cfg.epochs == 0 and (step % cfg.eval_interval == 0 or step == self.total_steps):
            val = self.evaluate()
            self.log(f"step {step}: train loss {stats['loss']:.4f}, val loss {val:.4f}")
            self.save("last")
        if cfg.save_interval and step % cfg.save_interval == 0:
            self.save(f"step_{step:07d}")
            if cfg.keep_last:
                prune_checkpoints(self.run_dir, "step_", cfg.keep_last)

    def _end_epoch(self, epoch: int) -> None:
        losses = [r["loss"] for r in self.history["train_losses"][-self.steps_per_epoch :]]
        avg = sum(losses) / len(losses)
        val = self.evaluate()
        self.history["epoch_losses"].append({"epoch": epoch, "train_loss": avg, "val_loss": val})
        self._metrics(
            {"type": "epoch", "step": self.step, "epoch": epoch, "train_loss": avg, "val_loss": val}
        )
        self.log(f"Epoch {epoch}/{self.cfg.epochs}: average loss {avg:.4f}, validation loss {val:.4f}")
        self.save(f"epoch_{epoch}")
        self.save("last")
        if self.cfg.keep_last:
            prune_checkpoints(self.run_dir, "epoch_", self.cfg.keep_last)

    def _metrics(self, row: dict[str, Any]) -> None:
        if self.rt.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({**row, "time": time.time()}) + "\n")
            for sink in self.sinks:
                sink(row)

    def _make_sinks(self) -> list[Callable[[dict[str, Any]], None]]:
        """Optional TensorBoard / Weights & Biases loggers (rank 0 only)."""
        sinks: list[Callable[[dict[str, Any]], None]] = []
        if not self.rt.is_main:
            return sinks
        numeric = lambda row: {
            f"{row['type']}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"
        }
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TinyLMError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard."
                ) from None
            writer = SummaryWriter(str(self.run_dir / "tensorboard"))

            def to_tensorboard(row: dict[str, Any]) -> None:
                for k, v in numeric(row).items():
                    writer.add_scalar(k, v, row["step"])
                writer.flush()

            sinks.append(to_tensorboard)
        if self.cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise TinyLMError("--wandb needs the wandb package: pip install wandb.") from None
            wandb.init(
                project="tinylm",
                name=self.run_dir.name,
                config={"model": self.model_cfg.__dict__, "train": self.cfg.__dict__},
            )
            sinks.append(lambda row: wandb.log(numeric(row), step=row["step"]))
        return sinks

    def _check_writable(self) -> None:
        """Fail before training, not at the first checkpoint, when the run directory cannot hold one."""
        if not self.rt.is_main:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise TinyLMError(
                f"Cannot write to the run directory {self.run_dir} ({exc.strerror}); choose another --out."
            ) from None
        params = sum(p.numel() for p in self.model.parameters())
        needed = params * 4 * 3 * 3  # weights + two Adam moments, for last/best/one more
        free = shutil.disk_usage(self.run_dir).free
        if free < needed:
            raise TinyLMError(
                f"Only {free / 1e6:.0f} MB free at {self.run_dir}; checkpoints need about {needed / 1e6:.0f} MB."
            )

    # ----- checkpoints --------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        if self.rt.distributed and self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.model.state_dict()

    def optimizer_state(self) -> dict[str, Any]:
        if self.rt.distributed and self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.optimizer.state_dict()

    def save(self, name: str) -> None:
        """Checkpoint NAME: weights, optimizer, step, RNG states and histories (rank 0 writes)."""
        model_state, optim_state = self.model_state(), self.optimizer_state()
        if not self.rt.is_main:
            return
        state = {
            "step": self.step,
            "optimizer": optim_state,
            "scaler": self.scaler.state_dict(),
            "best_val": self.best_val,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": self.history,
        }
        epoch = self.step / self.steps_per_epoch if self.cfg.epochs > 0 else None
        last_val = self.history["val_losses"][-1]["loss"] if self.history["val_losses"] else None
        meta = {"step": self.step, "epoch": epoch, "val_loss": last_val, "total_steps": self.total_steps}
        save_checkpoint(self.run_dir, name, model_state, state, meta)

    def restore(self, name: str = "last") -> None:
        """Load weights and the full training state of checkpoint NAME, to continue exactly."""
        ckpt = checkpoint_dir(self.run_dir, name)
        load_weights(self.model, ckpt / WEIGHTS)
        if not (ckpt / STATE).is_file():
            raise TinyLMError(
                f"Checkpoint {ckpt} has no training state, so it cannot be resumed; fine-tune from it instead."
            )
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
        if self.rt.distributed and self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                self.model, self.optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        else:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError, TinyLMError) as exc:
                raise TinyLMError(
                    f"The optimizer state in {ckpt} does not fit optimizer {self.cfg.optimizer!r}; "
                    "resume with the optimizer the run was trained with."
                ) from exc
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_val, self.history = state["step"], state["best_val"], state["history"]
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metrics rows written after the checkpoint we resume from."""
        path = self.run_dir / "metrics.jsonl"
        if self.rt.is_main and path.is_file():
            rows = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line).get("step", 0) <= self.step
            ]
            path.write_text("".join(r + "\n" for r in rows))


def train(
    data: str | Path | None = None,
    out: str | Path = "runs/run",
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a model on a prepared data directory (or resume the run in `out`) and return its result.

    `overrides` sets any ModelConfig or TrainConfig field, e.g. {"n_layer": 4, "max_steps": 500}.
    """
    run_dir = Path(out)
    if resume:
        trainer = _resuming_trainer(run_dir, overrides or {}, progress, log)
    else:
        if data is None:
            raise TinyLMError("Pass the prepared data directory (--data DIR), or --resume an existing run.")
        token_data = TokenData(data)
        model_cfg, train_cfg = build_configs(preset, overrides, vocab_size=token_data.tokenizer.vocab_size)
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            raise TinyLMError(
                f"{run_dir} already holds a run; resume it with --resume, or choose another --out."
            )
        extra = {"preset": preset, "data": str(token_data.path.resolve()), "data_meta": token_data.meta}
        trainer = Trainer(model_cfg, train_cfg, token_data, run_dir, progress, log, extra)
    try:
        return trainer.train(stop_after=stop_after)
    finally:
        rt.teardown()


def _resuming_trainer(
    run_dir: Path, overrides: dict[str, Any], progress: bool, log: Callable[[str], None] | None
) -> Trainer:
    config = read_run_config(run_dir)
    if "finetune" in config:
        raise TinyLMError(
            f"{run_dir} is a fine-tuning run; resume it with: tinylm finetune --resume {run_dir}"
        )
    model_cfg = from_dict(ModelConfig, config["model"])
    changed = {k: v for k, v in overrides.items() if k in config["model"] and config["model"][k] != v}
    if changed:
        raise TinyLMError(
            f"Cannot resume with a different model config ({', '.join(changed)}); start a new run instead."
        )
    train_values = {**config["train"], **{k: v for k, v in overrides.items() if k not in config["model"]}}
    train_cfg = from_dict(TrainConfig, train_values)
    extra = {k: v for k, v in config.items() if k not in ("model", "train")}
    trainer = Trainer(model_cfg, train_cfg, TokenData(config["data"]), run_dir, progress, log, extra)
    trainer.restore("last")
    return trainer


__all__ = ["train", "Trainer", "TrainResult", "TrainingInterrupted", "Batches"]
