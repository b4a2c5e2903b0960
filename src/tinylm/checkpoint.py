"""Run directories: JSON config + tokenizer, and checkpoints of safetensors weights + training state.

RUN_DIR/
  config.json                    model and training config, data directory
  tokenizer.json                 so the run is self-contained
  metrics.jsonl                  one JSON row per log / eval / epoch
  checkpoints/NAME/              NAME = last, best, step_000100, epoch_1, ...
      model.safetensors          weights (tied tensors stored once)
      state.pt                   optimizer, step, epoch, sampler position, RNG states
      meta.json                  step, epoch, losses
Every checkpoint is written to a temporary directory and renamed into place, so a crash leaves
either the old or the new checkpoint, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinylm.config import ModelConfig, TrainConfig, from_dict, to_dict
from tinylm.errors import TinyLMError
from tinylm.model import Transformer
from tinylm.tokenizer import Tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary file and rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save tensors to safetensors, keeping one copy of tensors that share storage (tied weights)."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    save_file(out, str(path), metadata={"format": "pt"})


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise TinyLMError(
            f"Checkpoint weights {path} are corrupt or unreadable ({exc}); use another checkpoint."
        ) from None


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into model; only tied tensors may be absent from the file."""
    state = load_state_dict_file(path)
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings", False) else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise TinyLMError(
            f"Checkpoint {path} does not fit this model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]})."
        )


def save_checkpoint(
    run_dir: Path,
    name: str,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any] | None,
    meta: dict[str, Any],
) -> Path:
    """Write checkpoints/NAME atomically and return its path."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        save_state_dict(model_state, tmp / WEIGHTS)
        if train_state is not None:
            torch.save(train_state, tmp / STATE)
        (tmp / META).write_text(json.dumps(meta, indent=2))
        final, old = root / name, root / f".{name}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def checkpoint_dir(run_dir: Path, name: str = "last") -> Path:
    """The directory of checkpoint NAME, falling back to the previous copy if a swap was interrupted."""
    root = Path(run_dir) / "checkpoints"
    for candidate in (root / name, root / f".{name}.old"):
        if (candidate / WEIGHTS).is_file():
            return candidate
    available = sorted(p.name for p in root.glob("*") if not p.name.startswith(".")) if root.is_dir() else []
    raise TinyLMError(
        f"{run_dir} has no checkpoint {name!r}"
        + (
            f"; available: {', '.join(available)}."
            if available
            else "; train it first (tinylm train ... --out RUN_DIR)."
        )
    )


def list_checkpoints(run_dir: Path, prefix: str) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob(f"{prefix}*") if p.is_dir()) if root.is_dir() else []


def prune_checkpoints(run_dir: Path, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints whose names start with prefix."""
    found = sorted(
        list_checkpoints(run_dir, prefix), key=lambda p: json.loads((p / META).read_text()).get("step", 0)
    )
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def write_run_config(
    run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, tokenizer: Tokenizer, extra: dict[str, Any]
) -> None:
    """config.json and tokenizer.json: what a run directory needs besides weights."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"model": to_dict(model_cfg), "train": to_dict(train_cfg), **extra}
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2))
    tokenizer.save(run_dir / "tokenizer.json")


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise TinyLMError(
            f"{run_dir} is not a tinylm run directory (no config.json); pass the --out of `tinylm train`."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise TinyLMError(f"{path} is corrupt (invalid JSON).") from None


@dataclass
class LoadedRun:
    """A model ready to use, with its tokenizer and configs."""

    model: Transformer
    tokenizer: Tokenizer
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    config: dict[str, Any]
    meta: dict[str, Any]
    path: Path


def load_run(run_dir: str | Path, checkpoint: str = "last", device: str | torch.device = "cpu") -> LoadedRun:
    """Load a run directory's model (in eval mode), tokenizer and configs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TinyLMError(f"Run directory {run_dir} does not exist.")
    config = read_run_config(run_dir)
    model_cfg = from_dict(ModelConfig, config["model"])
    train_cfg = from_dict(TrainConfig, config["train"])
    ckpt = checkpoint_dir(run_dir, checkpoint)
    model = Transformer(model_cfg)
    if config.get("lora"):  # adapters are part of this run's weights
        from tinylm.lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig(**config["lora"]))
    load_weights(model, ckpt / WEIGHTS)
    meta = json.loads((ckpt / META).read_text()) if (ckpt / META).is_file() else {}
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    return LoadedRun(model.to(device).eval(), tokenizer, model_cfg, train_cfg, config, meta, run_dir)
