"""Fine-tuning a trained run on new text or prompt/response pairs, optionally with LoRA, through the same Trainer."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinylm.checkpoint import WEIGHTS, checkpoint_dir, load_weights, read_run_config, save_state_dict
from tinylm.config import ModelConfig, TrainConfig, from_dict
from tinylm.data import TokenData, prepare
from tinylm.errors import TinyLMError
from tinylm.evaluate import IGNORE
from tinylm.lora import LoRAConfig, apply_lora, lora_state_dict, trainable_parameters
from tinylm.model import Transformer
from tinylm.tokenizer import Tokenizer, load_tokenizer
from tinylm.train import Batches, Trainer, TrainResult

Example = tuple[list[int], list[int]]  # (input ids, labels with IGNORE on prompt tokens)


def read_pairs(path: Path) -> list[dict[str, str]]:
    """Rows of a JSONL file, each with string "prompt" and "response"."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TinyLMError(f"{path} line {n} is not valid JSON.") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("prompt"), str)
            or not isinstance(row.get("response"), str)
        ):
            raise TinyLMError(f'{path} line {n} needs string fields "prompt" and "response".')
        rows.append(row)
    if not rows:
        raise TinyLMError(f"{path} holds no prompt/response pairs.")
    return rows


def encode_pair(tokenizer: Tokenizer, prompt: str, response: str, block_size: int) -> Example:
    """Tokens of prompt + response (+ end-of-text); the loss covers only the response's next-token targets."""
    p, r = tokenizer.encode(prompt), tokenizer.encode(response)
    if tokenizer.eot_id is not None and tokenizer.kind != "char":
        r = r + [tokenizer.eot_id]
    ids = (p + r)[: block_size + 1]
    labels = ([IGNORE] * len(p) + r)[: block_size + 1]
    return ids[:-1], labels[1:]


def pad_batch(examples: list[Example], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(len(examples), block_size, dtype=torch.long)
    y = torch.full((len(examples), block_size), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(labels)] = torch.tensor(labels)
    return x, y


class PairBatches:
    """Random prompt/response examples per step, a pure function of (seed, step): resumable like RandomWindows."""

    def __init__(self, examples: list[Example], block_size: int, batch_size: int, seed: int) -> None:
        self.examples, self.block_size, self.batch_size, self.seed = examples, block_size, batch_size, seed

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        picks = np.random.default_rng([self.seed, step, micro]).integers(
            0, len(self.examples), self.batch_size
        )
        return pad_batch([self.examples[i] for i in picks], self.block_size)


def pair_batches(path: Path, tokenizer: Tokenizer, model_cfg: ModelConfig, cfg: TrainConfig) -> Batches:
    """Training and validation batches from a JSONL file (the last 10% of pairs, at least one, validate)."""
    examples = [
        encode_pair(tokenizer, r["prompt"], r["response"], model_cfg.block_size) for r in read_pairs(path)
    ]
    n_val = max(1, len(examples) // 10) if len(examples) > 1 else 0
    train, val = examples[: len(examples) - n_val] or examples, examples[len(examples) - n_val :] or examples
    val_batches = [
        pad_batch(val[i : i + cfg.batch_size], model_cfg.block_size)
        for i in range(0, len(val), cfg.batch_size)
    ]
    return Batches(
        PairBatches(train, model_cfg.block_size, cfg.batch_size, cfg.seed), val_batches[: cfg.eval_batches]
    )


def finetune(
    base_run: str | Path | None,
    data: str | Path | None,
    out: str | Path,
    *,
    lora: LoRAConfig | None = None,
    overrides: dict[str, Any] | None = None,
    checkpoint: str = "last",
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Continue training `base_run`'s weights on `data` (JSONL pairs, a prepared data dir, or text) into `out`."""
    out = Path(out)
    if resume:
        config = read_run_config(out)
        if "finetune" not in config:
            raise TinyLMError(f"{out} is not a fine-tuning run; resume it with tinylm train --resume {out}.")
        spec = config["finetune"]
        base_run, data, checkpoint = spec["base"], spec["data"], spec["checkpoint"]
        lora = LoRAConfig(**config["lora"]) if config.get("lora") else None
        overrides = {**config["train"], **(overrides or {})}
    if base_run is None or data is None:
        raise TinyLMError("Fine-tuning needs a base run directory and --data.")
    base_cfg = read_run_config(Path(base_run))
    model_cfg = from_dict(ModelConfig, base_cfg["model"])
    tokenizer = load_tokenizer(Path(base_run) / "tokenizer.json")
    train_values = {
        **base_cfg["train"],
        "warmup_steps": 20,
        "max_steps": 200,
        "epochs": 0,
        "lr": base_cfg["train"]["lr"] / 3,
    }
    cfg = from_dict(TrainConfig, {**train_values, **(overrides or {})})
    base_weights = checkpoint_dir(Path(base_run), checkpoint) / WEIGHTS
    data = Path(data)
    batches, token_data = None, None
    if data.suffix == ".jsonl":
        batches = pair_batches(data, tokenizer, model_cfg, cfg)
    elif (data / "meta.json").is_file():
        token_data = TokenData(data)
        if token_data.tokenizer.vocab_size != tokenizer.vocab_size:
            raise TinyLMError(
                f"{data} was prepared with another tokenizer; prepare the text with the base run's tokenizer."
            )
    else:  # plain text: tokenize it with the base run's tokenizer
        prepare([str(data)], out / "data", tokenizer)
        token_data = TokenData(out / "data")

    def model_init(model: Transformer) -> None:
        load_weights(model, base_weights)
        if lora is not None:
            apply_lora(model, lora)

    extra = {
        "data": str((token_data.path if token_data else data).resolve()),
        "finetune": {
            "base": str(Path(base_run).resolve()),
            "data": str(data.resolve()),
            "checkpoint": checkpoint,
        },
        "lora": asdict(lora) if lora else None,
    }
    shim = token_data or _PairsData(tokenizer, data)
    trainer = Trainer(model_cfg, cfg, shim, out, progress, log, extra, model_init=model_init, batches=batches)
    trainable, total = trainable_parameters(trainer.model)
    trainer.log(f"Fine-tuning {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    if resume:
        trainer.restore("last")
    result = trainer.train()
    if lora is not None and trainer.rt.is_main:
        save_state_dict(lora_state_dict(trainer.model), out / "adapter.safetensors")
    return result


class _PairsData:
    """What the Trainer reads from a data source when the batches come from JSONL pairs."""

    def __init__(self, tokenizer: Tokenizer, path: Path) -> None:
        self.tokenizer, self.path, self.meta = tokenizer, path, {"source": str(path), "format": "jsonl pairs"}


def merge_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Fold a LoRA run's adapters into its base weights: a plain run directory at `out` (default RUN_DIR-merged)."""
    from tinylm.checkpoint import load_run, save_checkpoint, write_run_config
    from tinylm.lora import merge_lora

    run = load_run(run_dir)
    if not run.config.get("lora"):
        raise TinyLMError(f"{run_dir} has no LoRA adapters to merge.")
    model = merge_lora(run.model)
    out = Path(out) if out else Path(f"{Path(run_dir).as_posix().rstrip('/')}-merged")
    extra = {k: v for k, v in run.config.items() if k not in ("model", "train", "lora")}
    write_run_config(
        out,
        run.model_cfg,
        run.train_cfg,
        run.tokenizer,
        {**extra, "merged_from": str(Path(run_dir).resolve())},
    )
    save_checkpoint(out, "last", model.state_dict(), None, {**run.meta, "merged": True})
    return out
