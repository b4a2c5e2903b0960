"""Data and training commands: prepare, train, consolidate, eval, info, plot, finetune, merge."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tinylm.cli.common import add_device, describe_model, overrides_from, report
from tinylm.config import DEFAULT_PRESET
from tinylm.errors import TinyLMError

PRESET_DEFAULT = "(default: the preset's)"


def add_prepare(sub: argparse._SubParsersAction) -> None:
    """`tinylm prepare`."""
    from tinylm.config import PrepareConfig

    d = PrepareConfig()
    p = sub.add_parser(
        "prepare", help="tokenize text into train/val token shards (streamed: any corpus size)"
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text file, .jsonl or .parquet file (each may be .gz/.zst compressed), a folder of them, a glob "
        "(quoted), a built-in name (shakespeare) or hf:NAME[:CONFIG] (a Hugging Face dataset, streamed)",
    )
    p.add_argument(
        "--tokenizer",
        choices=("char", "bpe", "gpt2"),
        default=d.tokenizer,
        help=f"tokenizer kind (default {d.tokenizer})",
    )
    p.add_argument("--vocab-size", type=int, default=0, help=f"BPE vocabulary size (default {d.vocab_size})")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help=f"held out for validation (default {d.val_fraction}): whole documents (1 in every 10), the "
        "last part of a single text file, or a Hugging Face dataset's own validation split",
    )
    p.add_argument(
        "--text-field",
        default=d.text_field,
        help=f"field of JSONL / Parquet / Hugging Face rows holding the text (default {d.text_field})",
    )
    p.add_argument(
        "--tokenizer-sample",
        type=int,
        default=d.tokenizer_sample,
        help=f"characters of training text the BPE learns from, the first ones (default {d.tokenizer_sample:,})",
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=d.shard_tokens,
        help=f"tokens per shard file (default {d.shard_tokens:,})",
    )
    p.add_argument("--out", required=True, help="output data directory (created when complete)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace data already prepared in --out from other inputs or options",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.data import prepare

    meta = prepare(
        args.inputs,
        args.out,
        args.tokenizer,
        args.vocab_size,
        args.val_fraction,
        text_field=args.text_field,
        tokenizer_sample=args.tokenizer_sample,
        shard_tokens=args.shard_tokens,
        force=args.force,
        progress=not args.no_progress,
    )
    if meta.get("reused"):
        print(f"{args.out} already holds these inputs prepared with these options; nothing to do.")
    for entry in meta.get("inputs", []):
        files = f"{entry['files']:,} file(s), " if entry["files"] > 1 else ""
        print(
            f"Read {entry['input']}: {files}{entry['documents']:,} document(s), {entry['bytes']:,} bytes of text"
        )
    if "tokenizer_sample" in meta:
        sample = meta["tokenizer_sample"]
        print(
            f"Trained the tokenizer on {sample['chars']:,} characters ({sample['what']}; budget {sample['budget_chars']:,})"
        )
    print(f"Split: {meta['split']}")
    shards = {s: len(meta["shards"][s]) for s in ("train", "val")} if "shards" in meta else {}
    print(
        f"Wrote {meta['train_tokens']:,} train tokens ({meta.get('train_documents', 0):,} documents, "
        f"{shards.get('train', 1)} shard(s)) and {meta['val_tokens']:,} val tokens ({meta.get('val_documents', 0):,} "
        f"documents) ({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}) to {args.out}"
    )
    return {"out": args.out, **meta}


def add_train(sub: argparse._SubParsersAction) -> None:
    """`tinylm train`."""
    from tinylm.config import PRESETS

    p = sub.add_parser("train", help="train a model (or --resume a run)")
    p.add_argument("--data", help="prepared data directory (tinylm prepare --out)")
    p.add_argument(
        "--preset",
        help=f"model and training recipe: {', '.join(PRESETS)} (default {DEFAULT_PRESET}, a test-sized model; "
        "`tinylm info` lists them)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set n_layer=4 (repeatable)",
    )
    p.add_argument("--max-steps", type=int, help=f"optimizer steps over random windows {PRESET_DEFAULT}")
    p.add_argument(
        "--epochs",
        type=int,
        help=f"passes over the sliding-window dataset, instead of --max-steps {PRESET_DEFAULT}",
    )
    p.add_argument("--batch-size", type=int, help=f"sequences per micro-batch {PRESET_DEFAULT}")
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step {PRESET_DEFAULT}")
    p.add_argument("--lr", type=float, help=f"peak learning rate {PRESET_DEFAULT}")
    p.add_argument(
        "--optimizer",
        help="adamw, or muon (Muon on the blocks' matrices, AdamW on the rest; lr for Muon: --set muon_lr=) "
        + PRESET_DEFAULT,
    )
    p.add_argument("--eval-interval", type=int, help=f"steps between validation estimates {PRESET_DEFAULT}")
    add_device(p)
    p.add_argument("--dtype", help="auto, fp32, bf16 or fp16 (default auto: bf16/fp16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, help=f"random seed {PRESET_DEFAULT}")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="with torchrun: shard the model, optimizer and checkpoints with FSDP2 and DCP instead of DDP",
    )
    p.add_argument(
        "--async-save",
        action="store_true",
        help="write checkpoints in the background while training continues",
    )
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (RUN_DIR/tensorboard)")
    p.add_argument(
        "--wandb", action="store_true", help="also log to Weights & Biases (needs wandb installed)"
    )
    p.add_argument("--out", default="runs/run", help="run directory (default runs/run)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument(
        "--checkpoint", default="last", help="with --resume: the checkpoint to continue from (default last)"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        help="stop (resumably) after this many steps in this session (default: run to the end)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.train import train

    overrides = overrides_from(
        args,
        (
            "max_steps",
            "epochs",
            "batch_size",
            "lr",
            "device",
            "seed",
            "dtype",
            "grad_accum",
            "eval_interval",
            "optimizer",
        ),
    )
    if args.epochs:
        overrides.setdefault("max_steps", 0)
    if args.max_steps:
        overrides.setdefault("epochs", 0)
    for flag in ("compile", "grad_checkpointing", "fsdp", "async_save", "tensorboard", "wandb"):
        if getattr(args, flag):
            overrides[flag] = True
    preset = args.preset or DEFAULT_PRESET
    from tinylm.runtime import launch_rank

    if launch_rank() == 0:  # under torchrun, rank 0 speaks for the run
        print(_preset_line(args, preset, overrides))
    result = train(
        args.data,
        args.resume or args.out,
        preset,
        overrides,
        resume=bool(args.resume),
        checkpoint=args.checkpoint,
        stop_after=args.stop_after,
        progress=not args.no_progress,
    )
    summary = report(args, result, "Trained")
    return {**summary, "preset": preset} if summary else summary


def _preset_line(args: argparse.Namespace, preset: str, overrides: dict[str, Any]) -> str:
    """What `train` is about to do: the preset by name (and whether it is the default), or the resumed run's."""
    from tinylm.checkpoint import RunRecord
    from tinylm.config import build_configs

    if args.resume:
        record = RunRecord.read(Path(args.resume))
        return f"Resuming {args.resume} (preset {record.preset}: {describe_model(record.model)})"
    model_cfg, _ = build_configs(preset, overrides)
    default = (
        " (the default, a test-sized model; choose a recipe with --preset, e.g. cpu-llama; `tinylm info` lists them)"
        if args.preset is None
        else ""
    )
    return f"Preset {preset}{default}: {describe_model(model_cfg)}"


def add_eval(sub: argparse._SubParsersAction) -> None:
    """`tinylm eval`."""
    p = sub.add_parser("eval", help="loss, perplexity and bits per char/byte on held-out text")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--data", help="prepared data directory (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=("val", "train"), help="split of --data (default val)")
    p.add_argument("--text", help="evaluate this text file instead (default: the --data split)")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: non-overlapping windows)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per batch (default 16)")
    p.add_argument(
        "--max-tokens", type=int, help="score at most this many tokens, the first ones (default: all of them)"
    )
    add_device(p)
    p.add_argument("--checkpoint", default="last", help="checkpoint name (default last)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from tinylm.checkpoint import load_run
    from tinylm.data import TokenData, read_text_file
    from tinylm.evaluate import evaluate_tokens
    from tinylm.runtime import resolve_device
    from tinylm.tokenizer import tokenizer_hash

    if args.max_tokens is not None and args.max_tokens < 1:
        raise TinyLMError(f"--max-tokens must be at least 1, not {args.max_tokens}.")
    run = load_run(args.run_dir, args.checkpoint, resolve_device(args.device))
    if args.text:
        text = read_text_file(Path(args.text))
        if not text.strip():
            raise TinyLMError(f"{args.text} is empty; there is no text to evaluate.")
        tokens = np.asarray(run.tokenizer.encode(text), dtype=np.int64)
        chars, n_bytes, source = len(text), len(text.encode("utf-8")), args.text
    else:
        if not (args.data or run.record.data):
            raise TinyLMError(
                f"{args.run_dir} records no data directory (e.g. an imported model); pass --data DIR or --text FILE."
            )
        data = TokenData(args.data or run.record.data)
        if args.data and data.tokenizer_hash != tokenizer_hash(run.tokenizer):
            raise TinyLMError(
                f"{args.data} was prepared with another tokenizer than {args.run_dir}'s; prepare it with "
                "the run's tokenizer, or pass --text FILE."
            )
        tokens, chars, n_bytes, source = (
            data.split(args.split),
            data.chars(args.split),
            data.bytes(args.split),
            f"{data.path}:{args.split}",
        )
    result = evaluate_tokens(
        run.model,
        tokens,
        block_size=run.model_cfg.block_size,
        batch_size=args.batch_size,
        stride=args.stride,
        chars=chars,
        n_bytes=n_bytes,
        max_tokens=args.max_tokens,
        progress=not args.no_progress,
    )
    budget = f" (budget {args.max_tokens:,} of {len(tokens) - 1:,})" if args.max_tokens else ""
    print(
        f"{source}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
        f"bits/char {result.bits_per_char:.4f}, bits/byte {result.bits_per_byte:.4f} over {result.tokens:,} tokens{budget}"
    )
    return result.summary()


def add_info(sub: argparse._SubParsersAction) -> None:
    """`tinylm info`."""
    p = sub.add_parser("info", help="count trainable tensors and parameters")
    p.add_argument("run_dir", nargs="?", help="run directory (else describe --preset)")
    p.add_argument(
        "--preset",
        help=f"preset to describe (default {DEFAULT_PRESET}; without RUN_DIR or --preset, every preset is listed)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override config fields (repeatable)")
    p.add_argument(
        "--vocab-size",
        type=int,
        help="vocabulary size for a preset (default: the one it is meant for, 50,257 for mini-gpt and "
        "gpt2-small, 65 characters otherwise; --set vocab_size=N works too)",
    )
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.config import PRESETS, to_dict
    from tinylm.model import parameter_summary

    if args.run_dir:
        from tinylm.checkpoint import load_run

        run = load_run(args.run_dir)
        model, model_cfg = run.model, run.model_cfg
        print(f"Run {args.run_dir} (preset {run.record.preset}): {describe_model(model_cfg)}")
    elif args.preset is None and not args.set and args.vocab_size is None:
        return _list_presets(PRESETS)
    else:
        model, model_cfg = _preset_model(args.preset, args.set, args.vocab_size)
        print(f"Preset {args.preset or DEFAULT_PRESET}: {describe_model(model_cfg)}")
    summary = parameter_summary(model)
    print(
        f"{summary['tensors']} trainable tensors, {summary['parameters']:,} parameters "
        f"(vocabulary {model_cfg.vocab_size:,})"
    )
    for name, part in summary["modules"].items():
        print(f"  {name:<18} {part['tensors']:>4} tensors {part['parameters']:>14,} parameters")
    preset = run.record.preset if args.run_dir else (args.preset or DEFAULT_PRESET)
    return {**summary, "preset": preset, "config": to_dict(model_cfg)}


def _preset_model(preset: str | None, sets: list[str] | None, vocab_size: int | None) -> tuple[Any, Any]:
    """A preset's model on the meta device (shapes only) and its config, with the vocabulary it is meant for."""
    from tinylm.config import build_configs, parse_overrides, preset_vocab_size
    from tinylm.model import Transformer, on_meta

    preset = preset or DEFAULT_PRESET
    overrides = parse_overrides(sets or [])
    vocab = overrides.pop("vocab_size", None) or vocab_size or preset_vocab_size(preset)
    model_cfg, _ = build_configs(preset, overrides, vocab_size=vocab)
    with on_meta():  # counting needs no memory and no initialisation
        return Transformer(model_cfg), model_cfg


def _list_presets(presets: dict[str, Any]) -> dict[str, Any]:
    """`tinylm info` alone: every preset in one line each."""
    from tinylm.model import parameter_summary

    print(f"Presets (`tinylm info --preset NAME` for one; train uses {DEFAULT_PRESET} without --preset):")
    out = {}
    for name in presets:
        model, cfg = _preset_model(name, None, None)
        n = parameter_summary(model)["parameters"]
        print(f"  {name:<17} {describe_model(cfg)}; {n:,} parameters (vocabulary {cfg.vocab_size:,})")
        out[name] = {"parameters": n, "vocab_size": cfg.vocab_size}
    return {"presets": out}


def add_plot(sub: argparse._SubParsersAction) -> None:
    """`tinylm plot`."""
    p = sub.add_parser("plot", help="plot training and validation loss and the learning rate")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--out", help="PNG path (default RUN_DIR/loss.png)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.viz import plot_training_progress

    path = plot_training_progress(args.run_dir, args.out)
    print(f"Saved {path}")
    return {"out": str(path)}


def add_finetune(sub: argparse._SubParsersAction) -> None:
    """`tinylm finetune`."""
    p = sub.add_parser("finetune", help="continue training a run on new text or prompt/response pairs")
    p.add_argument("run_dir", nargs="?", help="base run directory")
    p.add_argument(
        "--data", help="JSONL of {prompt, response} (loss on responses only), a prepared data dir, or text"
    )
    p.add_argument("--out", default="runs/finetune", help="new run directory (default runs/finetune)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped fine-tuning run")
    p.add_argument("--checkpoint", default="last", help="base checkpoint to start from (default last)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters only; base weights stay frozen")
    p.add_argument("--lora-rank", type=int, default=8, help="adapter rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="adapter scale numerator (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on adapter inputs (default 0)")
    p.add_argument(
        "--lora-targets", help="comma-separated layer names (default wq,wk,wv,wo,fc,proj,w1,w2,w3)"
    )
    p.add_argument("--lora-experts", action="store_true", help="also adapt Mixture-of-Experts expert weights")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override training fields (repeatable)"
    )
    p.add_argument("--max-steps", type=int, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: the base run's)")
    p.add_argument(
        "--lr", type=float, help="peak learning rate (default: a third of the base run's; muon_lr follows)"
    )
    add_device(p)
    p.add_argument("--dtype", help="auto, fp32, bf16 or fp16 (default: the base run's)")
    p.add_argument("--seed", type=int, help="random seed (default: the base run's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.finetune import finetune
    from tinylm.lora import LoRAConfig

    overrides = overrides_from(args, ("max_steps", "batch_size", "lr", "device", "seed", "dtype"))
    lora = None
    if args.lora:
        targets = tuple(t.strip() for t in args.lora_targets.split(",")) if args.lora_targets else ()
        lora = LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, targets, args.lora_experts)
    result = finetune(
        args.run_dir,
        args.data,
        args.resume or args.out,
        lora=lora,
        overrides=overrides,
        checkpoint=args.checkpoint,
        resume=bool(args.resume),
        progress=not args.no_progress,
    )
    return report(args, result, "Fine-tuned")


def add_merge(sub: argparse._SubParsersAction) -> None:
    """`tinylm merge`."""
    p = sub.add_parser("merge", help="fold a LoRA run's adapters into its weights")
    p.add_argument("run_dir", help="LoRA fine-tuning run")
    p.add_argument("--out", help="merged run directory (default RUN_DIR-merged)")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.finetune import merge_run

    out = merge_run(args.run_dir, args.out)
    print(f"Merged adapters into {out}")
    return {"out": str(out)}


def add_consolidate(sub: argparse._SubParsersAction) -> None:
    """`tinylm consolidate`."""
    p = sub.add_parser("consolidate", help="turn a sharded (FSDP) checkpoint into one model.safetensors")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--checkpoint", default="last", help="checkpoint name (default last)")
    p.add_argument(
        "--out",
        help="file to write (default: model.safetensors inside the checkpoint, where generate, "
        "export and serve read it)",
    )
    p.set_defaults(func=cmd_consolidate)


def cmd_consolidate(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.checkpoint import consolidate

    out = consolidate(args.run_dir, args.checkpoint, args.out)
    print(f"Wrote {out}")
    return {"out": str(out)}


def register(sub: argparse._SubParsersAction) -> None:
    """Add this family's commands."""
    add_prepare(sub)
    add_train(sub)
    add_consolidate(sub)
    add_eval(sub)
    add_info(sub)
    add_plot(sub)
    add_finetune(sub)
    add_merge(sub)
