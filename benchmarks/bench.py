"""Side-by-side benchmarks: tinylm against Hugging Face transformers, in one process, same work.

    python benchmarks/bench.py --quick                 # < 2 minutes on a 2-core CPU
    python benchmarks/bench.py train --preset gpt2-small --batch-size 16 --compile   # on a GPU
    python benchmarks/bench.py generate --preset shakespeare-char
    python benchmarks/bench.py moe
    python benchmarks/bench.py quality --preset cpu-char --target 1.88

Every figure printed is also appended as a JSON line to --log (default benchmarks/results.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from tinylm.config import build_configs
from tinylm.model import Transformer
from tinylm.model.layers import MLP, MoE

CHAR_PRESETS = {
    "seed-char-moe",
    "shakespeare-char",
    "cpu-char",
    "cpu-llama",
    "tiny",
}  # Tiny Shakespeare's 65 characters


# ----- helpers ----------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call after warmup."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_model(cfg, device: torch.device, model: Transformer | None = None):
    """The transformers model (GPT-2 or LLaMA family, SDPA attention) with the shape, and the weights, of a tinylm model."""
    from tinylm.export import to_hf_model

    return to_hf_model(cfg, (model or Transformer(cfg)).state_dict()).to(device)


def flops_per_token(cfg, n_params_active: int) -> float:
    """6N + attention (6 * n_layer * block_size * n_embd, causal halved, forward+backward)."""
    return 6 * n_params_active + 6 * cfg.n_layer * cfg.block_size * cfg.n_embd


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s on this device (the denominator of MFU)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, device, 3, 10)
    return 2 * n**3 / sec


def record(args: argparse.Namespace, row: dict) -> None:
    row = {"date": str(date.today()), "device": device_name(args.device), "torch": torch.__version__, **row}
    print(json.dumps(row))
    with open(args.log, "a") as f:
        f.write(json.dumps(row) + "\n")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


# ----- training throughput ----------------------------------------------------------------
def time_train_step(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype,
    args: argparse.Namespace,
    compile: bool,
) -> float:
    """Median seconds of one AdamW training step (forward, cross-entropy, backward, update); fused AdamW for both."""
    dev = x.device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compile else model

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            out = fwd(x)
            logits = out.logits if hasattr(out, "logits") else out
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, dev, args.warmup, args.iters)


def bench_train(args: argparse.Namespace) -> None:
    dev = args.device
    overrides = {"dropout": 0.0, **({"block_size": args.block_size} if args.block_size else {})}
    cfg, _ = build_configs(args.preset, overrides, vocab_size=args.vocab_size)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    B, T = args.batch_size, cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    results = {}
    variants = [(name, False) for name in ("tinylm", "hf")] + (
        [(name, True) for name in ("tinylm", "hf")] if args.compile else []
    )
    for name, compiled in variants:
        try:
            model = Transformer(cfg).to(dev) if name == "tinylm" else hf_model(cfg, dev)
        except Exception as exc:  # the peer cannot represent this model (e.g. GPT-style MoE)
            print(f"{name}: skipped ({exc})")
            continue
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec = time_train_step(model, x, y, dtype, args, compiled)
        tps = B * T / sec
        row = {
            "bench": "train",
            "impl": name,
            "preset": args.preset,
            "batch": B,
            "block": T,
            "compile": compiled,
            "dtype": str(dtype).replace("torch.", ""),
            "tokens_per_s": round(tps),
        }
        if dev.type == "cuda":
            n = sum(p.numel() for p in model.parameters())
            row["mfu"] = round(tps * flops_per_token(cfg, n) / args.peak, 3)
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        record(args, row)
        results[(name, compiled)] = tps
        del model
    label = {False: "eager", True: "compiled"}
    for ours, theirs in ((False, False), (True, True), (True, False)):
        if ("tinylm", ours) in results and ("hf", theirs) in results:
            print(
                f"train {args.preset}: tinylm {label[ours]} / hf {label[theirs]} = "
                f"{results[('tinylm', ours)] / results[('hf', theirs)]:.2f}x"
            )


# ----- generation -------------------------------------------------------------------------
def bench_generate(args: argparse.Namespace) -> None:
    from tinylm.config import SampleConfig
    from tinylm.generate import generate_tokens

    dev = args.device
    cfg, _ = build_configs(args.preset, {"dropout": 0.0}, vocab_size=args.vocab_size)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n_new = min(args.new_tokens, cfg.block_size - 16)
    ours = Transformer(cfg).to(dev, dtype).eval()
    try:
        peer = hf_model(cfg, dev, ours).to(dtype).eval()
    except Exception as exc:  # transformers missing, or it cannot represent this model
        print(f"hf: skipped ({exc})")
        peer = None
    results = {}
    for batch in args.gen_batches:
        prompt = torch.randint(1, cfg.vocab_size, (batch, 16), device=dev)  # 0 is the pad id
        sample = SampleConfig(max_new_tokens=n_new, do_sample=False)
        runs = {"tinylm": lambda: list(generate_tokens(ours, prompt, sample))}
        if peer is not None:
            runs["hf"] = lambda: peer.generate(
                prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0
            )
        if args.compile or dev.type == "cuda":  # fixed-shape decode step, compiled (CUDA graphs on a GPU)
            runs["tinylm-compiled"] = lambda: list(generate_tokens(ours, prompt, sample, compile=True))
        if peer is not None and dev.type == "cuda":
            runs["hf-static"] = lambda: peer.generate(
                prompt,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
            )
        with torch.no_grad():
            for name, fn in runs.items():
                sec = timed(fn, dev, 1, args.iters)
                tps = batch * n_new / sec
                record(
                    args,
                    {
                        "bench": "generate",
                        "impl": name,
                        "preset": args.preset,
                        "batch": batch,
                        "new_tokens": n_new,
                        "tokens_per_s": round(tps, 1),
                    },
                )
                results[(name, batch)] = tps
        for ours_name in ("tinylm", "tinylm-compiled"):
            for peer_name in ("hf", "hf-static"):
                if (ours_name, batch) in results and (peer_name, batch) in results:
                    print(
                        f"generate {args.preset} batch {batch}: {ours_name} / {peer_name} = "
                        f"{results[(ours_name, batch)] / results[(peer_name, batch)]:.2f}x"
                    )


# ----- MoE layer --------------------------------------------------------------------------
def bench_moe(args: argparse.Namespace) -> None:
    """Top-2-of-8 MoE forward+backward vs a dense SwiGLU with the same active parameters, and vs a naive loop."""
    dev = args.device
    C = 256 if args.quick else 512
    cfg, _ = build_configs(
        "seed-char-moe",
        {"n_embd": C, "n_expert": 8, "n_expert_active": 2, "ffn_hidden": 2 * C, "n_head": 8},
        vocab_size=64,
    )
    dense_cfg, _ = build_configs(
        "seed-char-moe", {"n_embd": C, "n_expert": 0, "ffn_hidden": 2 * 2 * C, "n_head": 8}, vocab_size=64
    )
    x = torch.randn(8 if args.quick else 16, 256, C, device=dev, requires_grad=True)
    moe, dense = MoE(cfg).to(dev), MLP(dense_cfg).to(dev)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)

    def naive_loop() -> torch.Tensor:  # the textbook version: every expert over all tokens, masked
        flat = x.reshape(-1, C)
        experts, weights, _ = moe.route(flat)
        out = torch.zeros_like(flat)
        for e in range(cfg.n_expert):
            gate = (weights * (experts == e)).sum(-1, keepdim=True)
            out = out + gate * moe.expert_forward(e, flat)
        return out

    def run(fn: Callable[[], object]) -> Callable[[], None]:
        def step() -> None:
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            out.float().square().mean().backward()

        return step

    t_moe = timed(run(lambda: moe(x)), dev, 2, args.iters)
    t_dense = timed(run(lambda: dense(x)), dev, 2, args.iters)
    t_loop = timed(run(naive_loop), dev, 2, args.iters)
    record(
        args,
        {
            "bench": "moe",
            "width": C,
            "tokens": x.shape[0] * x.shape[1],
            "moe_ms": round(t_moe * 1e3, 2),
            "dense_same_active_ms": round(t_dense * 1e3, 2),
            "naive_loop_ms": round(t_loop * 1e3, 2),
            "moe_over_dense": round(t_moe / t_dense, 2),
            "loop_over_moe": round(t_loop / t_moe, 2),
        },
    )


# ----- time to quality --------------------------------------------------------------------
def bench_quality(args: argparse.Namespace) -> None:
    """Wall time from process start of `tinylm train` until the final validation loss, on Tiny Shakespeare."""
    data = Path(args.workdir) / "shakespeare-char"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not (data / "meta.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "tinylm", "prepare", "shakespeare", "--out", str(data)],
            check=True,
            env=env,
        )
    run_dir = Path(args.workdir) / f"quality-{args.preset}-{int(time.time())}"
    cmd = [
        sys.executable,
        "-m",
        "tinylm",
        "train",
        "--data",
        str(data),
        "--preset",
        args.preset,
        "--out",
        str(run_dir),
        "--no-progress",
        "--json",
        "--device",
        str(args.device),
        *sum((["--set", s] for s in args.set), []),
    ]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(out.stderr)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinylm",
            "eval",
            str(run_dir),
            "--json",
            "--no-progress",
            "--device",
            str(args.device),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    full_val = json.loads(ev.stdout.strip().splitlines()[-1])["loss"]
    record(
        args,
        {
            "bench": "quality",
            "preset": args.preset,
            "set": args.set,
            "steps": summary["steps"],
            "val_loss_estimate": round(summary["val_loss"], 4),
            "val_loss_full_split": round(full_val, 4),
            "wall_s_from_process_start": round(wall, 1),
            "target": args.target,
            "met": full_val <= args.target,
        },
    )


# ----- entry point ------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=("all", "train", "generate", "moe", "quality"))
    p.add_argument(
        "--quick", action="store_true", help="small sizes: the whole suite in < 2 minutes on 2 CPU cores"
    )
    p.add_argument("--preset", default=None, help="model preset (default depends on the benchmark)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch")
    p.add_argument("--block-size", type=int, default=None, help="override the context length")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="vocabulary size (default 65 for the character-level presets, else 50257)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time compiled variants (train: both models; generate: tinylm's decode step)",
    )
    p.add_argument("--new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8], help="generation batch sizes")
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="warmup iterations")
    p.add_argument("--target", type=float, default=1.88, help="quality: validation loss to reach")
    p.add_argument("--set", action="append", default=[], help="quality: extra --set for tinylm train")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", default="/tmp/tinylm-bench")
    p.add_argument("--log", default=str(Path(__file__).with_name("results.jsonl")))
    args = p.parse_args()
    args.device = torch.device(args.device)
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        args.peak = matmul_peak(args.device, torch.bfloat16)
        print(f"measured bf16 matmul peak: {args.peak / 1e12:.0f} TFLOP/s")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    jobs = (
        [args.what]
        if args.what != "all"
        else ["train", "generate", "moe"] + ([] if args.quick else ["quality"])
    )
    for job in jobs:
        preset = (
            args.preset
            or {
                "train": "shakespeare-char",
                "generate": "shakespeare-char",
                "quality": "cpu-char",
                "moe": "",
            }[job]
        )
        sub = argparse.Namespace(**{**vars(args), "preset": preset})
        sub.vocab_size = args.vocab_size or (65 if preset in CHAR_PRESETS else 50257)
        if args.quick:
            sub.batch_size = args.batch_size or 8
            sub.block_size = args.block_size or 128
            sub.new_tokens, sub.iters, sub.warmup = min(args.new_tokens, 64), 3, 1
        else:
            sub.batch_size = args.batch_size or 16
        {"train": bench_train, "generate": bench_generate, "moe": bench_moe, "quality": bench_quality}[job](
            sub
        )


if __name__ == "__main__":
    main()
