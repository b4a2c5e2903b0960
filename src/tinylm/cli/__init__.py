"""The `tinylm` command: argparse subcommands, one module per family; the only place that reads argv or prints."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from tinylm.cli import generation, interop, serving, training
from tinylm.cli.common import Parser, add_common, emit, fit_threads, version_line
from tinylm.errors import TinyLMError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand; each one takes --json (added here, once)."""
    parser = Parser(prog="tinylm", description="Build, train, evaluate and sample small language models.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in (training, generation, interop, serving):
        family.register(sub)
    for command in sub.choices.values():
        add_common(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print one sentence and exit 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
    try:
        if hasattr(args, "threads"):  # the commands that run a model (they take --device and --threads)
            fit_threads(args)
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
    emit(args, summary)
    return 0
