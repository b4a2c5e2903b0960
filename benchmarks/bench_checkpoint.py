"""Checkpoint save time and peak host memory for a model of a few hundred million parameters on CPU.

Each case runs in fresh processes (gloo, one thread each): the model is built (sharded under FSDP), one AdamW
step gives it optimizer state, then `last` is saved REPEATS times. Per save and per process it records:
  blocking  seconds until save() returns (what training waits for; all of it for a synchronous save)
  total     seconds until the checkpoint is durable and in place (save() + wait())
  peak      the process's peak RSS during the save (VmHWM, reset just before it), and how much above its RSS
            before the save that is (the model, gradients-free, and its AdamW state are already resident)
Cases: one process writing single files (model.safetensors + state.pt, as before), two FSDP processes
gathering the whole state to rank 0 (how sharded runs saved before #20), and DCP (each rank its shards)
with one and two processes; synchronous and --async-save.

    python benchmarks/bench_checkpoint.py                       # 252M parameters: 16 x 1024, GPT-2 vocabulary
    python benchmarks/bench_checkpoint.py --layers 2 --width 128 --repeats 1   # a smoke run in seconds
    python benchmarks/bench_checkpoint.py --device cuda --processes 8 --cases 5,6,7   # GPUs (gloo + NCCL)

Writes under --dir (default /tmp/dist-bench, removed at the end); prints a markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tinylm import runtime as rt  # noqa: E402
from tinylm.checkpoint import RunRecord, save_checkpoint  # noqa: E402
from tinylm.checkpointer import Checkpointer, TrainingParts  # noqa: E402
from tinylm.config import ModelConfig, TrainConfig  # noqa: E402
from tinylm.optim import build_optimizer  # noqa: E402
from tinylm.train import build_model  # noqa: E402

# (name, processes: 1 or --processes, how, async)
CASES = [
    ("1 process, single files", 1, "files", False),
    ("1 process, single files, --async-save", 1, "files", True),
    ("1 process, DCP", 1, "dcp", False),
    ("1 process, DCP, --async-save", 1, "dcp", True),
    ("{n} processes FSDP, whole state via rank 0 (before)", 0, "gather", False),
    ("{n} processes FSDP, DCP", 0, "dcp", False),
    ("{n} processes FSDP, DCP, --async-save", 0, "dcp", True),
]


def _kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1])


def _gather_and_write(parts: TrainingParts, run_dir: Path) -> None:
    """The save of sharded runs before #20: whole weights and optimizer gathered, rank 0 writes them."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(parts.model, options=options)
    optim = get_optimizer_state_dict(parts.model, parts.optimizer, options=options)
    if parts.runtime.is_main:
        save_checkpoint(run_dir, "last", weights, {"optimizer": optim, "step": 1}, {"step": 1})


def _worker(rank: int, world: int, port: int, args: dict, how: str, background: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    runtime = rt.setup(args["device"], "fp32", seed=0)
    sharded = world > 1
    model_cfg = ModelConfig(
        vocab_size=args["vocab"], block_size=64, n_layer=args["layers"], n_head=16, n_embd=args["width"]
    )
    record = RunRecord(model_cfg, TrainConfig(fsdp=sharded))
    t0 = time.perf_counter()
    model, _ = build_model(record, runtime, fsdp=sharded)
    build_s = time.perf_counter() - t0
    optimizer = build_optimizer(model, record.train)
    for p in model.parameters():  # one step with random gradients: AdamW's moments exist
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parts = TrainingParts(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), runtime, how == "dcp")
    run_dir = Path(args["dir"]) / "run"
    saver = Checkpointer(run_dir, parts, async_save=background)
    rows = []
    for _ in range(args["repeats"]):
        rt.barrier(runtime)
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak-RSS count here
        rss = _kb("VmRSS")
        t0 = time.perf_counter()
        if how == "gather":
            _gather_and_write(parts, run_dir)
        else:
            saver.save("last", {"step": 1}, {"step": 1})
        blocking = time.perf_counter() - t0
        saver.wait()
        total = time.perf_counter() - t0
        peak = _kb("VmHWM")
        row = {"blocking": blocking, "total": total, "peak_mb": peak / 1024, "added_mb": (peak - rss) / 1024}
        if runtime.device.type == "cuda":
            row["gpu_gb"] = torch.cuda.max_memory_allocated(runtime.device) / 2**30
        rows.append(row)
        rt.barrier(runtime)
        if runtime.is_main:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    saver.close()
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    result = {
        "rank": rank,
        "rows": rows,
        "build_s": build_s,
        "params_held": held,
        "rss_mb": _kb("VmRSS") / 1024,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    rt.teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(world: int, how: str, background: bool, args: dict) -> list[dict]:
    """Every rank's results of one case (fresh processes)."""
    out = Path(args["dir"]) / "results"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    mp.spawn(_worker, args=(world, _free_port(), args, how, background, str(out)), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def summarize(name: str, ranks: list[dict]) -> dict:
    """Medians over repeats: the slowest rank's times, and peak memory per process and over all processes."""
    repeats = len(ranks[0]["rows"])

    def median(key: str, combine) -> float:
        return statistics.median(combine(r["rows"][i][key] for r in ranks) for i in range(repeats))

    return {
        "case": name,
        "processes": len(ranks),
        "blocking_s": median("blocking", max),
        "total_s": median("total", max),
        "peak_mb_per_process": median("peak_mb", max),
        "peak_mb_all": median("peak_mb", sum),
        "added_mb_per_process": median("added_mb", max),
        "added_mb_all": median("added_mb", sum),
        "build_s": max(r["build_s"] for r in ranks),
        "rss_mb_per_process": max(r["rss_mb"] for r in ranks),
    }


def _device(device: str, cpu: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return f"{platform.machine()} {cpu}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default="/tmp/dist-bench")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (one GPU per process)")
    p.add_argument("--processes", type=int, default=2, help="processes of the FSDP cases (default 2)")
    p.add_argument("--cases", help="comma-separated case numbers (1-based) to run; default all")
    args = vars(p.parse_args())
    Path(args["dir"]).mkdir(parents=True, exist_ok=True)
    chosen = [CASES[int(i) - 1] for i in args["cases"].split(",")] if args["cases"] else CASES
    cfg = ModelConfig(
        vocab_size=args["vocab"], block_size=64, n_layer=args["layers"], n_head=16, n_embd=args["width"]
    )
    with torch.device("meta"):
        from tinylm.model import Transformer

        n = sum(p.numel() for p in Transformer(cfg).parameters())
    state_gb = n * 4 * 3 / 1e9  # weights + two AdamW moments, fp32
    results = []
    try:
        for name, world, how, background in chosen:
            world = world or args["processes"]
            name = name.format(n=args["processes"])
            print(f"bench_checkpoint: {name} ...", file=sys.stderr, flush=True)
            results.append(summarize(name, run_case(world, how, background, args)))
    finally:
        shutil.rmtree(args["dir"], ignore_errors=True)
    load = os.getloadavg()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next(
        (line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?"
    )
    print(
        f"\n{n / 1e6:.0f}M parameters ({args['layers']} x {args['width']}, vocabulary {args['vocab']}, tied), "
        f"{state_gb:.2f} GB of weights + AdamW state; {_device(args['device'], model_name)}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}, load average {load[0]:.1f}; median of {args['repeats']} saves\n"
    )
    print(
        "| case | blocks training | until in place | peak RSS per process (added by the save) | all processes |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['blocking_s']:.2f} s | {r['total_s']:.2f} s | {r['peak_mb_per_process']:,.0f} MB "
            f"(+{r['added_mb_per_process']:,.0f}) | {r['peak_mb_all']:,.0f} MB (+{r['added_mb_all']:,.0f}) |"
        )
    print(json.dumps({"params": n, "results": results, "load": load}))


if __name__ == "__main__":
    main()
