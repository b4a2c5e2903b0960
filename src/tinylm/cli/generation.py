"""Generation and the applications: generate, complete, story, ask, chat, attention."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from tinylm.cli import serving
from tinylm.cli.common import add_sampling, sample_config, sampling_options
from tinylm.errors import TinyLMError


def add_generate(sub: argparse._SubParsersAction) -> None:
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
        "(AVX512-BF16/AMX), else fp32 (default: the weights as trained)",
    )
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="int8 weight-only quantization of the linear layers (per-channel scales) for CPU decoding "
        "(default: none)",
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
    add_sampling(p)
    p.set_defaults(func=cmd_generate)


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
    cfg = sample_config(args)
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


def add_apps(sub: argparse._SubParsersAction) -> None:
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
            serving.add_rag_flags(p)
        add_sampling(p, app=name)
        p.set_defaults(func=cmd_app)


def cmd_app(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "ask" and args.index:  # retrieval-augmented: tinylm.rag
        return serving.cmd_ask_rag(args)
    if args.command == "ask" and (args.rerank or args.keep is not None or args.rerank_run):
        raise TinyLMError(
            "--rerank, --keep and --rerank-run re-rank retrieved passages; add --index INDEX_DIR."
        )
    from tinylm import apps
    from tinylm.checkpoint import load_run
    from tinylm.runtime import resolve_device

    run = load_run(args.run_dir, args.checkpoint, resolve_device(args.device))
    # only the flags the user gave: each app keeps its own defaults (e.g. ask's temperature 0.7)
    text = apps.APPS[args.command](run.model, run.tokenizer, args.text, **sampling_options(args))
    print(text)
    return {"text": text}


def add_chat(sub: argparse._SubParsersAction) -> None:
    """`tinylm chat`."""
    p = sub.add_parser(
        "chat",
        help="interactive prompt loop with streamed replies",
        description="Chat with a run: Ctrl-C stops a reply and keeps the conversation; Ctrl-D or /quit leaves.",
    )
    p.add_argument("run_dir", help="run directory")
    add_sampling(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    from tinylm.chat import CHAT_STOP, HELP, ChatSession
    from tinylm.checkpoint import load_run
    from tinylm.runtime import resolve_device

    run = load_run(args.run_dir, args.checkpoint, resolve_device(args.device))
    cfg = sample_config(args)
    # a reply ends where the model starts the next user turn
    session = ChatSession(replace(cfg, stop=CHAT_STOP + cfg.stop))
    if sys.stdin.isatty():
        import readline  # noqa: F401  line editing and history for input()
        import signal

        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started by a script that ignores it
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops a reply all the same
    print(f"tinylm chat: {HELP}")
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, not the end of the conversation
            print("\n(Ctrl-D or /quit leaves)")
            continue
        if line.strip() in ("/quit", "/exit"):
            break
        shown = session.command(line)
        if shown is not None:
            print(shown)
        elif line.strip():
            reply = _chat_turn(run, session.prompt(line), session.cfg)
            if reply is not None:
                session.add(line, reply)
    print()
    return {"turns": session.turns, "messages": session.messages}


def _chat_turn(run: Any, prompt: str, cfg: Any) -> str | None:
    """Stream the reply to `prompt`: all of it, or as far as it got when Ctrl-C stopped it; None on an error."""
    from tinylm.generate import stream

    pieces: list[str] = []
    try:
        with warnings.catch_warnings():  # a long conversation keeps its most recent context, silently
            warnings.simplefilter("ignore")
            for piece in stream(run.model, run.tokenizer, prompt, cfg):
                piece = piece if pieces else piece.lstrip()
                print(piece, end="", flush=True)  # shown, then kept: a Ctrl-C between the two keeps
                pieces.append(piece)  # one piece less than was shown, never one that was not
        print()
    except KeyboardInterrupt:  # Ctrl-C: stop this reply, keep the conversation
        print("\n(reply stopped)")
    except TinyLMError as exc:
        print(f"error: {exc}")
        return None
    return "".join(pieces)


def add_attention(sub: argparse._SubParsersAction) -> None:
    """`tinylm attention`."""
    p = sub.add_parser("attention", help="heatmaps of attention while generating")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--prompt", required=True, help="prompt to continue")
    p.add_argument("--tokens", type=int, default=5, help="generated tokens to show (default 5)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/attention.png)")
    p.add_argument("--checkpoint", default="last", help="checkpoint name (default last)")
    p.set_defaults(func=cmd_attention)


def cmd_attention(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.checkpoint import load_run
    from tinylm.viz import visualize_generation_attention

    if args.tokens < 1:
        raise TinyLMError(f"--tokens must be at least 1, not {args.tokens}.")
    run = load_run(args.run_dir, args.checkpoint)
    out = args.out or Path(args.run_dir) / "attention.png"
    path = visualize_generation_attention(run.model, run.tokenizer, args.prompt, args.tokens, out)
    print(f"Saved {path}")
    return {"out": str(path)}


def register(sub: argparse._SubParsersAction) -> None:
    """Add this family's commands."""
    add_generate(sub)
    add_apps(sub)
    add_chat(sub)
    add_attention(sub)
