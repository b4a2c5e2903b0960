"""Fine-tuning a trained run on new text, prompt/response pairs or chats, optionally with LoRA: a batch
source, the base weights, an `adapt` (LoRA) and a RunRecord handed to the same training loop as `tinylm train`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinylm.chat import split_chat
from tinylm.checkpoint import (
    FinetuneParent,
    RunRecord,
    checkpoint_dir,
    load_run,
    save_checkpoint,
    save_state_dict,
)
from tinylm.config import finetune_config
from tinylm.data import (
    IGNORE,
    Batch,
    BatchSource,
    Example,
    PairBatches,
    TokenData,
    eval_batches,
    pad_batch,
    prepare,
    token_batches,
)
from tinylm.errors import TinyLMError
from tinylm.lora import LoRAConfig, apply_lora, lora_state_dict
from tinylm.model import Transformer
from tinylm.runtime import Runtime, main_process_first, teardown
from tinylm.tokenizer import Tokenizer, load_tokenizer, tokenizer_hash
from tinylm.train import TrainResult, run_training

SHORT_TEXT = "give `tinylm finetune` a longer text (its last 10% is held out for validation) or JSONL pairs"


def read_pairs(path: Path) -> list[dict[str, str]]:
    """Rows of a JSONL file as {"prompt", "response"}: given so, or rendered from {"messages": [...]} chats
    with the shared chat template (`tinylm.chat`)."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TinyLMError(f"{path} line {n} is not valid JSON.") from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            try:
                prompt, response = split_chat(row["messages"])
            except TinyLMError as exc:
                raise TinyLMError(f"{path} line {n}: {exc}") from None
            row = {"prompt": prompt, "response": response}
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("prompt"), str)
            or not isinstance(row.get("response"), str)
        ):
            raise TinyLMError(
                f'{path} line {n} needs string fields "prompt" and "response" (or a "messages" list).'
            )
        rows.append(row)
    if not rows:
        raise TinyLMError(f"{path} holds no prompt/response pairs.")
    return rows


def encode_pair(tokenizer: Tokenizer, prompt: str, response: str, block_size: int) -> Example:
    """Tokens of prompt + response (+ end-of-text); the loss covers only the response's next-token targets.
    A prompt too long for the context is cut from the left, so the response keeps its labels."""
    p, r = tokenizer.encode(prompt), tokenizer.encode(response)
    if tokenizer.eot_id is not None and tokenizer.kind != "char":
        r = r + [tokenizer.eot_id]
    keep = max(1, block_size + 1 - len(r))
    if len(p) > keep:
        p = p[-keep:]
    ids = (p + r)[: block_size + 1]
    labels = ([IGNORE] * len(p) + r)[: block_size + 1]
    return ids[:-1], labels[1:]


def pair_batches(
    path: Path, tokenizer: Tokenizer, block_size: int, cfg: Any, rank: int = 0, world_size: int = 1
) -> tuple[BatchSource, list[Batch]]:
    """Training source and validation batches from a JSONL file (the last 10% of pairs, at least one, validate;
    shared out equally among the processes when each can have one, so every process scores as many batches:
    each batch is a collective step), as many batches as eval_batches or eval_tokens."""
    examples = [encode_pair(tokenizer, r["prompt"], r["response"], block_size) for r in read_pairs(path)]
    n_val = max(1, len(examples) // 10) if len(examples) > 1 else 0
    train, val = examples[: len(examples) - n_val] or examples, examples[len(examples) - n_val :] or examples
    if len(val) >= world_size:  # the last len(val) % world_size pairs are left out
        val = val[rank : len(val) - len(val) % world_size : world_size]
    val_batches = [
        pad_batch(val[i : i + cfg.batch_size], block_size) for i in range(0, len(val), cfg.batch_size)
    ]
    source = PairBatches(train, block_size, cfg.batch_size, cfg.seed, rank, world_size, cfg.max_steps)
    return source, val_batches[: eval_batches(cfg, block_size, world_size)]


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
    """Continue training `base_run`'s weights on `data` (JSONL pairs or chats, a prepared data dir, or text)
    into a new run `out`; with `resume`, continue the fine-tuning run `out`."""
    out = Path(out)
    if resume:
        record = RunRecord.read(out)
        if record.finetune is None:
            raise TinyLMError(f"{out} is not a fine-tuning run; resume it with tinylm train --resume {out}.")
        record = record.resumed(overrides or {})
    else:
        if base_run is None or data is None:
            raise TinyLMError("Fine-tuning needs a base run directory and --data.")
        try:
            record = _new_record(Path(base_run), Path(data), out, checkpoint, lora, overrides or {})
        except BaseException:
            teardown(clean=False)  # torchrun's process group, if preparing the data joined it
            raise
    parent = record.finetune
    assert parent is not None
    tokenizer = load_tokenizer(Path(parent.base) / "tokenizer.json")
    lora = record.lora

    def adapt(model: Transformer) -> None:
        if lora is not None:
            apply_lora(model, lora)

    def batches_for(record: RunRecord, runtime: Runtime) -> tuple[BatchSource, list[Batch]]:
        block, rank, world = record.model.block_size, runtime.rank, runtime.world_size
        if record.data is None:  # JSONL pairs or chats
            return pair_batches(Path(parent.data), tokenizer, block, record.train, rank, world)
        return token_batches(TokenData(record.data), block, record.train, rank, world, SHORT_TEXT)

    result = run_training(
        record,
        out,
        tokenizer,
        batches_for,
        adapt=adapt,
        init_from=None if resume else checkpoint_dir(Path(parent.base), parent.checkpoint),
        resume_from="last" if resume else None,
        keep_global_batch="batch_size" not in (overrides or {}),
        progress=progress,
        log=log,
    )
    if lora is not None and result.rank == 0:
        save_state_dict(lora_state_dict(load_run(out).model), out / "adapter.safetensors")
    return result


def _new_record(
    base_run: Path, data: Path, out: Path, checkpoint: str, lora: LoRAConfig | None, overrides: dict[str, Any]
) -> RunRecord:
    """The record of a new fine-tuning run; plain text is tokenized into OUT/data with the base tokenizer."""
    if (out / "config.json").is_file():
        raise TinyLMError(
            f"{out} already holds a run; choose another --out, or continue it with --resume {out}."
        )
    base = RunRecord.read(base_run)
    tokenizer = load_tokenizer(base_run / "tokenizer.json")
    checkpoint_dir(base_run, checkpoint)  # fail now if the base has no such checkpoint
    if not data.exists():
        raise TinyLMError(
            f"Fine-tuning data {data} does not exist; pass a JSONL file, a text file or a data dir."
        )
    data_dir: Path | None = None
    if data.suffix == ".jsonl":
        read_pairs(data)  # fail now on a bad file
    elif (data / "meta.json").is_file():
        data_dir = data
    else:  # plain text: tokenize it with the base run's tokenizer, once (rank 0 under torchrun)
        data_dir = out / "data"
        with main_process_first() as first:
            if first:
                prepare([str(data)], data_dir, tokenizer)
    base_hash = tokenizer_hash(tokenizer)
    if data_dir is not None and TokenData(data_dir).tokenizer_hash != base_hash:
        raise TinyLMError(
            f"{data} was prepared with another tokenizer than {base_run}'s; prepare the text with the base "
            "run's tokenizer, or pass the text file itself."
        )
    parent = FinetuneParent(str(base_run.resolve()), str(data.resolve()), checkpoint)
    return RunRecord(
        base.model,
        finetune_config(base.train, overrides),
        data=str(data_dir.resolve()) if data_dir else None,
        tokenizer_hash=base_hash,
        preset=base.preset,
        finetune=parent,
        lora=lora,
        data_meta=TokenData(data_dir).meta if data_dir else {},
    )


def merge_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Fold a LoRA run's adapters into its base weights: a plain run directory at `out` (default RUN_DIR-merged)."""
    from dataclasses import replace

    from tinylm.lora import merge_lora

    run = load_run(run_dir)
    if run.record.lora is None:
        raise TinyLMError(f"{run_dir} has no LoRA adapters to merge.")
    model = merge_lora(run.model)
    out = Path(out) if out else Path(f"{Path(run_dir).as_posix().rstrip('/')}-merged")
    if (out / "config.json").is_file():
        raise TinyLMError(f"{out} already holds a run; choose another --out.")
    model_cfg = run.record.model
    if model_cfg.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight:
        # an adapter on the tied head changed the output projection only: the merged model has its own head
        model_cfg = replace(model_cfg, tie_embeddings=False)
    record = replace(run.record, model=model_cfg, lora=None, merged_from=str(Path(run_dir).resolve()))
    record.write(out, run.tokenizer)
    save_checkpoint(out, "last", model.state_dict(), None, {**run.meta, "merged": True})
    return out
