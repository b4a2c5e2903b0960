"""Load benchmark of `tinylm serve`: concurrent streaming clients against a real server subprocess.

    python benchmarks/bench_serve.py                      # trains cpu-llama briefly, 32 and 64 clients, 60 s each
    python benchmarks/bench_serve.py --run runs/x --clients 8 --duration 10

For each client count it starts `tinylm serve RUN --max-batch <clients>`, lets that many clients stream
completions back to back for --duration seconds (each request: a Shakespeare prompt, its own seed,
temperature 0.8, 24-40 new tokens), and reports requests/s, tokens/s, p50/p99 time to first token,
p50/p99 time between tokens, errors, and how many streams differ from the same request decoded alone
(`tinylm.generate.generate` in this process, the CLI's path). Then the same load against
`--max-batch 1` (one request at a time) gives the batching speed-up. Rows go to --log as JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
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

    text = (DATA_DIR / "tinyshakespeare" / "input.txt").read_text()
    run = out / "cpu-llama"
    if steps == 0:
        tokenizer = CharTokenizer.train(text)
        model_cfg, train_cfg = build_configs("cpu-llama", vocab_size=tokenizer.vocab_size)
        torch.manual_seed(0)
        RunRecord(model_cfg, train_cfg).write(run, tokenizer)  # random init: no data
        save_checkpoint(run, "last", Transformer(model_cfg).state_dict(), None, {"step": 0})
        return run
    from tinylm.data import prepare

    prepare([str(DATA_DIR / "tinyshakespeare" / "input.txt")], out / "data", "char")
    train(out / "data", run, "cpu-llama", {"max_steps": steps, "eval_interval": steps}, progress=False)
    return run


def start_server(run: Path, port: int, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tinylm", "serve", str(run), "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-queue", "1024", "--model-name", "bench", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
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
        )[0].text
        bad += alone != r.text
    return bad, len(sample)


def measure(run: Path, clients: int, max_batch: int, duration: float, prompts: list[str], args) -> dict:
    port = free_port()
    proc = start_server(run, port, max_batch)
    try:
        rng = random.Random(clients * 1000 + max_batch)
        asyncio.run(drive(f"http://127.0.0.1:{port}", clients, min(5.0, duration), prompts, rng))  # warm up
        start = time.perf_counter()
        records = asyncio.run(drive(f"http://127.0.0.1:{port}", clients, duration, prompts, rng))
        seconds = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    row = {
        "clients": clients,
        "max_batch": max_batch,
        "duration_s": round(seconds, 1),
        **summarize(records, seconds),
    }
    if args.check:
        row["differ_from_alone"], row["checked"] = count_mismatches(run, records, args.check, rng)
    return row


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
        "--clients", type=int, nargs="+", default=[32, 64], help="concurrent clients (default 32 64)"
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="seconds of load per measurement (default 60)"
    )
    parser.add_argument(
        "--serial-duration", type=float, help="seconds for the one-at-a-time run (default --duration)"
    )
    parser.add_argument(
        "--check", type=int, default=400, help="streams compared with generate() alone (0 = off)"
    )
    parser.add_argument(
        "--log", type=Path, default=ROOT / "benchmarks" / "results.jsonl", help="JSON lines log"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    lines = (DATA_DIR / "tinyshakespeare" / "input.txt").read_text().splitlines()
    prompts = sorted({line[:16] for line in lines if 4 <= len(line)})[:2000]
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or prepare_run(Path(tmp), args.train_steps)
        rows = [measure(run, c, c, args.duration, prompts, args) for c in args.clients]
        serial = measure(run, max(args.clients), 1, args.serial_duration or args.duration, prompts, args)
    for row in rows:
        row["speedup_vs_one_at_a_time"] = row["tokens_per_s"] / serial["tokens_per_s"]
    meta = {
        "bench": "serve",
        "date": time.strftime("%Y-%m-%d"),
        "device": f"CPU {platform.machine()} x{os.cpu_count()}",
        "torch": torch.__version__,
        "model": str(args.run)
        if args.run
        else f"cpu-llama, {f'trained {args.train_steps} steps' if args.train_steps else 'random init'} (chars)",
    }
    with args.log.open("a") as log:
        for row in [*rows, serial]:
            full = {**meta, **row}
            print(json.dumps(full))
            log.write(json.dumps(full) + "\n")


if __name__ == "__main__":
    main()
