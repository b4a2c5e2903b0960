"""The `tinylm` command: argparse subcommands; the only module that reads argv or prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tinylm.errors import TinyLMError

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def _emit(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(summary, default=str))


# ----- commands ---------------------------------------------------------------------------
def _overrides(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    """--set pairs plus the config fields given as their own flags (flags win)."""
    from tinylm.config import parse_overrides

    overrides = parse_overrides(args.set or [])
    overrides.update({k: getattr(args, k) for k in keys if getattr(args, k) is not None})
    return overrides


def cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.data import prepare

    meta = prepare(args.inputs, args.out, args.tokenizer, args.vocab_size, args.val_fraction)
    print(
        f"Wrote {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
        f"({meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}) to {args.out}"
    )
    return {"out": args.out, **meta}


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.train import train

    overrides = _overrides(
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
    for flag in ("compile", "grad_checkpointing", "fsdp", "tensorboard", "wandb"):
        if getattr(args, flag):
            overrides[flag] = True
    result = train(
        args.data,
        args.resume or args.out,
        args.preset,
        overrides,
        resume=bool(args.resume),
        checkpoint=args.checkpoint,
        stop_after=args.stop_after,
        progress=not args.no_progress,
    )
    return _report(args, result, "Trained")


def _report(args: argparse.Namespace, result: Any, verb: str) -> dict[str, Any]:
    """The end-of-session summary of train and finetune: this session's steps and which losses they are."""
    if result.rank != 0:  # under torchrun, rank 0 speaks for the run
        args.json = False
        return {}
    span = (
        f" (steps {result.start_step + 1}-{result.steps} of {result.total_steps})"
        if result.start_step
        else ""
    )
    print(
        f"{verb} {result.session_steps} steps{span} in {result.seconds:.1f}s ({result.tokens_per_sec:,.0f} tokens/s): "
        f"train loss {result.train_loss:.4f} ({result.train_loss_kind}), "
        f"val loss {result.val_loss:.4f} (step {result.steps}). Run saved in {result.run_dir}"
    )
    if not result.finished:
        print(
            f"Stopped at step {result.steps} of {result.total_steps}; continue with: {result.resume_command}"
        )
    return result.summary()


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.checkpoint import load_run
    from tinylm.generate import generate, stream
    from tinylm.runtime import resolve_device

    device = resolve_device(args.device)
    run = load_run(args.run_dir, args.checkpoint, device)
    if args.dtype:  # e.g. bf16 weights: half the memory traffic per decoded token
        from tinylm.generate import decode_dtype

        run.model.to(decode_dtype(args.dtype, device))
    if args.quantize == "int8":  # int8 weights with per-channel scales; activations stay float
        from tinylm.quantize import quantize_int8

        quantize_int8(run.model)
    cfg = _sample_config(args)
    if args.stream:
        start, pieces = time.perf_counter(), []
        print(args.prompt, end="", flush=True)
        for piece in stream(run.model, run.tokenizer, args.prompt, cfg, compile=args.compile):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        text = "".join(pieces)
        return {
            "text": text,
            "tokens": len(run.tokenizer.encode(text)) if text else 0,
            "seconds": time.perf_counter() - start,
        }
    results = generate(
        run.model,
        run.tokenizer,
        args.prompt,
        cfg,
        num_samples=args.num_samples,
        progress=not args.no_progress,
        compile=args.compile,
    )
    for i, r in enumerate(results):
        if len(results) > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + r.text)
    first = results[0]
    if first.ids and not run.tokenizer.decode(first.ids):  # an empty text cut by a stop string is fine
        raise TinyLMError(
            f"The model generated {first.tokens} tokens that the run's tokenizer decodes to no text; "
            "the tokenizer is missing or does not belong to this model."
        )
    summary = {
        "text": first.text,
        "tokens": first.tokens,
        "tokens_per_second": round(first.tokens_per_second, 1),
    }
    if len(results) > 1:
        summary["samples"] = [r.text for r in results]
    return summary


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from tinylm.checkpoint import load_run
    from tinylm.data import TokenData, read_text_file
    from tinylm.evaluate import evaluate_tokens
    from tinylm.runtime import resolve_device
    from tinylm.tokenizer import tokenizer_hash

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
        progress=not args.no_progress,
    )
    print(
        f"{source}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f}, "
        f"bits/char {result.bits_per_char:.4f}, bits/byte {result.bits_per_byte:.4f} over {result.tokens:,} tokens"
    )
    return result.summary()


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tinylm.config import build_configs, parse_overrides, preset_vocab_size, to_dict
    from tinylm.model import Transformer, parameter_summary

    if args.run_dir:
        from tinylm.checkpoint import load_run

        run = load_run(args.run_dir)
        model, model_cfg = run.model, run.model_cfg
    else:
        overrides = parse_overrides(args.set or [])
        vocab = overrides.pop("vocab_size", None) or args.vocab_size or preset_vocab_size(args.preset)
        model_cfg, _ = build_configs(args.preset, overrides, vocab_size=vocab)
        with torch.device("meta"):  # shapes only: counting needs no memory and no initialisation
            model = Transformer(model_cfg)
    summary = parameter_summary(model)
    print(
        f"{summary['tensors']} trainable tensors, {summary['parameters']:,} parameters "
        f"(vocabulary {model_cfg.vocab_size:,})"
    )
    for name, part in summary["modules"].items():
        print(f"  {name:<18} {part['tensors']:>4} tensors {part['parameters']:>14,} parameters")
    return {**summary, "config": to_dict(model_cfg)}


def cmd_harness(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.harness import evaluate

    tasks = [t for t in args.tasks.split(",") if t]
    results = evaluate(args.run_dir, tasks, limit=args.limit, device=args.device, checkpoint=args.checkpoint)
    for task, metrics in results.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return {"results": results}


def cmd_plot(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.viz import plot_training_progress

    path = plot_training_progress(args.run_dir, args.out)
    print(f"Saved {path}")
    return {"out": str(path)}


def cmd_app(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "ask" and args.index:  # retrieval-augmented: tinylm.rag
        return cmd_ask_rag(args)
    if args.command == "ask" and (args.rerank or args.keep is not None or args.rerank_run):
        raise TinyLMError(
            "--rerank, --keep and --rerank-run re-rank retrieved passages; add --index INDEX_DIR."
        )
    from tinylm import apps
    from tinylm.checkpoint import load_run
    from tinylm.runtime import resolve_device

    run = load_run(args.run_dir, args.checkpoint, resolve_device(args.device))
    # only the flags the user gave: each app keeps its own defaults (e.g. ask's temperature 0.7)
    text = apps.APPS[args.command](run.model, run.tokenizer, args.text, **_sampling_options(args))
    print(text)
    return {"text": text}


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from tinylm.serve import load_app, run_app
    except ImportError:
        raise TinyLMError('tinylm serve needs FastAPI and uvicorn: pip install -e ".[serve]".') from None

    if args.max_batch < 1 or args.max_queue < 0:
        raise TinyLMError("--max-batch must be at least 1 and --max-queue at least 0.")
    app = load_app(
        args.run_dir,
        args.checkpoint,
        args.device,
        args.model_name,
        args.max_batch,
        args.max_queue,
        args.index,
    )
    url = f"http://{args.host}:{args.port}"
    print(f"Serving {args.run_dir} at {url}: playground at {url}/, OpenAI API at {url}/v1 (Ctrl-C stops)")
    sys.stdout.flush()
    run_app(app, args.host, args.port)
    return {"url": url, "run_dir": args.run_dir}


def cmd_index(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.rag import build_index, default_passage_tokens, index_tokenizer

    tokenizer = index_tokenizer(args.run, args.tokenizer)
    cap = args.passage_tokens
    if cap is None:
        if args.run is None:
            raise TinyLMError(
                "With --tokenizer, give --passage-tokens N (with --run it follows the context)."
            )
        from tinylm.checkpoint import RunRecord

        cap = default_passage_tokens(RunRecord.read(Path(args.run)).model.block_size, args.k)
    meta = build_index(args.docs, args.out, tokenizer, cap, k1=args.k1, b=args.b)
    print(
        f"Indexed {meta['passages']:,} passages (at most {cap} tokens each) from {len(meta['files'])} "
        f"file(s) into {args.out}"
    )
    return {"out": args.out, **meta}


def cmd_ask_rag(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.checkpoint import load_run
    from tinylm.rag import Index, answer
    from tinylm.runtime import resolve_device
    from tinylm.tokenizer import tokenizer_hash

    if not args.text.strip():
        raise TinyLMError("The question is empty; ask something.")
    if (args.keep is not None or args.rerank_run) and not args.rerank:
        raise TinyLMError("--keep and --rerank-run apply to re-ranking; add --rerank.")
    index = Index.load(args.index)
    run = load_run(args.run_dir, args.checkpoint, resolve_device(args.device))
    index.check_tokenizer(run.tokenizer)
    options = _sampling_options(args)  # greedy unless the user asks for sampling
    if options.keys() & {"temperature", "top_k", "top_p"}:
        options.setdefault("do_sample", True)
    reranker = None
    if args.rerank_run:
        reranker = load_run(args.rerank_run, "last", resolve_device(args.device))
        if tokenizer_hash(reranker.tokenizer) != tokenizer_hash(run.tokenizer):
            raise TinyLMError(
                f"--rerank-run {args.rerank_run} has another tokenizer than {args.run_dir}; "
                "re-rank with a run that shares it (e.g. the fine-tune's base run)."
            )
    result = answer(
        run.model,
        run.tokenizer,
        index,
        args.text,
        k=args.k,
        rerank=args.rerank,
        keep=args.keep,
        rerank_model=reranker.model if reranker else None,
        **options,
    )
    print(result.text)
    print(result.sources_line(run.model.cfg.block_size))
    for i, p in enumerate(result.sources, start=1):
        excerpt = p.text if len(p.text) <= 80 else p.text[:77] + "..."
        rerank = "" if p.likelihood is None else f", question log-likelihood {p.likelihood:.2f}/token"
        print(f"  [{i}] {p.file} passage {p.passage_no} (score {p.score:.2f}{rerank}): {excerpt}")
    return {"text": result.text, **result.summary()}


def cmd_attention(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.checkpoint import load_run
    from tinylm.viz import visualize_generation_attention

    if args.tokens < 1:
        raise TinyLMError(f"--tokens must be at least 1, not {args.tokens}.")
    run = load_run(args.run_dir, args.checkpoint)
    path = visualize_generation_attention(run.model, run.tokenizer, args.prompt, args.tokens, args.out)
    print(f"Saved {path}")
    return {"out": str(path)}


def cmd_chat(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    from tinylm.chat import CHAT_STOP, render_chat
    from tinylm.checkpoint import load_run
    from tinylm.generate import stream
    from tinylm.runtime import resolve_device

    run = load_run(args.run_dir, args.checkpoint, resolve_device(args.device))
    cfg = _sample_config(args)
    cfg = replace(cfg, stop=CHAT_STOP + cfg.stop)  # a reply ends where the model starts the next user turn
    settings = {
        "/temp": ("temperature", float),
        "/top_k": ("top_k", int),
        "/top_p": ("top_p", float),
        "/max": ("max_new_tokens", int),
    }
    print(
        "tinylm chat: type a message; /temp 0.8, /top_k 50, /top_p 0.9, /max 200 change settings; "
        "/reset forgets the conversation; /quit leaves."
    )
    messages: list[dict[str, str]] = []
    turns = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        word, _, value = line.strip().partition(" ")
        if word in ("/quit", "/exit"):
            break
        if word == "/reset":
            messages.clear()
            print("(conversation cleared)")
            continue
        if word in settings:
            name, kind = settings[word]
            try:
                cfg = replace(cfg, **{name: kind(value)})
                print(f"{name} = {getattr(cfg, name)}")
            except (ValueError, TinyLMError) as exc:
                print(f"error: {exc}")
            continue
        if not line.strip():
            continue
        reply = _chat_turn(run, messages + [{"role": "user", "content": line}], cfg, render_chat, stream)
        if reply is not None:
            messages += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
            turns += 1
    print()
    return {"turns": turns}


def _chat_turn(run: Any, messages: list[dict[str, str]], cfg: Any, render: Any, stream: Any) -> str | None:
    """Stream the assistant's reply to `messages`; None (after printing the error) when it fails."""
    pieces: list[str] = []
    try:
        with warnings.catch_warnings():  # a long conversation keeps its most recent context, silently
            warnings.simplefilter("ignore")
            for piece in stream(run.model, run.tokenizer, render(messages), cfg):
                piece = piece if pieces else piece.lstrip()
                pieces.append(piece)
                print(piece, end="", flush=True)
    except TinyLMError as exc:
        print(f"error: {exc}")
        return None
    print()
    return "".join(pieces).strip()


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.finetune import finetune
    from tinylm.lora import LoRAConfig

    overrides = _overrides(args, ("max_steps", "batch_size", "lr", "device", "seed", "dtype"))
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
    return _report(args, result, "Fine-tuned")


def cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.finetune import merge_run

    out = merge_run(args.run_dir, args.out)
    print(f"Merged adapters into {out}")
    return {"out": str(out)}


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    if args.format == "gguf":
        from tinylm.export_gguf import export_gguf

        out = export_gguf(args.run_dir, args.out, args.quant, args.checkpoint)
        print(f"Exported {args.run_dir} as GGUF ({args.quant}) to {out}")
        return {"out": str(out), "format": "gguf", "quant": args.quant}
    if args.quant != "f32":
        raise TinyLMError("--quant applies to --format gguf only.")
    from tinylm.export import export_hf

    out = export_hf(args.run_dir, args.out, args.checkpoint)
    print(f"Exported {args.run_dir} as a Hugging Face model to {out}")
    return {"out": str(out)}


def cmd_import_hf(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.export import import_hf

    out = import_hf(args.src, args.out, args.tokenizer)
    print(f"Imported {args.src} as a tinylm run in {out}")
    return {"out": str(out)}


# ----- parser -----------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def _add_device(p: argparse.ArgumentParser) -> None:
    """--device, with the same default on every command that runs a model."""
    p.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N or mps (default auto: a GPU if there is one)",
    )


def _unescape(value: str) -> str:
    r"""A --stop string with \n, \t, \r and \\ decoded, as a user typing "\n\n" in a shell means."""
    import re

    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m[1]], value)


def _add_sampling(p: argparse.ArgumentParser, app: str | None = None) -> None:
    """The sampling flags; defaults shown are SampleConfig's (or the app's own), never duplicated here."""
    from tinylm.config import APP_SAMPLING, SampleConfig

    d = APP_SAMPLING[app] if app else SampleConfig()
    p.add_argument("--max-new-tokens", type=int, help=f"tokens to generate (default {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, help=f"sampling temperature > 0 (default {d.temperature})")
    p.add_argument("--top-k", type=int, help=f"keep the k most likely tokens, 0 = off (default {d.top_k})")
    p.add_argument(
        "--top-p", type=float, help=f"nucleus sampling mass in (0, 1], 1 = off (default {d.top_p})"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        help=f"> 1 discourages repeats, 1 = off (default {d.repetition_penalty})",
    )
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument(
        "--stop",
        action="append",
        type=_unescape,
        help="stop when this string appears (repeatable); \\n, \\t, \\r and \\\\ are decoded, "
        'so --stop "\\n\\n" stops at a blank line' + (f" (default {d.stop!r})" if d.stop else ""),
    )
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    _add_device(p)
    p.add_argument(
        "--checkpoint", default="last", help="checkpoint name in the run (default last; e.g. best)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags the user gave, as SampleConfig fields (absent flags are left out)."""
    options = {
        name: getattr(args, name)
        for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
        if getattr(args, name) is not None
    }
    if options.get("max_new_tokens", 1) < 1:
        raise TinyLMError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}.")
    if args.stop:
        options["stop"] = tuple(args.stop)
    if args.greedy:
        options["do_sample"] = False
    if getattr(args, "rolling_cache", False):
        options["rolling_cache"] = True
    return options


def _sample_config(args: argparse.Namespace) -> Any:
    """SampleConfig from the sampling flags: the one helper every sampling command uses."""
    from tinylm.config import sample_config

    return sample_config(None, **_sampling_options(args))


def _parser_prepare(sub: argparse._SubParsersAction) -> None:
    """`tinylm prepare`."""
    p = sub.add_parser("prepare", help="tokenize text into train/val shards")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text file, directory of .txt, built-in name (shakespeare) or hf:NAME[:CONFIG]",
    )
    p.add_argument(
        "--tokenizer", choices=("char", "bpe", "gpt2"), default="char", help="tokenizer kind (default char)"
    )
    p.add_argument("--vocab-size", type=int, default=0, help="BPE vocabulary size (default 4096)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="last fraction of the text held out for validation (default 0.1)",
    )
    p.add_argument("--out", required=True, help="output data directory")
    _add_common(p)
    p.set_defaults(func=cmd_prepare)


def _parser_train(sub: argparse._SubParsersAction) -> None:
    """`tinylm train`."""
    from tinylm.config import PRESETS

    p = sub.add_parser("train", help="train a model (or --resume a run)")
    p.add_argument("--data", help="prepared data directory")
    p.add_argument(
        "--preset", default="tiny", help=f"model/training preset: {', '.join(PRESETS)} (default tiny)"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set n_layer=4 (repeatable)",
    )
    p.add_argument("--max-steps", type=int, help="optimizer steps over random windows")
    p.add_argument(
        "--epochs", type=int, help="passes over the sliding-window dataset (instead of --max-steps)"
    )
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument(
        "--optimizer",
        help="adamw, or muon (Muon on the blocks' matrices, AdamW on the rest; lr for Muon: --set muon_lr=)",
    )
    p.add_argument("--eval-interval", type=int, help="steps between validation estimates")
    _add_device(p)
    p.add_argument("--dtype", help="auto, fp32, bf16 or fp16 (default auto: bf16/fp16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument(
        "--fsdp", action="store_true", help="with torchrun: shard the model with FSDP2 instead of DDP"
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
    p.add_argument("--stop-after", type=int, help="stop (resumably) after this many steps in this session")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_train)


def _parser_generate(sub: argparse._SubParsersAction) -> None:
    """`tinylm generate`."""
    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("run_dir", help="run directory")
    p.add_argument(
        "--prompt", default="", help="text to continue (empty starts from the end-of-text/newline token)"
    )
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw (default 1)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="cast the weights for decoding; auto: bf16 on GPUs and on CPUs with bf16 units "
        "(AVX512-BF16/AMX), else fp32",
    )
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="int8 weight-only quantization of the linear layers (per-channel scales) for CPU decoding",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the one-token decode step once, before timing (CUDA graphs on a GPU)",
    )
    p.add_argument(
        "--rolling-cache",
        action="store_true",
        help="past the context keep the last block_size keys at their positions instead of re-encoding "
        "the window each token (RoPE models only)",
    )
    _add_sampling(p)
    _add_common(p)
    p.set_defaults(func=cmd_generate)


def _parser_eval(sub: argparse._SubParsersAction) -> None:
    """`tinylm eval`."""
    p = sub.add_parser("eval", help="loss, perplexity and bits per char/byte on held-out text")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--data", help="prepared data directory (default: the one the run trained on)")
    p.add_argument("--split", default="val", choices=("val", "train"), help="split of --data (default val)")
    p.add_argument("--text", help="evaluate this text file instead")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: non-overlapping windows)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per batch (default 16)")
    _add_device(p)
    p.add_argument("--checkpoint", default="last", help="checkpoint name (default last)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_eval)


def _parser_apps(sub: argparse._SubParsersAction) -> None:
    """`tinylm complete, story and ask`."""
    for name, help_text, arg in (
        ("complete", "continue a text", "text to complete"),
        ("story", "write a short story about a theme", "theme"),
        ("ask", "answer a question (Q: ... A: format)", "question"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("run_dir", help="run directory")
        p.add_argument("text", help=arg)
        if name == "ask":
            _add_rag_flags(p)
        _add_sampling(p, app=name)
        _add_common(p)
        p.set_defaults(func=cmd_app)


def _add_rag_flags(p: argparse.ArgumentParser) -> None:
    """`tinylm ask --index DIR --k N`: answer from retrieved passages (tinylm.rag)."""
    p.add_argument("--index", help="answer from passages retrieved from this index (built by tinylm index)")
    p.add_argument("--k", type=int, default=3, help="passages to retrieve with --index (default 3)")
    p.add_argument(
        "--rerank",
        action="store_true",
        help="order the retrieved passages by the model's likelihood of the question given each",
    )
    p.add_argument("--keep", type=int, help="with --rerank: keep only the best N passages (default all k)")
    p.add_argument(
        "--rerank-run",
        help="with --rerank: score with this run (same tokenizer, e.g. the base of a fine-tune)",
    )


def _parser_index(sub: argparse._SubParsersAction) -> None:
    """`tinylm index`."""
    p = sub.add_parser("index", help="split documents into passages and build a BM25 index for tinylm ask")
    p.add_argument("docs", nargs="+", metavar="DOCS", help="text file or directory of .txt/.md files")
    p.add_argument("--out", required=True, help="index directory to create (must not exist)")
    p.add_argument("--run", help="run directory whose tokenizer and context size cap the passages")
    p.add_argument("--tokenizer", help="tokenizer.json to cap passages with (instead of --run)")
    p.add_argument(
        "--passage-tokens",
        type=int,
        help="cap per passage in tokens (default with --run: 3/4 of the context divided by --k)",
    )
    p.add_argument("--k", type=int, default=3, help="passages meant to fit one prompt (default 3)")
    p.add_argument("--k1", type=float, default=1.5, help="BM25 term-frequency saturation (default 1.5)")
    p.add_argument("--b", type=float, default=0.75, help="BM25 length normalization (default 0.75)")
    _add_common(p)
    p.set_defaults(func=cmd_index)


def _parser_chat(sub: argparse._SubParsersAction) -> None:
    """`tinylm chat`."""
    p = sub.add_parser("chat", help="interactive prompt loop with streamed replies")
    p.add_argument("run_dir", help="run directory")
    _add_sampling(p)
    _add_common(p)
    p.set_defaults(func=cmd_chat)


def _parser_serve(sub: argparse._SubParsersAction) -> None:
    """`tinylm serve`."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server and web playground for a run")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--checkpoint", default="last", help="checkpoint name (default last)")
    _add_device(p)
    p.add_argument("--model-name", help="model id clients send (default: the run directory's name)")
    p.add_argument(
        "--max-batch", type=int, default=16, help="sequences decoded together in one step (default 16)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="sequences allowed to wait; more get HTTP 429 (default 256)",
    )
    p.add_argument("--index", help="retrieval index (tinylm index --out) to add passages to prompts")
    _add_common(p)
    p.set_defaults(func=cmd_serve)


def _parser_attention(sub: argparse._SubParsersAction) -> None:
    """`tinylm attention`."""
    p = sub.add_parser("attention", help="heatmaps of attention while generating")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--prompt", required=True, help="prompt to continue")
    p.add_argument("--tokens", type=int, default=5, help="generated tokens to show (default 5)")
    p.add_argument("--out", default="attention.png", help="PNG path (default attention.png)")
    p.add_argument("--checkpoint", default="last", help="checkpoint name (default last)")
    _add_common(p)
    p.set_defaults(func=cmd_attention)


def _parser_finetune(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override training fields")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    p.add_argument(
        "--lr", type=float, help="peak learning rate (default: a third of the base run's; muon_lr follows)"
    )
    _add_device(p)
    p.add_argument("--dtype", help="auto, fp32, bf16 or fp16")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_finetune)


def _parser_merge(sub: argparse._SubParsersAction) -> None:
    """`tinylm merge`."""
    p = sub.add_parser("merge", help="fold a LoRA run's adapters into its weights")
    p.add_argument("run_dir", help="LoRA fine-tuning run")
    p.add_argument("--out", help="merged run directory (default RUN_DIR-merged)")
    _add_common(p)
    p.set_defaults(func=cmd_merge)


def _parser_export(sub: argparse._SubParsersAction) -> None:
    """`tinylm export`."""
    p = sub.add_parser("export", help="export a run as a Hugging Face model directory or a GGUF file")
    p.add_argument("run_dir", help="run directory")
    p.add_argument(
        "--format",
        default="hf",
        choices=("hf", "gguf"),
        help="hf: a transformers model directory; gguf: one file for llama.cpp",
    )
    p.add_argument(
        "--quant", default="f32", choices=("f32", "f16", "q8_0"), help="gguf weight type (default f32)"
    )
    p.add_argument("--out", required=True, help="output directory (hf) or FILE.gguf (gguf)")
    p.add_argument("--checkpoint", default="last", help="checkpoint name (default last)")
    _add_common(p)
    p.set_defaults(func=cmd_export)


def _parser_import_hf(sub: argparse._SubParsersAction) -> None:
    """`tinylm import-hf`."""
    p = sub.add_parser("import-hf", help="import a local transformers GPT-2 / LLaMA / Mixtral model as a run")
    p.add_argument("src", help="Hugging Face model directory (config.json + weights + tokenizer)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--tokenizer", help="directory with the tokenizer files, when SRC has none")
    _add_common(p)
    p.set_defaults(func=cmd_import_hf)


def _parser_plot(sub: argparse._SubParsersAction) -> None:
    """`tinylm plot`."""
    p = sub.add_parser("plot", help="plot training and validation loss and the learning rate")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--out", help="PNG path (default RUN_DIR/loss.png)")
    _add_common(p)
    p.set_defaults(func=cmd_plot)


def _parser_harness(sub: argparse._SubParsersAction) -> None:
    """`tinylm harness`."""
    p = sub.add_parser("harness", help="run LM Evaluation Harness tasks on a run (needs lm_eval)")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--tasks", required=True, help="comma-separated harness task names, e.g. hellaswag")
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    _add_device(p)
    p.add_argument("--checkpoint", default="last", help="checkpoint to evaluate (default last)")
    _add_common(p)
    p.set_defaults(func=cmd_harness)


def _parser_info(sub: argparse._SubParsersAction) -> None:
    """`tinylm info`."""
    p = sub.add_parser("info", help="count trainable tensors and parameters")
    p.add_argument("run_dir", nargs="?", help="run directory (else describe --preset)")
    p.add_argument("--preset", default="tiny", help="preset to describe")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override config fields")
    p.add_argument(
        "--vocab-size",
        type=int,
        help="vocabulary size for a preset (default: the one it is meant for, 50,257 for mini-gpt and "
        "gpt2-small, 65 characters otherwise; --set vocab_size=N works too)",
    )
    _add_common(p)
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="tinylm", description="Build, train, evaluate and sample small language models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _parser_prepare(sub)
    _parser_train(sub)
    _parser_generate(sub)
    _parser_eval(sub)
    _parser_apps(sub)
    _parser_index(sub)
    _parser_chat(sub)
    _parser_attention(sub)
    _parser_finetune(sub)
    _parser_merge(sub)
    _parser_export(sub)
    _parser_import_hf(sub)
    _parser_plot(sub)
    _parser_info(sub)
    _parser_serve(sub)

    _parser_harness(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print one sentence and exit 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
    try:
        summary = args.func(args)
    except TinyLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        # a path the user gave that cannot be read or created, e.g. --out under a regular file
        print(f"error: cannot use {exc.filename}: {exc.strerror}; choose another path.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tinylm info | head -1`
        sys.stdout = open(os.devnull, "w")
        return 0
    _emit(args, summary)
    return 0
