"""A training run's whole state on disk and back: weights, optimizer, loss scaler, every rank's RNG and the
trainer's counters.

One process or DDP: rank 0 writes single-file checkpoints (model.safetensors + state.pt). FSDP: every rank
writes its own shards of the weights and optimizer state with PyTorch's distributed checkpointing (DCP), so
no rank ever holds the whole model; state.pt then keeps only the counters and RNG states. A checkpoint of
either format resumes on any number of processes (DCP reshards on load). With `async_save` the files are
written in the background while training goes on; a crash meanwhile leaves the previous checkpoint.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tinylm import checkpoint as files  # its writers are called through the module, so tests can hook them
from tinylm.checkpoint import (
    STATE,
    WEIGHTS,
    CorruptFile,
    check_shards,
    is_sharded,
    last_line,
    load_state_dict_file,
    load_train_state,
    read_json,
    temp_checkpoint_dir,
    tied_aliases,
    unique_tensors,
)
from tinylm.errors import TinyLMError
from tinylm.runtime import Runtime, broadcast, gather_objects, rng_state, set_rng_state


@dataclass
class TrainingParts:
    """What a training checkpoint holds besides counters: the model, its optimizer and loss scaler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    runtime: Runtime
    fsdp: bool  # the model is sharded: checkpoints are DCP shards


class Checkpointer:
    """Writes the checkpoints of one training session. `save` is collective; with `async_save` it returns once
    the state is copied aside, at most one save is in flight, and `wait` finishes it."""

    def __init__(self, run_dir: Path, parts: TrainingParts, async_save: bool = False) -> None:
        self.run_dir, self.parts = Path(run_dir), parts
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tinylm-save") if async_save else None
        self._pending: Future | None = None
        self._group = None
        if (
            async_save and parts.fsdp and parts.runtime.distributed
        ):  # DCP's collectives, off the training group
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")

    def save(
        self,
        name: str,
        counters: dict[str, Any],
        meta: dict[str, Any],
        after: Callable[[], None] | None = None,
    ) -> None:
        """Checkpoint NAME: weights, optimizer, loss scaler, every rank's RNG (each rank resumes its own) and
        `counters` (step, best validation loss, data position, ...). `after` runs on rank 0 once it is in place."""
        self.wait()
        parts = self.parts
        rng = gather_objects(rng_state(), parts.runtime)
        state = {**counters, "scaler": parts.scaler.state_dict(), **rng[0], "rng_ranks": rng}
        meta = {**meta, "world_size": parts.runtime.world_size, "sharded": parts.fsdp}
        if parts.fsdp:
            self._save_sharded(name, state, meta, after)
        else:
            self._save_files(name, state, meta, after)

    def wait(self) -> None:
        """Finish the save in flight, if any (raising its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the save in flight and stop the background writer."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown()

    # ----- the two formats ---------------------------------------------------------------------------
    def _save_files(
        self, name: str, state: dict[str, Any], meta: dict[str, Any], after: Callable[[], None] | None
    ) -> None:
        if not self.parts.runtime.is_main:  # replicated: rank 0 has it all
            return
        weights, state["optimizer"] = self.parts.model.state_dict(), self.parts.optimizer.state_dict()

        def write() -> None:
            files.save_checkpoint(self.run_dir, name, weights, state, meta)
            if after is not None:
                after()

        if self._executor is None:
            write()
            return
        weights, state = _copied(unique_tensors(weights)), _copied(state)  # training changes the live ones
        self._pending = self._executor.submit(write)

    def _save_sharded(
        self, name: str, state: dict[str, Any], meta: dict[str, Any], after: Callable[[], None] | None
    ) -> None:
        import torch.distributed.checkpoint as dcp

        rt = self.parts.runtime
        tmp = Path(broadcast(str(temp_checkpoint_dir(self.run_dir, name)) if rt.is_main else None, rt))
        shards = sharded_state(self.parts)
        state["optimizer_saved"] = "optimizer" in shards

        def finish() -> None:
            if rt.is_main:
                files.finish_sharded_checkpoint(tmp, name, state, meta)
                if after is not None:
                    after()

        try:
            if self._executor is None:
                dcp.save(shards, checkpoint_id=str(tmp))
                finish()
                return
            written = dcp.async_save(shards, checkpoint_id=str(tmp), process_group=self._group)
        except BaseException:
            if rt.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

        def complete() -> None:
            try:
                written.result()
            except BaseException:
                if rt.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            finish()

        self._pending = self._executor.submit(complete)


def _copied(obj: Any) -> Any:
    """A deep copy with every tensor copied to the CPU (what a background write may read)."""
    return copy.deepcopy(obj, memo={id(t): t.detach().to("cpu", copy=True) for t in _tensors(obj)})


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def sharded_state(parts: TrainingParts) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} as DCP saves and loads them: this rank's shards under FSDP (whole
    tensors otherwise), tied names once; the optimizer only once it has state (asking for an empty one
    would make one up)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    aliases = tied_aliases(parts.model)
    out: dict[str, Any] = {
        "model": {k: v for k, v in get_model_state_dict(parts.model).items() if k not in aliases}
    }
    if parts.optimizer.state:
        out["optimizer"] = get_optimizer_state_dict(parts.model, parts.optimizer)
    return out


# ----- restoring ----------------------------------------------------------------------------------------
def restore_training(parts: TrainingParts, ckpt: Path, optimizer_name: str) -> dict[str, Any]:
    """Load checkpoint `ckpt` (either format, written by any number of processes) into the model (sharded or
    not), optimizer, loss scaler and this rank's RNG; return its counters."""
    read_json(ckpt / "meta.json")  # the whole checkpoint must be intact, not only what resuming reads
    state = load_train_state(ckpt)
    if is_sharded(ckpt):
        _load_shards(parts, ckpt, optimizer_name, with_optimizer=state.get("optimizer_saved", True))
    else:
        set_full_weights(parts.model, load_state_dict_file(ckpt / WEIGHTS), parts.fsdp, ckpt / WEIGHTS)
        _load_full_optimizer(parts, state["optimizer"], ckpt, optimizer_name)
    parts.scaler.load_state_dict(state["scaler"])
    ranks = state.get("rng_ranks") or [state]  # older checkpoints hold rank 0's only
    if parts.runtime.rank < len(ranks):  # a rank the checkpoint has none for keeps its own (seed + rank)
        set_rng_state(ranks[parts.runtime.rank])
    return state


def _load_shards(parts: TrainingParts, ckpt: Path, optimizer_name: str, with_optimizer: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    check_shards(ckpt)
    shards = sharded_state(parts)
    if not with_optimizer:
        shards.pop("optimizer", None)
    elif "optimizer" not in shards:  # a fresh optimizer: let DCP make the state to load into
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        shards["optimizer"] = get_optimizer_state_dict(parts.model, parts.optimizer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one process reading a sharded checkpoint is what we mean
            dcp.load(shards, checkpoint_id=str(ckpt))
    except (Exception, dcp.api.CheckpointException) as exc:
        raise _load_error(exc, ckpt, optimizer_name) from None
    options = StateDictOptions(strict=False)
    set_model_state_dict(parts.model, shards["model"], options=options)
    if "optimizer" in shards:
        set_optimizer_state_dict(parts.model, parts.optimizer, shards["optimizer"], options=options)


def _load_error(exc: BaseException, ckpt: Path, optimizer_name: str) -> TinyLMError:
    text = str(exc)
    if "Missing key in checkpoint state_dict: optimizer" in text:
        return TinyLMError(
            f"The optimizer state in {ckpt} does not fit optimizer {optimizer_name!r}; "
            "resume with the optimizer the run was trained with."
        )
    if "Missing key in checkpoint state_dict: model" in text or "Size mismatch" in text:
        return TinyLMError(
            f"Checkpoint {ckpt} does not fit this model; resume with the model it was trained with."
        )
    return CorruptFile(f"Checkpoint {ckpt} is corrupt ({last_line(exc)}).")


def set_full_weights(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    fsdp: bool,
    where: Path,
    new: frozenset[str] = frozenset(),
) -> None:
    """Load whole tensors into a model, sharding them under FSDP; only tied names and `new` ones may be absent."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(
            model, state, options=StateDictOptions(full_state_dict=True, strict=False)
        )
    else:
        result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - tied_aliases(model).keys() - new
    if missing or result.unexpected_keys:
        raise TinyLMError(
            f"Checkpoint {where} does not fit this model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]})."
        )


def _load_full_optimizer(
    parts: TrainingParts, state: dict[str, Any], ckpt: Path, optimizer_name: str
) -> None:
    """Put a whole optimizer state back (sharding it under FSDP), or say it belongs to another optimizer."""
    try:
        if parts.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(
                parts.model,
                parts.optimizer,
                _by_name(state, parts.model, parts.optimizer),
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            parts.optimizer.load_state_dict(state)
    except (ValueError, KeyError, TinyLMError) as exc:
        raise TinyLMError(
            f"The optimizer state in {ckpt} does not fit optimizer {optimizer_name!r}; "
            "resume with the optimizer the run was trained with."
        ) from exc


def _by_name(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` (parameters numbered in the optimizer's order) keyed by parameter name instead,
    as FSDP's state-dict functions read it; a state keyed by name already is returned as it is."""
    groups = state.get("param_groups", [])
    if not groups or not all(isinstance(i, int) for g in groups for i in g["params"]):
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(order) != sum(len(g["params"]) for g in groups):
        raise ValueError("different number of parameters")
    numbered = [i for g in groups for i in g["params"]]
    to_name = dict(zip(numbered, order, strict=True))
    return {
        "state": {to_name[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [to_name[i] for i in g["params"]]} for g in groups],
    }


def load_start_weights(model: nn.Module, ckpt: Path, fsdp: bool, renames: dict[str, str]) -> None:
    """Load another run's checkpoint `ckpt` (either format) into a freshly built, possibly sharded and adapted
    model (e.g. a fine-tuning run's base); `renames` maps the checkpoint's names to the model's (LoRA moves
    `wq.weight` to `wq.base.weight`)."""
    if (ckpt / WEIGHTS).is_file():
        weights = {renames.get(k, k): v for k, v in load_state_dict_file(ckpt / WEIGHTS).items()}
        added = frozenset(name for name, _ in model.named_parameters()) - set(renames.values())
        set_full_weights(model, weights, fsdp, ckpt / WEIGHTS, new=added)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    check_shards(ckpt)
    current, aliases = get_model_state_dict(model), tied_aliases(model)
    wanted = {old: current[new] for old, new in renames.items() if new in current and new not in aliases}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({"model": wanted}, checkpoint_id=str(ckpt))
    except (Exception, dcp.api.CheckpointException) as exc:
        raise _load_error(exc, ckpt, "") from None
    loaded = {renames[old]: t for old, t in wanted.items()}
    set_model_state_dict(model, loaded, options=StateDictOptions(strict=False))


__all__ = ["Checkpointer", "TrainingParts", "restore_training", "load_start_weights", "STATE"]
