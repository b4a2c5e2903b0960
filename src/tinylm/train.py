"""The training engine: train() -> train_step() / evaluate() / checkpoint(), on CPU, one GPU or many."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tinylm import runtime as rt
from tinylm.checkpoint import (
    META,
    CorruptFile,
    RunLog,
    RunRecord,
    check_run_dir,
    checkpoint_dir,
    materialise,
    newest_good_checkpoint,
    prune_checkpoints,
    read_json,
    recover_checkpoints,
    tied_aliases,
)
from tinylm.checkpointer import Checkpointer, TrainingParts, load_start_weights, restore_training
from tinylm.config import TrainConfig, build_configs
from tinylm.data import Batch, BatchSource, TokenData, token_batches
from tinylm.errors import TinyLMError
from tinylm.evaluate import mean_loss, scored_tokens
from tinylm.history import LossHistory
from tinylm.model import Transformer, on_meta
from tinylm.model.transformer import init_parameters
from tinylm.optim import batch_shape_at, build_optimizer, lr_at
from tinylm.progress import progress_bar, show_step, write
from tinylm.tokenizer import Tokenizer

EVAL_SHARE_WARNING = (
    0.25  # warn when validation would take this share of the training compute (presets: < 0.1)
)
BatchesFor = Callable[[RunRecord, rt.Runtime], tuple[BatchSource, list[Batch]]]
Adapt = Callable[[Transformer], None]  # changes a model's structure before it is sharded, e.g. LoRA
SECOND_SIGNAL = (
    "Still stopping: finishing this batch and saving checkpoint 'last' so the run can resume. "
    "Press Ctrl-C again to quit at once without it (the previous checkpoint stays intact)."
)


class TrainingInterrupted(TinyLMError):
    """SIGINT / SIGTERM during training: `last` was saved at the last completed step (a step cut short between
    micro-batches is discarded) and the run can be resumed; the Trainer is done."""

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them

    @classmethod
    def saved(cls, step: int, resume_command: str, signum: int) -> TrainingInterrupted:
        return cls(
            f"Interrupted at step {step}; saved checkpoint 'last'. Resume with: {resume_command}", signum
        )


@dataclass
class TrainResult:
    """What a training session produced: where it is, how far it got, and its loss histories."""

    run_dir: Path
    rank: int
    steps: int  # the run's step count after this session
    start_step: int  # where this session started (0 unless resumed)
    total_steps: int
    train_loss: float
    train_loss_kind: str  # which loss train_loss is, e.g. "last step" or "epoch 3 average"
    val_loss: float
    seconds: float
    tokens_per_sec: float
    resume_command: str = ""
    train_losses: list[dict] = field(default_factory=list)  # {step, loss}, every log_interval steps
    val_losses: list[dict] = field(default_factory=list)  # {step, epoch, loss}
    epoch_losses: list[dict] = field(default_factory=list)  # {epoch, train_loss, val_loss}

    @property
    def session_steps(self) -> int:
        return self.steps - self.start_step

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps

    @classmethod
    def of(cls, trainer: Trainer, start_step: int, seconds: float) -> TrainResult:
        """The result of `trainer`'s session that started at `start_step` and took `seconds`."""
        h, source = trainer.history, trainer.source
        epochs = h.epoch_losses
        loss, kind = (h.last_train, "last step") if h.last_train is not None else (math.nan, "none")
        if epochs and source.epoch_done(trainer.step) == epochs[-1]["epoch"]:
            loss, kind = epochs[-1]["train_loss"], f"epoch {epochs[-1]['epoch']} average"
        tokens = sum(trainer.tokens_at(s) for s in range(start_step, trainer.step))
        val = h.last_val()
        val = math.nan if val is None else val
        return cls(
            trainer.run_dir, trainer.rt.rank, trainer.step, start_step, source.total_steps, loss, kind, val,
            seconds, tokens / max(seconds, 1e-9), trainer.record.resume_command(trainer.run_dir), **h.to_dict(),
        )  # fmt: skip

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "steps": self.steps,
            "session_steps": self.session_steps,
            "total_steps": self.total_steps,
            "train_loss": self.train_loss,
            "train_loss_kind": self.train_loss_kind,
            "val_loss": self.val_loss,
            "seconds": round(self.seconds, 3),
            "tokens_per_sec": round(self.tokens_per_sec, 1),
        }


class Trainer:
    """Owns the model, optimizer and batches of one run; `train()` is the whole loop."""

    def __init__(
        self,
        record: RunRecord,
        source: BatchSource,
        val_batches: list[Batch],
        run_dir: Path,
        tokenizer: Tokenizer,
        runtime: rt.Runtime,
        *,
        adapt: Adapt | None = None,
        init_from: Path | None = None,
        resume_from: Path | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.record, self.cfg, self.source, self.val_batches = record, record.train, source, val_batches
        self.run_dir, self.tokenizer, self.rt = Path(run_dir), tokenizer, runtime
        self.progress = progress and runtime.is_main
        self.log = (log or write) if runtime.is_main else (lambda msg: None)
        fsdp = runtime.distributed and self.cfg.fsdp
        self.model, renames = build_model(record, runtime, fsdp=fsdp, adapt=adapt)
        if init_from is not None:  # e.g. a fine-tuning run's base weights
            load_start_weights(self.model, init_from, fsdp, renames)
        if adapt is not None or init_from is not None:
            self.log(_trainable_share(self.model))
        # each rank its own dropout stream from here; rank 0 the single-process one
        rt.seed_rank(self.cfg.seed, runtime)
        self.model.grad_checkpointing = self.cfg.grad_checkpointing
        self.wrapped = rt.wrap_model(self.model, runtime, fsdp=fsdp, compile=self.cfg.compile)
        self.optimizer = build_optimizer(self.model, self.cfg)
        scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
        self.parts = TrainingParts(self.model, self.optimizer, scaler, runtime, fsdp)
        self.checkpointer = Checkpointer(self.run_dir, self.parts, async_save=self.cfg.async_save)
        self.step, self.best_val, self.history = 0, math.inf, LossHistory()
        self._last_saved = -1  # the step `last` was saved at in this session
        self.run_log = RunLog(self.run_dir, record, enabled=runtime.is_main)
        if resume_from is not None:  # weights, optimizer, RNG, then data position and counters
            state = restore_training(self.parts, resume_from, self.cfg.optimizer)
            self.source.load_state_dict(state.get("data", {}))
            self.step, self.best_val = state["step"], state["best_val"]
            self._last_saved = self.step if resume_from.name in ("last", ".last.old") else -1
            rows = self.run_log.truncate(self.step)
            if "losses" in state:
                self.history = LossHistory.resumed(state["losses"], rows)
            else:  # a checkpoint of an earlier version, which kept the histories whole
                self.history = LossHistory.from_old_checkpoint(state.get("history", {}), self.source.epoch_of)

    # ----- the loop -----------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> TrainResult:
        """Train until total_steps (or `stop_after` more steps); evaluate, log and checkpoint on the way.
        SIGINT / SIGTERM stop the loop at the next micro-batch boundary (a step cut short is discarded), save
        `last` and raise TrainingInterrupted."""
        _refuse_finished(self.step, self.source.total_steps)
        if self.rt.is_main:
            check_run_dir(self.run_dir, sum(p.numel() for p in self.model.parameters()))
            self.record.write(self.run_dir, self.tokenizer)
        total = self.source.total_steps
        end = total if stop_after is None else min(total, self.step + stop_after)
        start_time, start_step = time.perf_counter(), self.step
        bar = progress_bar(total, initial=self.step, desc=self.source.label(self.step), enabled=self.progress)
        with rt.StopSignals(SECOND_SIGNAL, announce=self.rt.is_main) as signals:  # shields the saves below
            try:
                stop = lambda: rt.any_rank(signals.received is not None, self.rt)  # noqa: E731
                pending = self.source.evaluates_at(self.step, self.cfg.eval_interval) and self.step > 0
                if pending and not self.history.evaluated_at(self.step):  # a signal cut it short last time
                    self._due()
                stopped = self._steps(end, bar, stop)
                bar.close()
                if stopped:  # every rank, at the same step boundary
                    if self._last_saved != self.step:
                        self.save("last")  # written before the exception leaves: the `finally` below waits
                    raise TrainingInterrupted.saved(
                        self.step,
                        self.record.resume_command(self.run_dir),
                        signals.received or signal.SIGTERM,
                    )
                if not self.history.evaluated_at(self.step):
                    self.checkpoint(self.evaluate(), epoch=None)  # e.g. --stop-after between evaluations
            finally:
                self.checkpointer.wait()  # a save in the background ends before training does
        return TrainResult.of(self, start_step, time.perf_counter() - start_time)

    def _steps(self, end: int, bar: Any, stop: Callable[[], bool]) -> bool:
        """Optimizer steps until `end`, or until `stop()` says so (asked between micro-batches, the same on every
        rank); whether it did."""
        while self.step < end:
            if stop():
                return True
            t0 = time.perf_counter()
            stats = self.train_step(self.step, stop)
            if stats is None:
                return True
            self.step += 1
            stats["tokens_per_sec"] = self.tokens_at(self.step - 1) / max(time.perf_counter() - t0, 1e-9)
            show_step(bar, self.source.label(self.step), stats)
            # a signal may cut an evaluation short, except the last one (the run would then be finished)
            if not self._after_step(stats, stop if self.step < self.source.total_steps else None):
                return True
        return False

    def train_step(self, step: int, stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
        """One optimizer step over grad_accum micro-batches: forward, backward, clip, update. When `stop()` turns
        true between micro-batches the step is discarded (gradients dropped, RNG rewound) and None returned, so
        the state is still that after step `step - 1`."""
        lr = lr_at(step, self.source.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        n, scaler = self.cfg.grad_accum, self.parts.scaler
        rewind = rt.rng_state() if stop is not None and n > 1 else None  # dropout draws of a discarded step
        total = torch.zeros((), device=self.rt.device)  # summed on device: no sync per micro-batch
        for i, (x, y) in enumerate(self.micro_batches(step)):
            if i and rewind is not None and stop is not None and stop():
                self.optimizer.zero_grad(set_to_none=True)
                rt.set_rng_state(rewind)
                return None
            x, y = x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True)
            last = i == n - 1  # gradients are synchronised across ranks once per step
            with contextlib.nullcontext() if last else rt.skip_grad_sync(self.wrapped), self.rt.autocast():
                logits, aux = self.wrapped(x, return_aux=True)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                objective = (loss + self.record.model.moe_aux_weight * aux) / n
            scaler.scale(objective).backward()
            total += loss.detach() / n
        if self.rt.distributed:  # log the global-batch loss, as a single process would see it
            total = rt.all_mean(total)
        scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = torch.stack([total, grad_norm.float().to(total.device)]).tolist()  # one sync
        _refuse_non_finite(loss_value, step, self.run_dir)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        stats = {"loss": loss_value, "lr": lr, "grad_norm": norm_value}
        if self.rt.device.type == "cuda":  # the allocator's high-water mark, read on the host: no sync
            stats["max_mem_gb"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
        return stats

    def micro_batches(self, step: int) -> Iterator[Batch]:
        """The grad_accum micro-batches of optimizer step `step` (a pure function of the seed), each made when
        it is used, cropped to the batch-size / sequence-length ramps' shape at this step when those are on."""
        if not (self.cfg.batch_size_start or self.cfg.block_size_start):
            return (self.source.batch(step, m) for m in range(self.cfg.grad_accum))
        rows, length = batch_shape_at(step, self.cfg, self.cfg.batch_size, self.record.model.block_size)
        crops = (self.source.batch(step, m) for m in range(self.cfg.grad_accum))
        return ((x[:rows, :length], y[:rows, :length]) for x, y in crops)

    def evaluate(self, stop: Callable[[], bool] | None = None) -> float | None:
        """Mean validation loss over the fixed validation batches (averaged over ranks); recorded. None,
        recording nothing, when `stop()` (asked before each batch, the same on every rank) says so."""
        loss = mean_loss(
            self.wrapped, self.val_batches, self.rt.autocast(), progress=self.progress, stop=stop
        )
        if loss is None:
            return None
        if self.rt.distributed:
            loss = rt.all_mean(torch.tensor(loss, device=self.rt.device)).item()
        epoch = self.source.epoch_of(self.step)
        self.history.add_val(self.step, epoch, loss)
        tokens = scored_tokens(self.val_batches)  # eval_tokens' worth, in whole batches, over all processes
        if self.rt.distributed:
            tokens = int(rt.all_sum(torch.tensor(tokens, dtype=torch.int64, device=self.rt.device)).item())
        row = {"type": "eval", "step": self.step, "epoch": epoch, "val_loss": loss, "val_tokens": tokens}
        if self.cfg.eval_tokens > 0:
            row["eval_tokens"] = self.cfg.eval_tokens  # the budget, beside the tokens it scored
        self.run_log.write(row)
        return loss

    def checkpoint(self, val_loss: float, epoch: int | None) -> None:
        """The checkpoint policy, after an evaluation: `best` when validation improved, `epoch_N` at an
        epoch's end, and always `last`; numbered copies are pruned to keep_last."""
        if val_loss < self.best_val:
            self.best_val = val_loss
            self.save("best")
        if epoch is not None:
            self.save(f"epoch_{epoch}", after=self._pruner("epoch_"))
        self.save("last")

    def save(self, name: str, after: Callable[[], None] | None = None) -> None:
        """Checkpoint NAME: weights, optimizer, step, data position, RNG states and the few numbers that continue
        the loss histories (collective; see Checkpointer). `after` runs on rank 0 once it is in place."""
        step, source = self.step, self.source
        counters = {"step": step, "best_val": self.best_val, "losses": self.history.resume_state()}
        meta = {"step": step, "epoch": source.epoch_of(step), "val_loss": self.history.last_val()}
        counters["data"], meta["total_steps"] = source.state_dict(), source.total_steps
        self.checkpointer.save(name, counters, meta, after)
        if name == "last":
            self._last_saved = step

    def close(self) -> None:
        """Finish a save still being written and stop the background writer."""
        self.checkpointer.close()

    # ----- bookkeeping --------------------------------------------------------------------
    def _pruner(self, prefix: str) -> Callable[[], None] | None:
        keep, run_dir = self.cfg.keep_last, self.run_dir
        return (lambda: prune_checkpoints(run_dir, prefix, keep)) if keep else None

    def _after_step(self, stats: dict[str, float], stop: Callable[[], bool] | None = None) -> bool:
        """Log step `self.step`, then what is due at it; False if `stop()` cut its evaluation short."""
        step, cfg = self.step, self.cfg
        logged = step % cfg.log_interval == 0 or step == 1
        self.history.add_train(step, stats["loss"], logged)
        if logged:
            self.run_log.write({"type": "train", "step": step, **stats})
        return self._due(stop)

    def _due(self, stop: Callable[[], bool] | None = None) -> bool:
        """The evaluation (with its checkpoints) and the numbered save due at this step. False, doing neither,
        when `stop()` cuts the evaluation short: the run saves `last` and the resumed run does them first."""
        step, cfg = self.step, self.cfg
        if self.source.evaluates_at(step, cfg.eval_interval):
            val = self.evaluate(stop)
            if val is None:
                return False
            epoch = self.source.epoch_done(step)
            if epoch is None:
                self.log(f"step {step}: train loss {self.history.last_train:.4f}, val loss {val:.4f}")
            else:
                avg = self.history.end_epoch(epoch, val)
                self.run_log.write(
                    {"type": "epoch", "step": step, "epoch": epoch, "train_loss": avg, "val_loss": val}
                )
                self.log(f"{self.source.label(step - 1)}: average loss {avg:.4f}, validation loss {val:.4f}")
            self.checkpoint(val, epoch)
        if cfg.save_interval and step % cfg.save_interval == 0:
            self.save(f"step_{step:07d}", after=self._pruner("step_"))
        return True

    def tokens_at(self, step: int) -> int:
        """Tokens trained by optimizer step `step` on all ranks (fewer while the batch / sequence ramps grow)."""
        rows, length = batch_shape_at(step, self.cfg, self.cfg.batch_size, self.record.model.block_size)
        return rows * length * self.cfg.grad_accum * self.rt.world_size


def build_model(
    record: RunRecord, runtime: rt.Runtime, *, fsdp: bool = False, adapt: Adapt | None = None
) -> tuple[Transformer, dict[str, str]]:
    """The run's model, built on the meta device, adapted (e.g. LoRA), sharded under FSDP, and only then given
    memory and initial values: each rank allocates and draws only its shards, and the weights equal those of
    one process with the same seed. Also the names its parameters had before `adapt` -> their names now."""
    with on_meta():
        model = Transformer(record.model)
        before = {id(p): name for name, p in model.named_parameters()}
        if adapt is not None:
            adapt(model)
    renames = {before[id(p)]: name for name, p in model.named_parameters() if id(p) in before}
    ties = tied_aliases(model)
    if fsdp:
        rt.shard(model)
    materialise(model, runtime.device, ties, sharded=fsdp)
    init_parameters(model, record.train.seed, local=rt.local_part)
    return model, renames


def _trainable_share(model: Transformer) -> str:
    n, trainable = (
        sum(p.numel() for p in model.parameters()),
        sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    return f"Training {trainable:,} of {n:,} parameters ({100 * trainable / n:.2f}%)"


def _refuse_finished(step: int, total: int) -> None:
    if step >= total:
        raise TinyLMError(
            f"This run already finished ({step} of {total} steps); pass a larger --max-steps or --epochs to continue it."
        )


def _refuse_non_finite(loss: float, step: int, run_dir: Path) -> None:
    if not math.isfinite(loss):
        raise TinyLMError(
            f"Loss became {loss} at step {step + 1}; stopped. The last good checkpoint in {run_dir} "
            "is intact; lower --lr, raise warmup_steps, or use --dtype fp32/bf16 instead of fp16."
        )


# ----- entry points -----------------------------------------------------------------------------
def fit_warmup(cfg: TrainConfig, total_steps: int) -> TrainConfig:
    """A warmup as long as the run would never reach the peak lr: use a tenth of the run instead."""
    if cfg.warmup_steps < total_steps:
        return cfg
    return replace(cfg, warmup_steps=max(1, total_steps // 10))


def eval_share(source: BatchSource, cfg: TrainConfig, n_batches: int | None = None) -> float:
    """Validation forward passes as a fraction of training compute (a forward + backward ~ 3 forwards);
    n_batches: validation batches per estimate (default eval_batches; eval_tokens may set another count)."""
    evals = sum(1 for s in range(1, source.total_steps + 1) if source.evaluates_at(s, cfg.eval_interval))
    n = cfg.eval_batches if n_batches is None else n_batches
    return evals * n / (3 * source.total_steps * cfg.grad_accum)


def setup_warnings(asked: TrainConfig, used: TrainConfig, source: BatchSource, n_val: int) -> list[str]:
    """What to tell the user about the recipe `asked` for this run, `used` as fitted to it: a warmup too long
    for the run, and validation that would take too large a share of the time."""
    notes = []
    if used.warmup_steps != asked.warmup_steps:
        notes.append(
            f"warmup_steps ({asked.warmup_steps}) is not shorter than the run ({source.total_steps} steps); "
            f"using {used.warmup_steps}."
        )
    share = eval_share(source, used, n_val)
    if share > EVAL_SHARE_WARNING:
        knob = "eval_tokens" if used.eval_tokens > 0 else "eval_batches"
        notes.append(
            f"Validation ({n_val} batches, {knob}={getattr(used, knob)}) will take about "
            f"{100 * share:.0f}% of the training time; lower {knob} or raise eval_interval to spend less."
        )
    return notes


def run_training(
    record: RunRecord,
    run_dir: Path,
    tokenizer: Tokenizer,
    batches_for: BatchesFor,
    *,
    adapt: Adapt | None = None,
    init_from: Path | None = None,
    resume_from: str | None = None,
    keep_global_batch: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Set up the runtime, the batch source and a Trainer (from the weights of checkpoint `init_from`, or resumed
    from checkpoint `resume_from`), and train. Resumed on another number of processes, batch_size per process
    is rescaled to keep the global batch (unless `keep_global_batch` is False: the caller set batch_size)."""
    runtime = rt.setup(record.train.device, record.train.dtype, record.train.seed)
    clean = False  # whether every rank ends here the same way, so they can wait for each other
    trainer = None
    try:
        ckpt = None
        if resume_from is not None:
            if runtime.is_main:
                recover_checkpoints(run_dir)
            rt.barrier(runtime)
            ckpt = checkpoint_dir(run_dir, resume_from)
            if keep_global_batch:
                record = _keep_global_batch(record, _saved_world_size(ckpt), runtime)
        source, val_batches = batches_for(record, runtime)
        asked = record.train
        record = replace(record, train=fit_warmup(asked, source.total_steps))
        try:
            trainer = Trainer(
                record, source, val_batches, run_dir, tokenizer, runtime,
                adapt=adapt, init_from=init_from, resume_from=ckpt, progress=progress, log=log,
            )  # fmt: skip
        except CorruptFile as exc:
            raise TinyLMError(f"{exc} {_newest_good(run_dir, resume_from or '', record)}") from None
        if runtime.is_main:  # once the run has loaded (one that cannot start says only why), by one rank
            for note in setup_warnings(asked, record.train, source, len(val_batches)):
                warnings.warn(note)
        try:
            result = trainer.train(stop_after=stop_after)
        except TrainingInterrupted:  # every rank stopped at the same step boundary
            clean = True
            raise
        clean = True
        return result
    finally:
        if trainer is not None:
            trainer.close()
        rt.teardown(clean)


def _saved_world_size(ckpt: Path) -> int:
    """How many processes wrote checkpoint `ckpt` (1 for checkpoints of earlier versions)."""
    try:
        return int(read_json(ckpt / META).get("world_size", 1))
    except CorruptFile:  # reported in full when the trainer loads it
        return 1


def _keep_global_batch(record: RunRecord, saved: int, runtime: rt.Runtime) -> RunRecord:
    """`record` with batch_size per process rescaled so a run written by `saved` processes keeps its global
    batch (and so its loss curve) on this number of processes."""
    world, batch = runtime.world_size, record.train.batch_size
    if saved == world:
        return record
    if batch * saved % world:
        if runtime.is_main:
            warnings.warn(
                f"The checkpoint was written by {saved} process(es) with batch_size {batch} each; {world} cannot "
                f"split {batch * saved} sequences evenly, so the global batch becomes {batch * world} and the loss "
                "curve will differ from the original run's; pass --batch-size to choose."
            )
        return record
    new = batch * saved // world
    if runtime.is_main:
        write(
            f"Resuming a {saved}-process checkpoint on {world} process(es): batch_size {batch} -> {new} per "
            f"process keeps the global batch at {batch * saved} sequences."
        )
    start = record.train.batch_size_start  # a batch-size ramp keeps its global start too
    start = min(new, max(1, start * saved // world)) if start else 0
    return replace(record, train=replace(record.train, batch_size=new, batch_size_start=start))


def _newest_good(run_dir: Path, broken: str, record: RunRecord) -> str:
    good = newest_good_checkpoint(run_dir, exclude=broken)
    if good is None:
        return "No other checkpoint of this run is intact; start a new run."
    return f"The newest good checkpoint is {good[0]!r} (step {good[1]}): {record.resume_command(run_dir)} --checkpoint {good[0]}"


def train(
    data: str | Path | None = None,
    out: str | Path = "runs/run",
    preset: str = "tiny",
    overrides: dict[str, Any] | None = None,
    *,
    resume: bool = False,
    checkpoint: str = "last",
    stop_after: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a model on a prepared data directory (or resume the run in `out`) and return its result.

    `overrides` sets any ModelConfig or TrainConfig field, e.g. {"n_layer": 4, "max_steps": 500}.
    """
    run_dir = Path(out)
    if resume:
        record = RunRecord.read(run_dir)
        if record.finetune is not None:
            raise TinyLMError(
                f"{run_dir} is a fine-tuning run; resume it with: {record.resume_command(run_dir)}"
            )
        record = record.resumed(overrides or {})
        if record.data is None:
            raise TinyLMError(f"{run_dir} records no training data, so it cannot be resumed.")
        token_data = TokenData(record.data)
    else:
        if data is None:
            raise TinyLMError("Pass the prepared data directory (--data DIR), or --resume an existing run.")
        token_data = TokenData(data)
        model_cfg, train_cfg = build_configs(preset, overrides, vocab_size=token_data.tokenizer.vocab_size)
        refuse_existing_run(run_dir)
        record = RunRecord(
            model_cfg,
            train_cfg,
            data=str(token_data.path.resolve()),
            tokenizer_hash=token_data.tokenizer_hash,
            preset=preset,
            data_meta=token_data.meta,
        )

    def batches_for(record: RunRecord, runtime: rt.Runtime) -> tuple[BatchSource, list[Batch]]:
        return token_batches(
            token_data, record.model.block_size, record.train, runtime.rank, runtime.world_size
        )

    return run_training(
        record,
        run_dir,
        token_data.tokenizer,
        batches_for,
        resume_from=checkpoint if resume else None,
        keep_global_batch="batch_size" not in (overrides or {}),
        stop_after=stop_after,
        progress=progress,
        log=log,
    )


def refuse_existing_run(run_dir: Path) -> None:
    """Never train over a user's run; say how to continue it: resume a stopped run, extend a finished one."""
    if not ((run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())):
        return
    try:
        meta = json.loads((run_dir / "checkpoints" / "last" / META).read_text())
        step, total = int(meta["step"]), int(meta["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        raise TinyLMError(
            f"{run_dir} already holds a run; resume it with --resume, or choose another --out."
        ) from None
    if step >= total:
        longer = (
            f"--epochs N (N > {meta['epoch']:g})" if meta.get("epoch") else f"--max-steps N (N > {total})"
        )
        raise TinyLMError(
            f"{run_dir} already holds a finished run ({step} of {total} steps); choose another --out, or train it "
            f"longer with: tinylm train --resume {run_dir} {longer}."
        )
    raise TinyLMError(
        f"{run_dir} holds a run stopped at step {step} of {total}; continue it with: tinylm train --resume "
        f"{run_dir}, or choose another --out."
    )


__all__ = ["train", "run_training", "build_model", "Trainer", "TrainResult", "TrainingInterrupted"]
