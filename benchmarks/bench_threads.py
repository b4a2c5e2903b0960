"""CPU threads on an idle and on a busy machine: tinylm's own choice against 1 thread and one per core.

    python benchmarks/bench_threads.py                      # idle and loaded, 3 models x train/eval/generate/serve
    python benchmarks/bench_threads.py --scenarios loaded --reps 3 --models cpu-llama

Every command is a real `tinylm` subprocess timed from process start to exit (wall seconds; `serve`: from
process start until it has answered SERVE_REQUESTS completions, one after another, over HTTP), run as
three variants: `OMP_NUM_THREADS=1`, `OMP_NUM_THREADS=<cores>` (PyTorch's default, what tinylm did before
issue 22) and tinylm's own choice (no variable set). "loaded" starts one CPU-bound process per core
(`python -c "while True: pass"`) beside them for the whole scenario: a reproducible stand-in for a
busy laptop. The variants take turns (rotated each repetition), so a slow phase of the host hits each.
Medians per (scenario, model, command, variant) and the ratios the issue asks for are printed as a
Markdown table; every run is also appended as a JSON line to --log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
VARIANTS = {"1 thread": "1", f"{CORES} threads": str(CORES), "tinylm auto": None}

# Each model: the preset, how its data is prepared (the tutorials' own), and the sizes of the timed commands.
MODELS = {
    "cpu-llama": dict(data="char", train_steps=40, new_tokens=300),
    "seed-char-moe": dict(data="char", train_steps=15, new_tokens=300),
    "mini-gpt": dict(data="wikitext-bpe", train_steps=4, new_tokens=100),
}
PREPARE = {
    "char": ["shakespeare", "--tokenizer", "char"],
    "wikitext-bpe": ["{datasets}/wikitext-2/valid.txt", "--tokenizer", "bpe", "--vocab-size", "8192"],
}


def tinylm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m tinylm ARGS` with this checkout's sources first on the path."""
    paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    full = {**base, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **(env or {})}
    return subprocess.run([sys.executable, "-m", "tinylm", *args], capture_output=True, text=True, env=full)


def checked(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if out.returncode:
        raise SystemExit(f"command failed ({out.returncode}): {out.args}\n{out.stderr[-2000:]}")
    return out


def setup(workdir: Path, models: list[str]) -> dict[str, dict[str, str]]:
    """Prepare each model's data once and train a short run of it to evaluate and sample from."""
    datasets = os.environ.get("TINYLM_DATA_DIR", str(ROOT.parent / "shared" / "datasets"))
    one = {"OMP_NUM_THREADS": "1"}
    paths: dict[str, dict[str, str]] = {}
    for name in models:
        kind = MODELS[name]["data"]
        data = workdir / kind
        if not (data / "meta.json").is_file():
            argv = [a.format(datasets=datasets) for a in PREPARE[kind]]
            checked(tinylm("prepare", *argv, "--out", str(data), env=one))
        run = workdir / f"run-{name}"
        if not (run / "checkpoints" / "last").is_dir():
            checked(tinylm(*train_args(name, data, run, 2), env=one))
        paths[name] = {"data": str(data), "run": str(run)}
    return paths


def train_args(model: str, data: Path | str, out: Path | str, steps: int) -> list[str]:
    return [
        "train", "--data", str(data), "--preset", model, "--out", str(out), "--max-steps", str(steps),
        "--set", f"eval_interval={steps}", "--set", "eval_batches=2", "--no-progress",
    ]  # fmt: skip


def command(model: str, what: str, paths: dict[str, str], scratch: Path) -> list[str]:
    """The timed command line of `what` (train, eval, generate) for `model`."""
    spec = MODELS[model]
    if what == "train":
        return train_args(model, paths["data"], scratch / "train", spec["train_steps"])
    if what == "eval":
        return ["eval", paths["run"], "--no-progress"]
    return [
        "generate", paths["run"], "--prompt", "The", "--max-new-tokens", str(spec["new_tokens"]),
        "--seed", "1", "--no-progress",
    ]  # fmt: skip


@contextmanager
def load(kind: str):
    """One CPU-bound Python process per core for the scenario "loaded"; nothing for "idle"."""
    procs = []
    if kind == "loaded":
        spin = [sys.executable, "-c", "while True: pass"]
        procs = [subprocess.Popen(spin) for _ in range(CORES)]
        time.sleep(1.0)
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


SERVE_REQUESTS = 4  # completions per timed `serve`, one after another


def serve_argv(paths: dict[str, str]) -> list[str]:
    return ["serve", paths["run"], "--port", str(free_port()), "--model-name", "bench", "--no-access-log"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_serve(argv: list[str], threads: str | None, new_tokens: int) -> tuple[float, float, str]:
    """`tinylm serve` from process start until it has answered SERVE_REQUESTS completions of `new_tokens`
    tokens, one after another (wall seconds), its CPU seconds, and the thread choice it printed."""
    import urllib.request

    port = argv[argv.index("--port") + 1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = threads
    before = children_cpu()
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "tinylm", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while True:  # until it answers /health
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"tinylm serve exited: {server.stderr.read()[-2000:]}") from None
                time.sleep(0.05)
        body = json.dumps({"model": "bench", "prompt": "The", "max_tokens": new_tokens, "seed": 1}).encode()
        for _ in range(SERVE_REQUESTS):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
            )
            json.loads(urllib.request.urlopen(request, timeout=600).read())
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        _, err = server.communicate(timeout=60)
    return wall, children_cpu() - before, choice_line(err)


def timed(argv: list[str], threads: str | None, scratch: Path) -> tuple[float, float, str]:
    """Wall seconds of one command from process start to exit, its CPU seconds (user + system, all its
    threads: spinning counts), and the thread choice it printed."""
    import shutil

    shutil.rmtree(scratch / "train", ignore_errors=True)
    env = {"OMP_NUM_THREADS": threads} if threads else {}
    before = children_cpu()
    t0 = time.perf_counter()
    out = checked(tinylm(*argv, env=env))
    wall = time.perf_counter() - t0
    return wall, children_cpu() - before, choice_line(out.stderr)


def children_cpu() -> float:
    """CPU seconds (user + system, all threads: spinning counts) of this process's finished children."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def choice_line(stderr: str) -> str:
    """The "threads: ..." line a tinylm command printed ("" when the user chose)."""
    return next((line for line in stderr.splitlines() if line.startswith("threads: ")), "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument(
        "--commands", nargs="+", default=["train", "eval", "generate", "serve"],
        choices=["train", "eval", "generate", "serve"],
    )  # fmt: skip
    p.add_argument("--scenarios", nargs="+", default=["idle", "loaded"], choices=["idle", "loaded"])
    p.add_argument(
        "--reps", type=int, default=3, help="repetitions of each (scenario, model, command, variant)"
    )
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="default: all three"
    )
    p.add_argument("--workdir", default="/tmp/tinylm-bench-threads")
    p.add_argument("--log", default=str(Path(__file__).with_name("results.jsonl")))
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # so the load processes are stopped on kill too
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = setup(workdir, args.models)
    scratch = Path(tempfile.mkdtemp(dir=workdir))
    times: dict[tuple, list[float]] = {}
    for scenario in args.scenarios:
        with load(scenario):
            for rep in range(args.reps):
                for model in args.models:
                    for what in args.commands:
                        names = list(args.variants)
                        names = names[rep % len(names) :] + names[: rep % len(names)]  # rotate the order
                        for variant in names:
                            if what == "serve":
                                argv = serve_argv(paths[model])
                                new_tokens = MODELS[model]["new_tokens"]
                                wall, cpu, said = timed_serve(argv, VARIANTS[variant], new_tokens)
                            else:
                                argv = command(model, what, paths[model], scratch)
                                wall, cpu, said = timed(argv, VARIANTS[variant], scratch)
                            times.setdefault((scenario, model, what, variant), []).append(wall)
                            log_row(args.log, scenario, model, what, variant, wall, cpu, said)
    print_table(times, args)


def log_row(
    log: str, scenario: str, model: str, what: str, variant: str, wall: float, cpu: float, said: str
) -> None:
    row = {
        "date": str(date.today()),
        "bench": "threads",
        "device": f"CPU {platform.processor() or platform.machine()} x{CORES}",
        "scenario": scenario,
        "model": model,
        "command": what,
        "variant": variant,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "choice": said,
        "load_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(row), flush=True)
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")


def print_table(times: dict[tuple, list[float]], args: argparse.Namespace) -> None:
    """Median wall seconds per variant; auto against 1 thread (busy target <= 1.2x) and against the best."""
    one, _, auto = VARIANTS
    cols = list(args.variants)
    print(f"\n| scenario | model | command | {' | '.join(cols)} | auto / 1 thread | auto / best |")
    print("|---|---|---|" + "---|" * len(cols) + "---|---|")
    for scenario in args.scenarios:
        for model in args.models:
            for what in args.commands:
                med = {v: statistics.median(times[(scenario, model, what, v)]) for v in cols}
                best = min(med.values())
                ratio = {
                    "1": f"{med[auto] / med[one]:.2f}x" if auto in med and one in med else "-",
                    "best": f"{med[auto] / best:.2f}x" if auto in med else "-",
                }
                print(
                    f"| {scenario} | {model} | {what} | {' | '.join(f'{med[v]:.1f}' for v in cols)} | "
                    f"{ratio['1']} | {ratio['best']} |"
                )


if __name__ == "__main__":
    main()
