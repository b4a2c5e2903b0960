"""What every command shares: --json, --device and sampling flags, config overrides, the summary line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tinylm.errors import TinyLMError


def emit(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    """Print the JSON summary as the last line when --json was given."""
    if getattr(args, "json", False):
        print(json.dumps(summary, default=str))


def add_common(p: argparse.ArgumentParser) -> None:
    """--json, on every command."""
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")


def add_device(p: argparse.ArgumentParser) -> None:
    """--device, with the same default on every command that runs a model."""
    p.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N or mps (default auto: a GPU if there is one)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: OMP_NUM_THREADS if set, else the cores other processes leave free)",
    )


def fit_threads(args: argparse.Namespace) -> None:
    """Pick the command's CPU threads (tinylm.threads) and say so once on stderr when tinylm chose them."""
    import os
    import sys

    from tinylm.threads import fit_threads as choose

    choice = choose(args.threads)
    if choice.auto and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        print(choice.describe(), file=sys.stderr)


def overrides_from(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    """--set pairs plus the config fields given as their own flags (flags win)."""
    from tinylm.config import parse_overrides

    overrides = parse_overrides(args.set or [])
    overrides.update({k: getattr(args, k) for k in keys if getattr(args, k) is not None})
    return overrides


def report(args: argparse.Namespace, result: Any, verb: str) -> dict[str, Any]:
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


def unescape(value: str) -> str:
    r"""A --stop string with \n, \t, \r and \\ decoded, as a user typing "\n\n" in a shell means."""
    import re

    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m[1]], value)


def add_sampling(p: argparse.ArgumentParser, app: str | None = None) -> None:
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
        type=unescape,
        help="stop when this string appears (repeatable); \\n, \\t, \\r and \\\\ are decoded, "
        'so --stop "\\n\\n" stops at a blank line' + (f" (default {d.stop!r})" if d.stop else ""),
    )
    p.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text")
    add_device(p)
    p.add_argument(
        "--checkpoint", default="last", help="checkpoint name in the run (default last; e.g. best)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
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


def sample_config(args: argparse.Namespace) -> Any:
    """SampleConfig from the sampling flags: the one helper every sampling command uses."""
    from tinylm.config import sample_config

    return sample_config(None, **sampling_options(args))
