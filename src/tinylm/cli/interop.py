"""Interop: export (Hugging Face, GGUF), import-hf, and the LM Evaluation Harness."""

from __future__ import annotations

import argparse
from typing import Any

from tinylm.cli.common import add_device
from tinylm.errors import TinyLMError


def add_export(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=cmd_export)


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


def add_import_hf(sub: argparse._SubParsersAction) -> None:
    """`tinylm import-hf`."""
    p = sub.add_parser("import-hf", help="import a local transformers GPT-2 / LLaMA / Mixtral model as a run")
    p.add_argument("src", help="Hugging Face model directory (config.json + weights + tokenizer)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--tokenizer", help="directory with the tokenizer files, when SRC has none")
    p.set_defaults(func=cmd_import_hf)


def cmd_import_hf(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.export import import_hf

    out = import_hf(args.src, args.out, args.tokenizer)
    print(f"Imported {args.src} as a tinylm run in {out}")
    return {"out": str(out)}


def add_harness(sub: argparse._SubParsersAction) -> None:
    """`tinylm harness`."""
    p = sub.add_parser("harness", help="run LM Evaluation Harness tasks on a run (needs lm_eval)")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--tasks", required=True, help="comma-separated harness task names, e.g. hellaswag")
    p.add_argument("--limit", type=int, help="at most this many examples per task (default: all)")
    add_device(p)
    p.add_argument("--checkpoint", default="last", help="checkpoint to evaluate (default last)")
    p.set_defaults(func=cmd_harness)


def cmd_harness(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.harness import evaluate

    tasks = [t for t in args.tasks.split(",") if t]
    results = evaluate(args.run_dir, tasks, limit=args.limit, device=args.device, checkpoint=args.checkpoint)
    for task, metrics in results.items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return {"results": results}


def register(sub: argparse._SubParsersAction) -> None:
    """Add this family's commands."""
    add_export(sub)
    add_import_hf(sub)
    add_harness(sub)
