"""What every command shares: the parser (defaults in --help, "did you mean"), --json, --device and sampling
flags, config overrides, the summary line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tinylm.errors import TinyLMError, did_you_mean


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless its help already says where the default comes from."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default {action.default})"


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and a "did you mean" for a mistyped choice (a command, --tokenizer ...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            raise argparse.ArgumentError(
                action,
                f"invalid choice: {value!r}.{did_you_mean(str(value), choices)} Choose from: {', '.join(choices)}.",
            )


def version_line() -> str:
    """`tinylm --version`: tinylm's version and the PyTorch and Python it runs on."""
    import platform

    import torch

    from tinylm import __version__

    return f"tinylm {__version__} (PyTorch {torch.__version__}, Python {platform.python_version()})"


NAMES = {"learned": "learned positions", "rope": "RoPE", "layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}
NAMES |= {"gelu": "GELU", "swiglu": "SwiGLU", "relu2": "ReLU²"}


def describe_model(cfg: Any) -> str:
    """One line for a ModelConfig, e.g. "LLaMA-style (RoPE, RMSNorm, SwiGLU), 4 layers x 128, 4 heads, context 64"."""
    style = "LLaMA-style" if cfg.position == "rope" else "GPT-style"
    parts = ", ".join(NAMES[v] for v in (cfg.position, cfg.norm, cfg.mlp))
    # the speedrun options, as --set names them
    extras = [x for x in cfg.extras() if not x.startswith("mlp=")]
    parts += f"; {' '.join(extras)}" if extras else ""
    moe = f", {cfg.n_expert} experts (top-{cfg.n_expert_active})" if cfg.n_expert else ""
    return f"{style} ({parts}), {cfg.n_layer} layers x {cfg.n_embd}, {cfg.n_head} heads, context {cfg.block_size}{moe}"


def emit(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    """Print the JSON summary as the last line when --json was given."""
    if getattr(args, "json", False):
        print(json.dumps(summary, default=str))


def add_common(p: argparse.ArgumentParser) -> None:
    """--json, on every command (build_parser adds it to each one)."""
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
    import sys

    from tinylm.runtime import launch_rank
    from tinylm.threads import fit_threads as choose

    choice = choose(args.threads, keep=getattr(args, "keep_cores", 0))
    if choice.auto and launch_rank() == 0:  # under torchrun, rank 0 speaks
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
        'so --stop "\\n\\n" stops at a blank line'
        + (f" (default {d.stop!r})" if d.stop else " (default: none)"),
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed: the same seed gives the same text (default: none, a new text each time)",
    )
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
