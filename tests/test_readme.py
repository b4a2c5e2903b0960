"""The README walk: every command in the README's quickstarts runs, in order, and exits 0.

Convention (so the README cannot drift from the CLI again):
- Walked: every ```bash and ```python block under a heading that contains "Quickstart" (any level; a
  "## Quickstart" heading covers its "###" subsections). A new quickstart is picked up without editing this file.
- Each bash line is one command (`\\` continues a line; `# ...` comments are dropped); `$TINYLM_DATA_DIR`
  and other variables are expanded. Commands run one after another in one scratch directory, so a later
  command uses what an earlier one wrote (runs/, data/). `tinylm ...` runs through the console script's
  entry point, `tinylm.cli.main(argv)`, in the test process (no interpreter start per command).
- Short versions: SHORTEN rewrites long work (training steps and batch, generated tokens, whole corpora:
  the first 100,000 characters of Tiny Shakespeare and 20,000 of WikiText-2's test file stand in for them)
  and APPEND adds `--max-steps 4` / `--max-new-tokens 12` where a command has none; the README shows the
  real command and states what the full run takes and reaches.
- Skipped, with the reason in the test report: commands matching SKIP (network, long-running servers,
  interactive loops, the make targets that run this suite). Any other command that is not `tinylm ...`
  fails the walk until it is added to SKIP or made runnable.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from tinylm.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# (pattern, replacement): long work made short. Applied in order to each command.
SHORTEN: list[tuple[str, str]] = [
    (r"--epochs \d+", "--max-steps 4"),  # one epoch is minutes; four steps exercise the same path
    (r"--max-steps \d+", "--max-steps 4"),
    (r"(?<=tinylm train )", "--set eval_interval=4 --set eval_batches=2 --batch-size 4 "),
    (r"--max-new-tokens \d+", "--max-new-tokens 12"),
    (r"--num-samples \d+", "--num-samples 1"),
    (r'"max_steps": \d+', '"max_steps": 4'),
    (r"max_new_tokens=\d+", "max_new_tokens=12"),
    (r"--limit \d+", "--limit 2"),
    # Whole corpora make every eval minutes long; the walk uses excerpts written by the `workdir` fixture.
    (r"\$TINYLM_DATA_DIR/wikitext-2/test\.txt", "wikitext2-test-excerpt.txt"),
    (r"\$TINYLM_DATA_DIR/tinyshakespeare/input\.txt", "shakespeare-excerpt.txt"),
    (r"(?<=prepare )shakespeare\b", "shakespeare-excerpt.txt"),
    (r'\["shakespeare"\]', '["shakespeare-excerpt.txt"]'),
]
# Commands that run long without any of the flags above get one (the preset's default run is minutes).
APPEND: list[tuple[str, str]] = [
    (r"^tinylm (train|finetune) (?!.*--max-steps)", " --max-steps 4"),
    (r"^tinylm (generate|complete|story|ask) (?!.*--max-new-tokens)", " --max-new-tokens 12"),
]

# (pattern, reason): commands the walk does not run.
SKIP: list[tuple[str, str]] = [
    (r"\bhf:", "needs the network (Hugging Face hub); the offline error is tested in test_hub.py"),
    (
        r"--tokenizer gpt2",
        "needs the network or a cached GPT-2 tokenizer; offline error tested in test_hub.py",
    ),
    (
        r"^tinylm harness",
        "downloads harness tasks from the network; a local task is tested in test_harness.py",
    ),
    (r"^tinylm serve", "a long-running server; tested with a real port in its own tests"),
    (r"^tinylm chat", "an interactive loop; tested in test_apps.py"),
    (r"^curl ", "talks to `tinylm serve`, which the walk does not start; the API is tested in test_serve.py"),
    (r"^torchrun", "multi-process training; tested with gloo in test_distributed.py"),
    (r"^make ", "make targets set up .venv and run this suite (make test) or the full demo"),
    (r"^(source|pip|cd|export) ", "shell setup, not a tinylm command"),
]


def _sections(text: str) -> list[tuple[str, str, str]]:
    """(heading path, language, code) for each fenced block, the heading path joined by ' > '."""
    blocks, headings, lang, code = [], [], None, []
    for line in text.splitlines():
        if lang is None and (m := re.match(r"^(#{1,6}) (.*)", line)):
            headings = headings[: len(m.group(1)) - 1] + [m.group(2).strip()]
        elif lang is None and (m := re.match(r"^```(\w+)\s*$", line)):
            lang, code = m.group(1), []
        elif lang is not None and line.startswith("```"):
            blocks.append((" > ".join(h for h in headings if h), lang, "\n".join(code)))
            lang = None
        elif lang is not None:
            code.append(line)
    return blocks


def _bash_commands(code: str) -> list[str]:
    """One string per command: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a comment starts at a '#' after whitespace
        if line:
            out.append(line)
    return out


def readme_steps() -> list[tuple[str, str, str]]:
    """(heading, kind, command) for each quickstart command in README order; kind is bash or python."""
    steps = []
    for heading, lang, code in _sections(README.read_text(encoding="utf-8")):
        if "quickstart" not in heading.lower():
            continue
        if lang == "bash":
            steps += [(heading, "bash", c) for c in _bash_commands(code)]
        elif lang == "python":
            steps.append((heading, "python", code))
    return steps


def shorten(command: str) -> str:
    """The walk's short version of a README command."""
    for pattern, replacement in SHORTEN:
        command = re.sub(pattern, replacement, command)
    for pattern, extra in APPEND:
        if re.search(pattern, command):
            command += extra
    return command


def skip_reason(command: str) -> str | None:
    """Why the walk does not run `command`, or None."""
    for pattern, reason in SKIP:
        if re.search(pattern, command):
            return reason
    return None


STEPS = readme_steps()


def test_the_walk_finds_the_quickstarts():
    headings = {h for h, _, _ in STEPS}
    assert len(headings) >= 4 and len(STEPS) >= 12, "the README's quickstart headings were renamed?"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("readme_walk")
    data = Path(os.environ["TINYLM_DATA_DIR"])
    for source, excerpt, size in [
        (data / "wikitext-2" / "test.txt", "wikitext2-test-excerpt.txt", 20_000),
        (data / "tinyshakespeare" / "input.txt", "shakespeare-excerpt.txt", 100_000),
    ]:
        (path / excerpt).write_text(source.read_text(encoding="utf-8")[:size], encoding="utf-8")
    return path


def _id(step: tuple[str, str, str]) -> str:
    return f"{step[0].split(' > ')[-1][:40]}: {step[2].splitlines()[0][:60]}"


@pytest.mark.parametrize("step", STEPS, ids=[_id(s) for s in STEPS])
def test_readme_command(step: tuple[str, str, str], workdir: Path, monkeypatch, capsys) -> None:
    heading, kind, command = step
    monkeypatch.chdir(workdir)
    if kind == "python":
        exec(compile(shorten(command), f"README ({heading})", "exec"), {})
        return
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    assert command.startswith("tinylm "), f"{command!r} is not a tinylm command; run it or add it to SKIP"
    argv = shlex.split(os.path.expandvars(shorten(command)))[1:]
    code = main(argv)  # the console script's entry point, in this process (no interpreter start per command)
    out, err = capsys.readouterr()
    assert code == 0, (
        f"README ({heading}) command failed with status {code}:\n  {command}\nran as: tinylm {shlex.join(argv)}\n"
        f"{out[-2000:]}\n{err[-3000:]}"
    )
