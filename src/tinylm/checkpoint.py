"""Run directories: the typed RunRecord (config.json), metrics and their sinks, and crash-safe checkpoints.

RUN_DIR/
  config.json                    the RunRecord: model and training config, data, provenance
  tokenizer.json                 so the run is self-contained
  metrics.jsonl                  one JSON row per log / eval / epoch
  checkpoints/NAME/              NAME = last, best, step_000100, epoch_1, ...
      model.safetensors          weights (tied tensors stored once)           } one process or DDP
      state.pt                   optimizer, step, data position, RNG states   }
      .metadata, __R_0.distcp    weights and optimizer, each rank's shards    } FSDP: PyTorch's distributed
      state.pt                   step, data position, every rank's RNG        } checkpoint (DCP)
      meta.json                  step, epoch, losses, world size
Every checkpoint is written to a temporary directory, fsynced, and renamed into place, so a crash (even
SIGKILL or a power cut) leaves the old or the new checkpoint, never a half-written one. What a checkpoint
holds does not grow with the run's length: the loss histories live in metrics.jsonl. Files and
directories follow the user's umask.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tinylm.config import ModelConfig, TrainConfig, from_dict, to_dict
from tinylm.errors import TinyLMError
from tinylm.model import Transformer, on_meta
from tinylm.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from tinylm.lora import LoRAConfig

WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SHARDED = ".metadata"  # DCP's index of a sharded checkpoint's files; its presence marks the format


class CorruptFile(TinyLMError):
    """A run file that exists but cannot be read back (truncated, garbage, wrong format)."""


# ----- files that survive crashes and follow the umask ------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(path: Path, mode: int) -> None:
    """Give `path` the permissions the user's umask asks for, and flush it."""
    os.chmod(path, mode & ~_umask())
    _fsync(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a fsynced temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    _publish(tmp, 0o666)
    os.replace(tmp, path)
    _fsync(path.parent)


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without later names of a tensor already present (tied weights are stored once)."""
    seen: set[tuple] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def save_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save tensors to safetensors, keeping one copy of tensors that share storage (tied weights)."""
    out = {name: t.detach().contiguous().cpu() for name, t in unique_tensors(state).items()}
    save_file(out, str(path), metadata={"format": "pt"})
    _publish(path, 0o666)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFile(f"{path} is corrupt or unreadable ({exc}); use another checkpoint.") from None


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into model; only tied tensors may be absent from the file."""
    state = load_state_dict_file(path)
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - tied_aliases(model).keys()
    if missing or result.unexpected_keys:
        raise TinyLMError(
            f"Checkpoint {path} does not fit this model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]})."
        )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or one sentence naming the corrupt file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        raise CorruptFile(f"{path} is corrupt (not a JSON object); restore it or use another checkpoint.")
    return value


def load_train_state(ckpt: Path) -> dict[str, Any]:
    """The training state (state.pt) of a checkpoint directory, or one sentence naming the file."""
    path = ckpt / STATE
    if not path.is_file():
        raise TinyLMError(
            f"Checkpoint {ckpt} has no training state, so it cannot be resumed; fine-tune from it instead."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, pickle errors: all mean "corrupt"
        raise CorruptFile(f"{path} is corrupt ({type(exc).__name__}); use another checkpoint.") from None


# ----- checkpoints ----------------------------------------------------------------------------
def is_sharded(ckpt: Path) -> bool:
    """Whether checkpoint directory `ckpt` was written by DCP (each rank its shards)."""
    return (Path(ckpt) / SHARDED).is_file()


def is_checkpoint(path: Path) -> bool:
    """Whether `path` holds model weights in either format."""
    return (Path(path) / WEIGHTS).is_file() or is_sharded(path)


def temp_checkpoint_dir(run_dir: Path, name: str) -> Path:
    """A new temporary directory next to the checkpoints, where checkpoint NAME is written before `install`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.tmp.", dir=root))


def install(tmp: Path, name: str) -> Path:
    """Make the fully written temporary directory `tmp` checkpoint NAME: flush it, then swap it in (the old
    one aside, the new one in, the old one removed), so a crash at any moment leaves the old or the new."""
    root = tmp.parent
    _publish(tmp, 0o777)  # mkdtemp makes 0700
    final, old = root / name, root / f".{name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)  # from here until the next rename, .NAME.old is the checkpoint
    tmp.rename(final)
    _fsync(root)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_state_and_meta(tmp: Path, train_state: dict[str, Any] | None, meta: dict[str, Any]) -> None:
    if train_state is not None:
        torch.save(train_state, tmp / STATE)
        _publish(tmp / STATE, 0o666)
    (tmp / META).write_text(json.dumps(meta, indent=2))
    _publish(tmp / META, 0o666)


def save_checkpoint(
    run_dir: Path,
    name: str,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any] | None,
    meta: dict[str, Any],
) -> Path:
    """Write checkpoints/NAME (single-file weights) atomically and durably, and return its path."""
    tmp = temp_checkpoint_dir(run_dir, name)
    try:
        save_state_dict(model_state, tmp / WEIGHTS)
        _write_state_and_meta(tmp, train_state, meta)
        return install(tmp, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finish_sharded_checkpoint(
    tmp: Path, name: str, train_state: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Rank 0, once every rank's shards are in `tmp`: add state.pt and meta.json, and install it as NAME."""
    try:
        _write_state_and_meta(tmp, train_state, meta)
        return install(tmp, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_checkpoints(run_dir: Path) -> None:
    """After a crash: drop half-written temporary checkpoints, and put back a `.NAME.old` whose swap
    was cut short."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for path in root.glob(".*.tmp.*"):
        shutil.rmtree(path, ignore_errors=True)
    for old in root.glob(".*.old"):
        final = root / old.name[1 : -len(".old")]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)
    _fsync(root)


def checkpoint_dir(run_dir: Path, name: str = "last") -> Path:
    """The directory of checkpoint NAME, falling back to the previous copy if a swap was interrupted."""
    root = Path(run_dir) / "checkpoints"
    for candidate in (root / name, root / f".{name}.old"):
        if is_checkpoint(candidate):
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


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why checkpoint directory `ckpt` cannot be resumed from (one sentence), or None if it can."""
    try:
        read_json(ckpt / META)
        if is_sharded(ckpt):
            check_shards(ckpt)
        else:
            load_state_dict_file(ckpt / WEIGHTS)
        load_train_state(ckpt)
    except TinyLMError as exc:
        return str(exc)
    return None


def newest_good_checkpoint(run_dir: Path, exclude: str = "") -> tuple[str, int] | None:
    """(name, step) of the newest resumable checkpoint other than `exclude`, if any."""
    found = []
    for path in list_checkpoints(run_dir, ""):
        if path.name != exclude and (path / META).is_file() and checkpoint_problem(path) is None:
            found.append((read_json(path / META).get("step", 0), path.name))
    return (max(found)[1], max(found)[0]) if found else None


def list_checkpoints(run_dir: Path, prefix: str) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{prefix}*") if p.is_dir() and not p.name.startswith("."))


def prune_checkpoints(run_dir: Path, prefix: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints whose names start with prefix."""
    found = sorted(list_checkpoints(run_dir, prefix), key=lambda p: read_json(p / META).get("step", 0))
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


# ----- sharded (DCP) checkpoints, read in one process -------------------------------------------
def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{name: earlier name} for each parameter name that is another name of an earlier one (a tied head)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def check_shards(ckpt: Path) -> None:
    """Raise CorruptFile naming the first file of sharded checkpoint `ckpt` that is unreadable or too short."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(ckpt)).read_metadata()
    except Exception as exc:  # truncated or garbage pickle
        raise CorruptFile(
            f"{ckpt / SHARDED} is corrupt ({type(exc).__name__}); use another checkpoint."
        ) from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = ckpt / name
        if not path.is_file() or path.stat().st_size < size:
            raise CorruptFile(f"{path} is missing or cut short; use another checkpoint.")


def load_sharded_weights(model: nn.Module, ckpt: Path) -> None:
    """Load the weights of sharded checkpoint `ckpt` into a whole model in this process alone (its optimizer
    state is not read)."""
    import torch.distributed.checkpoint as dcp

    check_shards(ckpt)
    aliases = tied_aliases(model)
    state = {"model": {k: v for k, v in model.state_dict().items() if k not in aliases}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
            dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    except (Exception, dcp.api.CheckpointException) as exc:
        raise CorruptFile(
            f"Checkpoint {ckpt} does not fit this model or is corrupt ({last_line(exc)}); use another checkpoint."
        ) from None
    model.load_state_dict(state["model"], strict=False)


def last_line(exc: BaseException) -> str:
    """The last non-blank line of an exception's message (200 characters at most), else its type's name."""
    text = str(exc).strip().splitlines()
    return text[-1][:200] if text else type(exc).__name__


def load_checkpoint_weights(model: nn.Module, ckpt: Path) -> None:
    """Load checkpoint `ckpt`'s weights into a whole model: its model.safetensors (also what `consolidate`
    writes into a sharded checkpoint) or else its shards."""
    if (ckpt / WEIGHTS).is_file():
        load_weights(model, ckpt / WEIGHTS)
    else:
        load_sharded_weights(model, ckpt)


def consolidate(run_dir: str | Path, checkpoint: str = "last", out: str | Path | None = None) -> Path:
    """Write sharded checkpoint CHECKPOINT of a run as one model.safetensors (in the checkpoint's own
    directory by default), the file generate, export and serve load directly; returns its path."""
    run_dir = Path(run_dir)
    record = RunRecord.read(run_dir)
    ckpt = checkpoint_dir(run_dir, checkpoint)
    target = Path(out) if out else ckpt / WEIGHTS
    if not is_sharded(ckpt):
        raise TinyLMError(f"Checkpoint {ckpt} is not sharded; its {WEIGHTS} is already the single file.")
    if target.exists():
        raise TinyLMError(f"{target} already exists; remove it or choose another --out.")
    model = build_model(record)
    load_sharded_weights(model, ckpt)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(model.state_dict(), tmp)
        os.replace(tmp, target)
        _fsync(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise TinyLMError(f"Cannot write {target} ({exc.strerror or exc}); choose another --out.") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


# ----- the run record -------------------------------------------------------------------------
@dataclass
class FinetuneParent:
    """Where a fine-tuning run came from."""

    base: str  # the base run directory
    data: str  # the fine-tuning data as given (JSONL, text or prepared directory)
    checkpoint: str = "last"  # the base run's checkpoint it started from


@dataclass
class RunRecord:
    """Everything config.json says about a run: what it is, what it trained on, where it came from."""

    model: ModelConfig
    train: TrainConfig
    data: str | None = None  # prepared data directory (None: JSONL pairs, imported or merged runs)
    tokenizer_hash: str | None = None  # `data.tokenizer_hash` of the tokenizer the data was prepared with
    preset: str | None = None
    finetune: FinetuneParent | None = None
    lora: LoRAConfig | None = None  # adapters are part of this run's weights
    imported_from: str | None = None  # a Hugging Face model directory
    merged_from: str | None = None  # the LoRA run whose adapters were folded in
    data_meta: dict[str, Any] = field(default_factory=dict)  # the data directory's meta.json

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"], out["train"] = to_dict(self.model), to_dict(self.train)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RunRecord:
        """Read config.json, written by this version or an older one (same keys, some absent)."""
        lora = None
        if raw.get("lora"):
            from tinylm.lora import LoRAConfig

            lora = LoRAConfig(**{**raw["lora"], "targets": tuple(raw["lora"].get("targets", ()))})
        parent = raw.get("finetune")
        return cls(
            model=from_dict(ModelConfig, raw["model"]),
            train=from_dict(TrainConfig, raw["train"]),
            data=raw.get("data"),
            tokenizer_hash=raw.get("tokenizer_hash"),
            preset=raw.get("preset"),
            finetune=FinetuneParent(**parent) if parent else None,
            lora=lora,
            imported_from=raw.get("imported_from"),
            merged_from=raw.get("merged_from"),
            data_meta=raw.get("data_meta") or {},
        )

    def write(self, run_dir: Path, tokenizer: Tokenizer) -> None:
        """config.json and tokenizer.json: what a run directory needs besides weights."""
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG, json.dumps(self.to_json(), indent=2))
        tokenizer.save(run_dir / "tokenizer.json")

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord:
        path = Path(run_dir) / CONFIG
        if not path.is_file():
            raise TinyLMError(
                f"{run_dir} is not a tinylm run directory (no config.json); pass the --out of `tinylm train`."
            )
        raw = read_json(path)
        try:
            return cls.from_json(raw)
        except (KeyError, TypeError) as exc:
            raise TinyLMError(f"{path} is corrupt (missing or wrong field {exc}).") from None

    def resume_command(self, run_dir: Path) -> str:
        """The command that continues this run."""
        return f"tinylm {'finetune' if self.finetune else 'train'} --resume {run_dir}"

    def resumed(self, overrides: dict[str, Any]) -> RunRecord:
        """This record with training fields overridden for a resumed session; the model cannot change."""
        model = to_dict(self.model)
        changed = sorted(k for k, v in overrides.items() if k in model and model[k] != v)
        if changed:
            raise TinyLMError(
                f"Cannot resume with a different model config ({', '.join(changed)}); start a new run instead."
            )
        train = {k: v for k, v in overrides.items() if k not in model}
        return replace(self, train=from_dict(TrainConfig, {**to_dict(self.train), **train}))


# ----- the run directory while training -------------------------------------------------------
Sink = Callable[[dict[str, Any]], None]


class RunLog:
    """metrics.jsonl plus the optional TensorBoard / Weights & Biases sinks of one run (rank 0 only)."""

    def __init__(self, run_dir: Path, record: RunRecord, enabled: bool = True) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.sinks = make_sinks(self.run_dir, record) if enabled else []

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps({**row, "time": time.time()}) + "\n")
        for sink in self.sinks:
            sink(row)

    def truncate(self, step: int) -> list[dict[str, Any]]:
        """Drop rows written after the checkpoint we resume from; return the rows kept (none on other ranks)."""
        path = self.run_dir / METRICS
        if not (self.enabled and path.is_file()):
            return []
        lines, rows = [], []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line) if line else None
            except json.JSONDecodeError:  # a row cut short by a crash
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                lines.append(line)
                rows.append(row)
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        return rows


def make_sinks(run_dir: Path, record: RunRecord) -> list[Sink]:
    """Optional TensorBoard / Weights & Biases loggers."""
    sinks: list[Sink] = []

    def numeric(row: dict[str, Any]) -> dict[str, float]:
        return {
            f"{row['type']}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"
        }

    if record.train.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TinyLMError(
                "--tensorboard needs the tensorboard package: pip install tensorboard."
            ) from None
        writer = SummaryWriter(str(run_dir / "tensorboard"))

        def to_tensorboard(row: dict[str, Any]) -> None:
            for k, v in numeric(row).items():
                writer.add_scalar(k, v, row["step"])
            writer.flush()

        sinks.append(to_tensorboard)
    if record.train.wandb:
        try:
            import wandb
        except ImportError:
            raise TinyLMError("--wandb needs the wandb package: pip install wandb.") from None
        wandb.init(project="tinylm", name=run_dir.name, config=record.to_json())
        sinks.append(lambda row: wandb.log(numeric(row), step=row["step"]))
    return sinks


def check_run_dir(run_dir: Path, n_params: int) -> None:
    """Fail before training, not at the first checkpoint, when the run directory cannot hold one."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TinyLMError(
            f"Cannot write to the run directory {run_dir} ({exc.strerror}); choose another --out."
        ) from None
    needed = n_params * 4 * 3 * 3  # weights + two Adam moments, for last/best/one more
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise TinyLMError(
            f"Only {free / 1e6:.0f} MB free at {run_dir}; checkpoints need about {needed / 1e6:.0f} MB."
        )


# ----- loading a run --------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A model ready to use, with its tokenizer and record."""

    model: Transformer
    tokenizer: Tokenizer
    record: RunRecord
    meta: dict[str, Any]
    path: Path

    @property
    def model_cfg(self) -> ModelConfig:
        return self.record.model

    @property
    def train_cfg(self) -> TrainConfig:
        return self.record.train


def build_model(record: RunRecord) -> Transformer:
    """The run's model architecture, with LoRA adapters when its weights include them, in uninitialised CPU
    memory: every weight is then loaded (strictly), so no time goes into drawing an init to throw away."""
    with on_meta():
        model = Transformer(record.model)
        if record.lora is not None:
            from tinylm.lora import apply_lora

            apply_lora(model, record.lora)
    materialise(model, torch.device("cpu"), tied_aliases(model))
    return model


def materialise(
    model: Transformer, device: torch.device, ties: dict[str, str], *, sharded: bool = False
) -> None:
    """Give a model built on the meta device (uninitialised) memory on `device`, its tied parameters (`ties`,
    from tied_aliases before any sharding) tied again and its non-persistent buffers computed."""
    if sharded:  # FSDP's DTensors: each rank allocates its shards only
        model.to_empty(device=device)
    else:  # torch.empty, not to_empty's empty_like: on meta that runs Python reference code (see on_meta)
        model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    for alias, name in ties.items():  # to_empty gives each name its own tensor: tie them again
        path, _, attr = alias.rpartition(".")
        if model.get_parameter(alias) is not model.get_parameter(name):
            setattr(model.get_submodule(path), attr, model.get_parameter(name))
    model.reset_buffers()


def load_run(run_dir: str | Path, checkpoint: str = "last", device: str | torch.device = "cpu") -> LoadedRun:
    """Load a run directory's model (in eval mode), tokenizer and record."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a run directory" if run_dir.exists() else "does not exist"
        raise TinyLMError(f"Run directory {run_dir} {what}.")
    record = RunRecord.read(run_dir)
    ckpt = checkpoint_dir(run_dir, checkpoint)
    model = build_model(record)
    load_checkpoint_weights(model, ckpt)
    meta = read_json(ckpt / META) if (ckpt / META).is_file() else {}
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    return LoadedRun(model.to(device).eval(), tokenizer, record, meta, run_dir)
