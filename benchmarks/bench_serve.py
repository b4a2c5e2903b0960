"""Load benchmark of `tinylm serve`: concurrent streaming clients against a real server subprocess,
plus the share of a decode step the engine spends outside the model (Python scheduling).

    python benchmarks/bench_serve.py                      # trains cpu-llama briefly, 16 and 64 clients, 30 s each
    python benchmarks/bench_serve.py --run runs/x --clients 8 --duration 10
    python benchmarks/bench_serve.py --compare /tmp/old/src   # the same, side by side with another checkout

Throughput: for each client count it starts `tinylm serve RUN --max-batch <clients>`, lets that many clients
stream completions back to back for --duration seconds (each request: a Shakespeare prompt, its own seed,
temperature 0.8, top_k 0, 24-40 new tokens), and reports requests/s, tokens/s, p50/p99 time to first token,
p50/p99 time between tokens, errors, and how many streams differ from the same request decoded alone
(`tinylm.generate.generate` in this process, the CLI's path). Then the largest load against `--max-batch 1`
(one request at a time) gives the batching speed-up.

Scheduling share: in a subprocess with one thread, the engine alone (no HTTP) decodes --profile-rows sequences
of --profile-tokens tokens each on a random-init cpu-llama whose context is widened to hold them; the engine
thread's CPU time (`time.thread_time`) inside the model's forward passes against its CPU time for the whole run
gives the share spent outside the model: sampling, bookkeeping, detokenization, events (median of --repeat runs).

With --compare SRC every measurement runs twice, back to back: "before" with PYTHONPATH=SRC (another
checkout's `src`) and "after" with this checkout's `src`; --rounds N repeats the loads, alternating, and
adds "summary" rows with medians. Each load row also has the server process's own CPU time per token
(`/proc`), which a shared host's load changes least. Rows go to --log as JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("TINYLM_DATA_DIR", ROOT.parent / "shared" / "datasets"))
SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"


@dataclass
class Record:
    """One streamed request: what was asked, what came back, and when."""

    prompt: str
    seed: int
    max_tokens: int
    start: float
    text: str = ""
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_run(out: Path, steps: int) -> Path:
    """A cpu-llama run on Tiny Shakespeare's characters: trained for `steps` steps, or random weights (0)."""
    from tinylm.checkpoint import RunRecord, save_checkpoint
    from tinylm.config import build_configs
    from tinylm.model import Transformer
    from tinylm.tokenizer import CharTokenizer
    from tinylm.train import train

    run = out / "cpu-llama"
    if steps == 0:
        tokenizer = CharTokenizer.train(SHAKESPEARE.read_text())
        model_cfg, train_cfg = build_configs("cpu-llama", vocab_size=tokenizer.vocab_size)
        torch.manual_seed(0)
        RunRecord(model_cfg, train_cfg).write(run, tokenizer)  # random init: no data
        save_checkpoint(run, "last", Transformer(model_cfg).state_dict(), None, {"step": 0})
        return run
    from tinylm.data import prepare

    prepare([str(SHAKESPEARE)], out / "data", "char")
    train(out / "data", run, "cpu-llama", {"max_steps": steps, "eval_interval": steps}, progress=False)
    return run


def variant_env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src)}


def start_server(run: Path, port: int, max_batch: int, src: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tinylm", "serve", str(run), "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-queue", "1024", "--model-name", "bench", "--device", "cpu"]
    err = tempfile.TemporaryFile("w+")  # the access log: a file, so a full pipe never blocks the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=variant_env(src))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err.seek(0)
            raise RuntimeError(f"server exited: {err.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


async def one_request(client: httpx.AsyncClient, url: str, rec: Record) -> None:
    body = {
        "model": "bench",
        "prompt": rec.prompt,
        "max_tokens": rec.max_tokens,
        "temperature": 0.8,
        "top_k": 0,
        "seed": rec.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = chunk["error"]["message"]
                    return
                if chunk.get("usage"):
                    rec.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["text"]:
                        rec.chunk_times.append(time.perf_counter())
                        rec.text += choice["text"]
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"


async def drive(
    url: str, clients: int, duration: float, prompts: list[str], rng: random.Random
) -> list[Record]:
    """`clients` loops, each sending streaming requests back to back until `duration` has passed."""
    records: list[Record] = []
    end = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def loop() -> None:
            while time.perf_counter() < end:
                prompt = rng.choice(prompts)
                rec = Record(prompt, rng.randrange(1 << 30), rng.randint(24, 40), time.perf_counter())
                records.append(rec)
                await one_request(client, url, rec)

        await asyncio.gather(*(loop() for _ in range(clients)))
    return records


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(records: list[Record], seconds: float) -> dict:
    ok = [r for r in records if r.error is None and r.chunk_times]
    ttft = [r.chunk_times[0] - r.start for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(ok),
        "errors": sum(r.error is not None for r in records),
        "requests_per_s": len(ok) / seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
        "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
        "token_latency_p50_ms": 1e3 * percentile(gaps, 0.5),
        "token_latency_p99_ms": 1e3 * percentile(gaps, 0.99),
        "first_error": next((r.error for r in records if r.error), None),
    }


def count_mismatches(run: Path, records: list[Record], limit: int, rng: random.Random) -> tuple[int, int]:
    """(streams that differ from the same request decoded alone by generate(), streams checked)."""
    from tinylm.checkpoint import load_run
    from tinylm.generate import generate

    loaded = load_run(run, device="cpu")
    done = [r for r in records if r.error is None and r.tokens == r.max_tokens]  # only finished ones
    sample = done if len(done) <= limit else rng.sample(done, limit)
    bad = 0
    for r in sample:
        alone = generate(
            loaded.model,
            loaded.tokenizer,
            r.prompt,
            max_new_tokens=r.max_tokens,
            temperature=0.8,
            top_k=0,
            top_p=1.0,
            seed=r.seed,
            rolling_cache=loaded.model.cfg.position == "rope",  # the server's rule past the context
        )[0].text
        bad += alone != r.text
    return bad, len(sample)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    run: Path, clients: int, max_batch: int, duration: float, prompts: list[str], src: Path, args
) -> dict:
    port = free_port()
    proc = start_server(run, port, max_batch, src)
    try:
        rng = random.Random(clients * 1000 + max_batch)
        asyncio.run(drive(f"http://127.0.0.1:{port}", clients, min(5.0, duration), prompts, rng))  # warm up
        start, cpu = time.perf_counter(), cpu_seconds(proc.pid)
        records = asyncio.run(drive(f"http://127.0.0.1:{port}", clients, duration, prompts, rng))
        seconds, cpu = time.perf_counter() - start, cpu_seconds(proc.pid) - cpu
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    row = {
        "clients": clients,
        "max_batch": max_batch,
        "duration_s": round(seconds, 1),
        "load_avg_1m": os.getloadavg()[0],
        **summarize(records, seconds),
    }
    # the server's own CPU time per token: what the shared host's load changes least
    row["server_cpu_ms_per_token"] = 1e3 * cpu / max(1, sum(r.tokens for r in records if r.error is None))
    if args.check:
        row["differ_from_alone"], row["checked"] = count_mismatches(run, records, args.check, rng)
    return row


# ----- the scheduling profile (runs in a subprocess, against whichever tinylm is on PYTHONPATH) ----------
def profile_engine(rows: int, tokens: int) -> dict:
    """Engine thread CPU time inside the model vs in all, decoding `rows` sequences of `tokens` tokens (1 thread)."""
    import threading

    from tinylm.config import SampleConfig, build_configs
    from tinylm.model import Transformer
    from tinylm.serve.engine import Engine
    from tinylm.tokenizer import CharTokenizer

    torch.set_num_threads(1)
    text = SHAKESPEARE.read_text()
    tokenizer = CharTokenizer.train(text)
    cfg, _ = build_configs("cpu-llama", vocab_size=tokenizer.vocab_size)
    cfg.block_size = max(cfg.block_size, 16 + tokens)  # room for prompt and tokens inside the context
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    engine = Engine(model, tokenizer, rows, 4 * rows)
    inside = {"cpu": 0.0}
    marks: dict[str, float] = {}

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.thread_time()
            marks.setdefault("cpu0", t0)  # the engine thread, at its first forward pass
            try:
                return fn(*args, **kwargs)
            finally:
                inside["cpu"] += time.thread_time() - t0

        return wrapper

    for name in ("prefill", "decode", "crop"):
        if hasattr(engine.forward, name):
            setattr(engine.forward, name, timed(getattr(engine.forward, name)))
    lines = [line for line in text.splitlines() if len(line) >= 8]
    done = threading.Event()
    finished = [0]

    def sink(event) -> None:
        if event.finish_reason is not None:
            finished[0] += 1
            if finished[0] == rows:
                marks["cpu1"], marks["wall1"] = time.thread_time(), time.perf_counter()
                done.set()

    engine.pause()
    engine.start()
    for i in range(rows):
        sample = SampleConfig(max_new_tokens=tokens, temperature=0.8, top_k=0, top_p=1.0, seed=i)
        engine.submit([tokenizer.encode(lines[i][:12])], [sample], sink)
    wall0 = time.perf_counter()
    engine.resume()
    done.wait(600)
    engine.close()
    steps = engine.stats["steps"]
    total = marks["cpu1"] - marks["cpu0"]
    model_cpu = inside["cpu"]
    return {
        "steps": steps,
        "step_cpu_ms": 1e3 * total / max(1, steps),
        "model_share": model_cpu / total,
        "scheduling_share": 1 - model_cpu / total,
        "wall_tokens_per_s": rows * tokens / (marks["wall1"] - wall0),
    }


def profile(src: Path, args) -> dict:
    """profile_engine in a subprocess with PYTHONPATH=src, --repeat times; medians."""
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run(
            [sys.executable, __file__, "--profile-only", "--profile-rows", str(args.profile_rows)]
            + ["--profile-tokens", str(args.profile_tokens)],
            capture_output=True,
            text=True,
            env=variant_env(src),
            timeout=900,
        )
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ("step_cpu_ms", "model_share", "scheduling_share", "wall_tokens_per_s")
    return {
        "profile_rows": args.profile_rows,
        "profile_tokens": args.profile_tokens,
        "steps": runs[0]["steps"],
        **{k: statistics.median(r[k] for r in runs) for k in keys},
        "scheduling_share_runs": [round(r["scheduling_share"], 4) for r in runs],
        "load_avg_1m": os.getloadavg()[0],
    }


def summaries(loads: list[dict]) -> list[dict]:
    """Per variant and load: medians over the rounds, and the speed-up over one request at a time."""
    keys = (
        "tokens_per_s",
        "requests_per_s",
        "ttft_p50_ms",
        "token_latency_p50_ms",
        "server_cpu_ms_per_token",
    )
    groups: dict[tuple, list[dict]] = {}
    for row in loads:
        groups.setdefault((row["variant"], row["clients"], row["max_batch"]), []).append(row)
    out = []
    for (variant, clients, max_batch), group in groups.items():
        out.append(
            {
                "variant": variant,
                "kind": "summary",
                "clients": clients,
                "max_batch": max_batch,
                "rounds": len(group),
                **{f"median_{k}": statistics.median(r[k] for r in group) for k in keys},
                "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in group],
                "errors": sum(r["errors"] for r in group),
                "differ_from_alone": sum(r.get("differ_from_alone", 0) for r in group),
                "checked": sum(r.get("checked", 0) for r in group),
            }
        )
    for row in out:
        serial = next((s for s in out if s["variant"] == row["variant"] and s["max_batch"] == 1), None)
        if serial and row["max_batch"] > 1:
            row["speedup_vs_one_at_a_time"] = row["median_tokens_per_s"] / serial["median_tokens_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run directory to serve (default: train cpu-llama briefly)")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=150,
        help="steps to train cpu-llama; 0 = random weights (default 150)",
    )
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[16, 64], help="concurrent clients (default 16 64)"
    )
    parser.add_argument(
        "--duration", type=float, default=30.0, help="seconds of load per measurement (default 30)"
    )
    parser.add_argument(
        "--serial-duration", type=float, help="seconds for the one-at-a-time run (default --duration)"
    )
    parser.add_argument(
        "--check", type=int, default=50, help="streams compared with generate() alone (0 = off)"
    )
    parser.add_argument("--compare", type=Path, help="another checkout's src/ to measure side by side")
    parser.add_argument("--profile-rows", type=int, default=16, help="rows of the scheduling profile")
    parser.add_argument("--profile-tokens", type=int, default=200, help="tokens per row in the profile")
    parser.add_argument("--repeat", type=int, default=3, help="profile runs per variant (median)")
    parser.add_argument("--no-load", action="store_true", help="only the scheduling profile")
    parser.add_argument("--no-profile", action="store_true", help="only the load (no scheduling profile)")
    parser.add_argument("--no-serial", action="store_true", help="skip the one-at-a-time run")
    parser.add_argument("--rounds", type=int, default=1, help="load measurements per variant (medians)")
    parser.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--log", type=Path, default=ROOT / "benchmarks" / "results.jsonl", help="JSON lines log"
    )
    args = parser.parse_args()
    if args.profile_only:
        print(json.dumps(profile_engine(args.profile_rows, args.profile_tokens)))
        return
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    variants = [("after", ROOT / "src")]
    if args.compare:
        variants.insert(0, ("before", args.compare.resolve()))
    lines = SHAKESPEARE.read_text().splitlines()
    prompts = sorted({line[:16] for line in lines if 4 <= len(line)})[:2000]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or prepare_run(Path(tmp), args.train_steps)
        for name, src in variants if not args.no_profile else []:
            rows.append({"variant": name, "kind": "profile", **profile(src, args)})
        if not args.no_load:
            loads = [(c, c) for c in args.clients] + ([] if args.no_serial else [(max(args.clients), 1)])
            for round_no in range(args.rounds):  # variants alternate, so each sees the same host load
                for clients, max_batch in loads:
                    for name, src in variants:
                        duration = (
                            args.serial_duration if max_batch == 1 and args.serial_duration else args.duration
                        )
                        row = measure(run, clients, max_batch, duration, prompts, src, args)
                        rows.append({"variant": name, "kind": "load", "round": round_no, **row})
            rows += summaries([r for r in rows if r["kind"] == "load"])
    meta = {
        "bench": "serve",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": f"CPU {platform.machine()} x{os.cpu_count()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": str(args.run)
        if args.run
        else f"cpu-llama, {f'trained {args.train_steps} steps' if args.train_steps else 'random init'} (chars)",
    }
    with args.log.open("a") as log:
        for row in rows:
            full = {**meta, **row}
            print(json.dumps(full))
            log.write(json.dumps(full) + "\n")


if __name__ == "__main__":
    main()
