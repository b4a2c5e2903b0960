"""The README walk: every quickstart command runs as written, in order, in a fresh shell, and exits 0.

Convention (so the README cannot drift from the CLI again):
- Walked: every ```bash and ```python block under a heading that contains "Quickstart" (any level; a
  "## Quickstart" heading covers its "###" subsections). A new quickstart is picked up without editing this file.
- The walk is one `bash` process started with a fresh environment: no TINYLM_DATA_DIR, no virtualenv on
  PATH (HOME, PYTHONPATH, caches and the offline switches pass through). It first runs the README's one
  setup line (`source .venv/bin/activate`, with `.venv` the repository's, or the virtualenv running these
  tests), then every command as written, in order, in one scratch directory, so a later command uses what an
  earlier one wrote (runs/, data/) and `$TINYLM_DATA_DIR` is whatever the setup line made it.
- Each bash line is one command (`\\` continues a line; `# ...` comments are dropped); a python block runs
  as `python - <<EOF`. Any program may appear: one that is not on PATH after the setup line (e.g. llama.cpp's
  `llama-simple`, built by scripts/setup_test_extras.sh) is skipped with that reason.
- Short versions: SHORTEN rewrites long work (training steps and batch, generated tokens; the quickstarts'
  files under $TINYLM_DATA_DIR become excerpts of themselves: the first 100,000 characters of Tiny
  Shakespeare, 20,000 of WikiText-2's test file) and APPEND adds `--max-steps 4` / `--max-new-tokens 12`
  where a command has none; the README shows the real command and states what the full run takes and reaches.
- Skipped, with the reason in the test report: commands matching SKIP (network, long-running servers,
  interactive loops, the make targets that run this suite).
- Everything the walk writes must be ignored by the repository's .gitignore (runs/, data/, hf/).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WALK_TIMEOUT = 1800  # seconds for the whole walk; about 2 minutes on an idle 2-core machine

# (pattern, replacement): long work made short. Applied in order to each command.
SHORTEN: list[tuple[str, str]] = [
    (r"--epochs \d+", "--max-steps 4"),  # one epoch is minutes; four steps exercise the same path
    (r"--max-steps \d+", "--max-steps 4"),
    (r"(?<=tinylm train )", "--set eval_interval=4 --set eval_batches=2 --batch-size 4 "),
    (r"--max-new-tokens \d+", "--max-new-tokens 12"),
    (r"--num-samples \d+", "--num-samples 1"),
    (r"(?<=llama-simple )(.*)-n \d+", r"\1-n 12"),
    (r'"max_steps": \d+', '"max_steps": 4'),
    (r"max_new_tokens=\d+", "max_new_tokens=12"),
    (r"--limit \d+", "--limit 2"),
    # Whole corpora make every eval minutes long: the walk reads excerpts of the same files, found through
    # the same $TINYLM_DATA_DIR (so a missing setup still fails here).
    (r"(\$TINYLM_DATA_DIR/wikitext-2/test\.txt)", r'"$(excerpt "\1" 20000)"'),
    (r"(\$TINYLM_DATA_DIR/tinyshakespeare/input\.txt)", r'"$(excerpt "\1" 100000)"'),
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
    (r"^tinylm chat", "an interactive loop; tested on a pseudo-terminal in test_chat.py"),
    (r"^curl ", "talks to `tinylm serve`, which the walk does not start; the API is tested in test_serve.py"),
    (r"^torchrun", "multi-process training; tested with gloo in test_distributed.py"),
    (r"^make ", "make targets set up .venv and run this suite (make test) or the full demo"),
    (r"^(pip|cd) ", "shell setup that would leave the walk's directory or install packages"),
]
SETUP_LINE = re.compile(r"^source \.venv/bin/activate$")


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
SETUP = [s for s in STEPS if s[1] == "bash" and SETUP_LINE.match(s[2])]
COMMANDS = [s for s in STEPS if s not in SETUP]


def test_the_walk_finds_the_quickstarts_and_one_setup_line():
    headings = {h for h, _, _ in STEPS}
    assert len(headings) >= 4 and len(STEPS) >= 12, "the README's quickstart headings were renamed?"
    assert len(SETUP) == 1, "the README's Quickstart section should give its one setup line in a bash block"


def _venv() -> Path | None:
    """The virtualenv the setup line activates: the repository's .venv, else the one running the tests."""
    if (ROOT / ".venv" / "bin" / "activate").is_file():
        return ROOT / ".venv"
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").is_file():
        return Path(sys.prefix)
    return None


def _fresh_env() -> dict[str, str]:
    """A new login's environment: no TINYLM_DATA_DIR and no virtualenv on PATH."""
    keep = ("HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "TINYLM_CACHE", "XDG_CACHE_HOME")
    keep += ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p]
    env["PATH"] = os.pathsep.join(p for p in path if not (Path(p) / "activate").is_file())
    return env


EXCERPT = r"""
excerpt() {  # excerpt FILE CHARS: the first CHARS characters of FILE, written beside the walk; prints the path
  if [ ! -f "$1" ]; then echo "excerpt: $1 does not exist (is TINYLM_DATA_DIR set?)" >&2; return 1; fi
  python - "$1" "$2" "$WALK_EXCERPTS" <<'WALK_PY'
import pathlib, sys
src, n, out = pathlib.Path(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
out = out / f"{src.parent.name}-{src.name}"
out.write_text(src.read_text(encoding="utf-8")[:n], encoding="utf-8")
print(out)
WALK_PY
}
"""


def _script(venv: Path, results: Path) -> str:
    """The bash script of the whole walk: the setup line, then each command with its output and status."""
    activate = shlex.quote(str(venv / "bin" / "activate"))  # the setup line, with .venv found as above
    lines = ["set +e", EXCERPT, f"{{ source {activate}\n}} > {results}/setup.out 2>&1"]
    lines.append(f'echo "$?" > {results}/setup.rc; echo "$TINYLM_DATA_DIR" > {results}/setup.data_dir')
    lines.append(f"command -v tinylm > {results}/setup.tinylm")
    for n, (_, kind, command) in enumerate(COMMANDS):
        out, rc, skip = (f"{results}/{n}.{ext}" for ext in ("out", "rc", "skip"))
        if kind == "python":
            body = f"python - <<'README_PY'\n{shorten(command)}\nREADME_PY"
        elif reason := skip_reason(command):
            lines.append(f"echo {shlex.quote(reason)} > {skip}")
            continue
        else:
            body = shorten(command)
            program = shlex.split(body)[0]
            if "=" not in program and program not in ("tinylm", "python", "export"):
                reason = (
                    f"{program} is not on PATH after the setup line (scripts/setup_test_extras.sh builds it)"
                )
                lines.append(
                    f"if ! command -v {program} >/dev/null; then echo {shlex.quote(reason)} > {skip}; else"
                )
                lines.append(f"{{ {body}\n}} > {out} 2>&1 < /dev/null; echo $? > {rc}; fi")
                continue
        lines.append(f"{{ {body}\n}} > {out} 2>&1 < /dev/null; echo $? > {rc}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Run the whole walk once: (scratch directory the commands ran in, folder of per-step results)."""
    venv = _venv()
    if venv is None:
        pytest.skip(
            "the tests do not run in a virtualenv and the repository has no .venv: nothing to activate"
        )
    base = tmp_path_factory.mktemp("readme_walk")
    workdir, results, excerpts = base / "repo", base / "results", base / "excerpts"
    for d in (workdir, results, excerpts):
        d.mkdir()
    env = {**_fresh_env(), "WALK_EXCERPTS": str(excerpts)}
    script = _script(venv, results)
    (results / "walk.sh").write_text(script)
    try:
        subprocess.run(
            ["bash", "--norc", "--noprofile", str(results / "walk.sh")],
            cwd=workdir,
            env=env,
            timeout=WALK_TIMEOUT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
    except subprocess.TimeoutExpired:
        pass  # the steps that did not finish say so
    return workdir, results


def test_the_setup_line_sets_up_the_shell(walk):
    _, results = walk
    out = (results / "setup.out").read_text()
    assert (results / "setup.rc").read_text().strip() == "0", out
    tinylm = (results / "setup.tinylm").read_text().strip()
    assert tinylm and Path(tinylm).parent == _venv() / "bin", f"tinylm is not the virtualenv's: {tinylm!r}"
    data_dir = (results / "setup.data_dir").read_text().strip()
    assert data_dir, (
        f"`{SETUP[0][2]}` left TINYLM_DATA_DIR unset: scripts/setup.sh writes it into .venv/bin/activate; re-run it"
    )


def _id(step: tuple[str, str, str]) -> str:
    return f"{step[0].split(' > ')[-1][:40]}: {step[2].splitlines()[0][:60]}"


@pytest.mark.parametrize("n", range(len(COMMANDS)), ids=[_id(s) for s in COMMANDS])
def test_readme_command(n: int, walk) -> None:
    heading, _, command = COMMANDS[n]
    _, results = walk
    if (results / f"{n}.skip").is_file():
        pytest.skip((results / f"{n}.skip").read_text().strip())
    rc_file, out_file = results / f"{n}.rc", results / f"{n}.out"
    assert rc_file.is_file(), (
        f"README ({heading}) command did not run (the walk stopped before it):\n  {command}"
    )
    out = out_file.read_text(errors="replace")
    assert rc_file.read_text().strip() == "0", (
        f"README ({heading}) command failed in a fresh shell after the setup line:\n  {command}\n"
        f"ran as:\n  {shorten(command)}\n{out[-4000:]}"
    )


def test_the_quickstarts_write_only_ignored_paths(walk):
    workdir, _ = walk
    written = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file())
    assert written, "the walk wrote nothing?"
    try:
        ignored = subprocess.run(
            ["git", "-C", str(ROOT), "check-ignore", "--no-index", "--stdin"],
            input="\n".join(written),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:
        pytest.skip("needs git")
    if ignored.returncode not in (0, 1):
        pytest.skip(f"git check-ignore cannot run here: {ignored.stderr.strip()}")
    assert sorted(set(written) - set(ignored.stdout.splitlines())) == []


def test_llama_cpp_prints_the_continuation(walk):
    """The GGUF quickstart's llama.cpp line shows the model's text: the prompt, then what the model wrote."""
    steps = [n for n, (_, _, c) in enumerate(COMMANDS) if c.startswith("llama-simple ")]
    assert steps, "the GGUF quickstart no longer runs its file in llama.cpp"
    _, results = walk
    for n in steps:
        if (results / f"{n}.skip").is_file():
            pytest.skip((results / f"{n}.skip").read_text().strip())
        prompt = [a for a in shlex.split(COMMANDS[n][2]) if not a.startswith("2>")][-1]  # the last argument
        out = (results / f"{n}.out").read_text(errors="replace")
        assert prompt and prompt in out, out[-2000:]
        # the walk's 4-step model may write only newlines: what counts is that llama.cpp generated tokens
        assert out.split(prompt, 1)[1], f"llama-simple printed the prompt and nothing after it:\n{out}"
