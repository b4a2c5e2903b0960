"""Side-by-side benchmarks: tinylm against Hugging Face transformers, in one process, same work; time to
quality against nanoGPT's CPU recipe; the speedrun options (issue 22) one at a time.

    python benchmarks/bench.py --quick                 # < 2 minutes on a 2-core CPU
    python benchmarks/bench.py train --preset gpt2-small --batch-size 16 --compile   # on a GPU
    python benchmarks/bench.py generate --preset shakespeare-char
    python benchmarks/bench.py moe
    python benchmarks/bench.py quality --presets cpu-record --nanogpt PATH/TO/nanoGPT   # the record table
    python benchmarks/bench.py options --seeds 1 2 3     # each speedrun option on cpu-llama, several seeds

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
    "cpu-record",
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
# nanoGPT's CPU recipe for Tiny Shakespeare characters, as its README gives it (about 1.88 after 2,000 iterations).
NANOGPT_CPU = [
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
    "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
    "--lr_decay_iters=2000", "--dropout=0.0",
]  # fmt: skip

# The full-split loss of nanoGPT's checkpoint, as `tinylm eval` scores a run: non-overlapping windows of
# the context length over the whole validation split. Run inside the nanoGPT directory (its model.py).
NANOGPT_EVAL = """
import numpy as np, torch, torch.nn.functional as F
from model import GPT, GPTConfig
ckpt = torch.load("out-shakespeare-char/ckpt.pt", map_location="cpu", weights_only=False)
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
model.eval()
val = torch.from_numpy(np.fromfile("data/shakespeare_char/val.bin", dtype=np.uint16).astype(np.int64))
T, nll, n = ckpt["model_args"]["block_size"], 0.0, 0
with torch.no_grad():
    for start in range(0, len(val) - 1, T * 16):
        xs, ys = [], []
        for s in range(start, min(start + T * 16, len(val) - 1), T):
            L = min(T, len(val) - 1 - s)
            xs.append(val[s : s + L]); ys.append(val[s + 1 : s + 1 + L])
        for x, y in zip(xs, ys):
            logits, _ = model(x[None], y[None])
            nll += F.cross_entropy(logits[0], y, reduction="sum").item(); n += len(y)
print(ckpt["iter_num"], nll / n)
"""


def run_timed(
    cmd: list[str], cwd: str | None, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess, float, float]:
    """A subprocess, with its wall seconds from start to exit and its CPU seconds (user + system)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out, wall, cpu


def nanogpt_workdir(source: str, workdir: str, env: dict[str, str]) -> Path:
    """A copy of a nanoGPT checkout with its Tiny Shakespeare data prepared by its own prepare.py
    from the shared copy of input.txt (the same first 90% / last 10% split as tinylm's)."""
    import shutil

    work = Path(workdir) / "nanoGPT"
    if not (work / "data" / "shakespeare_char" / "val.bin").is_file():
        shutil.copytree(source, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "out-*"))
        datasets = Path(
            os.environ.get("TINYLM_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets")
        )
        shutil.copy(
            datasets / "tinyshakespeare" / "input.txt", work / "data" / "shakespeare_char" / "input.txt"
        )
        subprocess.run(
            [sys.executable, "data/shakespeare_char/prepare.py"],
            cwd=work,
            check=True,
            env=env,
            capture_output=True,
        )
    shutil.rmtree(work / "out-shakespeare-char", ignore_errors=True)
    return work


def quality_tinylm(recipe: str, data: Path, args: argparse.Namespace, env: dict[str, str]) -> dict:
    """`tinylm train --preset PRESET [--set key=value ...]` timed from process start to exit, then its
    full-split val loss; `recipe` is a preset name or "PRESET:key=value,key=value" (e.g. an older recipe)."""
    import shutil

    preset, _, pairs = recipe.partition(":")
    run_dir = Path(args.workdir) / (
        "quality-" + "".join(c if c.isalnum() or c in ".-" else "_" for c in recipe)
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = sum((["--set", s] for s in [*args.set, *filter(None, pairs.split(","))]), [])
    cmd = [
        sys.executable,
        "-m",
        "tinylm",
        "train",
        "--data",
        str(data),
        "--preset",
        preset,
        "--out",
        str(run_dir),
    ]
    out, wall, cpu = run_timed(
        [*cmd, "--no-progress", "--json", "--device", str(args.device), *sets], None, env
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    ev, _, _ = run_timed(
        [sys.executable, "-m", "tinylm", "eval", str(run_dir), "--json", "--no-progress"], None, env
    )
    said = [line for line in out.stderr.splitlines() if line.startswith("threads: ")]
    return {
        "steps": summary["steps"],
        "val_loss_full_split": round(json.loads(ev.stdout.strip().splitlines()[-1])["loss"], 4),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "threads": said[0] if said else env.get("OMP_NUM_THREADS", "default"),
    }


def quality_nanogpt(work: Path, env: dict[str, str]) -> dict:
    """nanoGPT's CPU recipe timed from process start to exit, then its checkpoint's full-split val loss."""
    _, wall, cpu = run_timed([sys.executable, "train.py", *NANOGPT_CPU], str(work), env)
    ev, _, _ = run_timed([sys.executable, "-c", NANOGPT_EVAL], str(work), env)
    step, loss = ev.stdout.strip().splitlines()[-1].split()
    return {
        "steps": int(step),
        "val_loss_full_split": round(float(loss), 4),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
    }


def bench_quality(args: argparse.Namespace) -> None:
    """Time to quality on Tiny Shakespeare characters, side by side: each --presets recipe and (with
    --nanogpt DIR, a checkout of github.com/karpathy/nanoGPT) nanoGPT's CPU recipe, from process start to
    the end of training, in turns over --reps; then each one's loss on the full validation split."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:  # the same threads for every contestant; default: each picks its own
        env["OMP_NUM_THREADS"] = str(args.threads)
    data = char_data(args.workdir)
    contestants = [(preset, lambda p=preset: quality_tinylm(p, data, args, env)) for preset in args.presets]
    if args.nanogpt:  # a fresh copy of its output directory for every run
        contestants.append(
            ("nanoGPT", lambda: quality_nanogpt(nanogpt_workdir(args.nanogpt, args.workdir, env), env))
        )
    results: dict[str, list[dict]] = {}
    for rep in range(args.reps):
        order = contestants[rep % len(contestants) :] + contestants[: rep % len(contestants)]
        for name, run in order:
            row = {
                "bench": "quality",
                "recipe": name,
                "rep": rep,
                **run(),
                "load": round(os.getloadavg()[0], 2),
            }
            record(args, {**row, "target": args.target, "threads_env": env.get("OMP_NUM_THREADS")})
            results.setdefault(name, []).append(row)
    print_quality_table(results, args.target)


def print_quality_table(results: dict[str, list[dict]], target: float) -> None:
    """Medians per recipe, and how many times faster than the last one (nanoGPT when it ran)."""
    ref = statistics.median(r["wall_s"] for r in list(results.values())[-1])
    ref_cpu = statistics.median(r["cpu_s"] for r in list(results.values())[-1])
    print("| recipe | steps | val loss, full split | wall s, start to exit (median) | CPU s (median) | "
          f"vs {list(results)[-1]}: wall / CPU |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        wall, cpu = statistics.median(r["wall_s"] for r in rows), statistics.median(r["cpu_s"] for r in rows)
        losses = sorted({r["val_loss_full_split"] for r in rows})
        met = "yes" if max(losses) <= target else "no"
        print(
            f"| {name} | {rows[0]['steps']} | {' / '.join(f'{v:.4f}' for v in losses)} (<= {target}: {met}) | "
            f"{wall:.1f} | {cpu:.1f} | {ref / wall:.2f}x / {ref_cpu / cpu:.2f}x |"
        )


# ----- speedrun options: one table, several seeds -------------------------------------------
# Each speedrun option (issue 22) added alone to the base preset; "name:key=value,key=value" on the command line.
OPTION_VARIANTS = {
    "base": {},
    "relu2": {"mlp": "relu2"},
    "qk_norm": {"qk_norm": True},
    "zero_init": {"zero_init": True},
    "value_embeds": {"value_embeds": 2},
    "embed_skip": {"embed_skip": True},
    "unet_skips": {"unet_skips": True},
    "softcap": {"logit_softcap": 15.0},
    "untied+softcap": {"tie_embeddings": False, "logit_softcap": 15.0},
    "polar_express": {"orthogonalizer": "polar-express"},
    "normuon": {"normuon": True},
    "batch_ramp": {"batch_size_start": 8, "ramp_steps": 100},
    "seq_ramp": {"block_size_start": 16, "ramp_steps": 100},
}


def parse_variant(spec: str) -> tuple[str, dict]:
    """ "name" (one of OPTION_VARIANTS) or "name:key=value,key=value" (typed like --set)."""
    from tinylm.config import parse_overrides

    name, _, pairs = spec.partition(":")
    if not pairs:
        return name, OPTION_VARIANTS[name]
    return name, parse_overrides(pairs.split(","))


def char_data(workdir: str) -> Path:
    """Tiny Shakespeare, character-level, prepared once in the work directory (first 90% / last 10%)."""
    data = Path(workdir) / "shakespeare-char"
    if not (data / "meta.json").is_file():
        from tinylm.data import prepare

        prepare(["shakespeare"], data, "char")
    return data


def train_and_score(data: Path, preset: str, overrides: dict, workdir: str) -> dict:
    """Train in this process; thread CPU seconds of the whole train() call and the full-split val loss."""
    import shutil
    import tempfile

    from tinylm.checkpoint import load_run
    from tinylm.data import TokenData
    from tinylm.evaluate import evaluate_tokens
    from tinylm.train import train

    run_dir = Path(tempfile.mkdtemp(dir=workdir, prefix="option-")) / "run"
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    result = train(data, run_dir, preset, overrides, progress=False, log=lambda msg: None)
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    run = load_run(run_dir, "last", "cpu")
    tokens = TokenData(data).split("val")
    full = evaluate_tokens(run.model, tokens, block_size=run.model_cfg.block_size, batch_size=64)
    shutil.rmtree(run_dir.parent)
    return {
        "steps": result.steps,
        "tokens": tokens_trained(run.record.train, run.model_cfg.block_size, result.steps),
        "train_cpu_s": round(cpu, 2),
        "train_wall_s": round(wall, 2),
        "val_loss_full_split": round(full.loss, 4),
    }


def tokens_trained(cfg, block_size: int, steps: int) -> int:
    """Tokens of `steps` optimizer steps, counting the batch-size and sequence-length ramps."""
    from tinylm.optim import batch_shape_at

    shapes = (batch_shape_at(s, cfg, cfg.batch_size, block_size) for s in range(steps))
    return sum(rows * length for rows, length in shapes) * cfg.grad_accum


def bench_options(args: argparse.Namespace) -> None:
    """Speedrun options one at a time on --preset: full-split validation loss after --steps steps over
    --seeds, and the thread CPU time of training (1 thread, so the figure barely moves with the load)."""
    from tinylm.config import parse_overrides

    torch.set_num_threads(1)
    data = Path(args.data) if args.data else char_data(args.workdir)
    base = parse_overrides(args.set)  # applied to every variant (e.g. block_size=96 for the BPE quickstart)
    variants = [parse_variant(v) for v in (args.variants or list(OPTION_VARIANTS))]
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for name, overrides in variants:  # round robin, so a slow phase of the host hits every variant
            values = {**base, **overrides, "seed": seed, "eval_batches": 1}
            if args.steps:
                values.update(max_steps=args.steps, eval_interval=args.steps)
            row = train_and_score(data, args.preset, values, args.workdir)
            row = {
                "bench": "options",
                "preset": args.preset,
                "variant": name,
                "overrides": overrides,
                "base": base,
                "data": str(data),
                "seed": seed,
                **row,
            }
            record(args, {**row, "load": os.getloadavg()[0]})
            results.setdefault(name, []).append(row)
    from tinylm.data import TokenData

    vocab = TokenData(data).tokenizer.vocab_size
    costs = step_costs(
        args.preset, variants, {**base, **({"max_steps": args.steps} if args.steps else {})}, vocab
    )
    for name, ms in costs.items():
        record(args, {"bench": "options-step-cost", "preset": args.preset, "variant": name, "step_ms": ms})
    print_option_table(results, costs)


def step_costs(
    preset: str, variants: list[tuple[str, dict]], base: dict, vocab: int = 65, rounds: int = 5
) -> dict[str, float]:
    """Median thread CPU milliseconds of one training step (forward, backward, clip, optimizer) per variant,
    measured side by side: the variants take turns for `rounds` rounds of 10 steps at shapes spread over
    the run (so a ramp's cheap early steps count as often as they occur), 1 thread, random tokens."""
    from tinylm.config import build_configs
    from tinylm.model import Transformer
    from tinylm.optim import batch_shape_at, build_optimizer

    setups = {}
    for name, overrides in variants:
        model_cfg, cfg = build_configs(preset, {**base, **overrides}, vocab_size=vocab)
        torch.manual_seed(0)
        model = Transformer(model_cfg)
        shapes = [
            batch_shape_at(cfg.max_steps * i // 10, cfg, cfg.batch_size, model_cfg.block_size)
            for i in range(10)
        ]
        setups[name] = (model, build_optimizer(model, cfg), shapes)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds + 1):  # the first round warms up (allocator, kernels) and is dropped
        for name, (model, opt, shapes) in setups.items():
            t0 = time.thread_time()
            for rows, length in shapes:
                x = torch.randint(0, vocab, (rows, length + 1))
                loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            times[name].append((time.thread_time() - t0) / len(shapes))
    return {name: round(1000 * statistics.median(t[1:]), 1) for name, t in times.items()}


def print_option_table(results: dict[str, list[dict]], costs: dict[str, float]) -> None:
    """Per variant: mean full-split loss, its difference to the first variant seed by seed (same seed: same
    initial weights and batches), whether every seed improved, tokens, the step cost measured side by side
    and the median CPU seconds of the whole training call."""
    first = {r["seed"]: r["val_loss_full_split"] for r in next(iter(results.values()))}
    print(
        "| variant | seeds | val loss (mean) | vs first, seed by seed | all seeds better | tokens | "
        "step ms (side by side) | train CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        deltas = [r["val_loss_full_split"] - first[r["seed"]] for r in rows if r["seed"] in first]
        mean = statistics.mean(r["val_loss_full_split"] for r in rows)
        better = "yes" if deltas and all(d < 0 for d in deltas) else "no"
        print(
            f"| {name} | {len(rows)} | {mean:.4f} | {' / '.join(f'{d:+.3f}' for d in deltas)} "
            f"(mean {statistics.mean(deltas):+.3f}) | {better} | {rows[0]['tokens']:,} | {costs.get(name, 0):.0f} | "
            f"{statistics.median(r['train_cpu_s'] for r in rows):.1f} |"
        )


# ----- entry point ------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "what", nargs="?", default="all", choices=("all", "train", "generate", "moe", "quality", "options")
    )
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
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="quality, options: a config override for every run (key=value)",
    )
    p.add_argument(
        "--presets",
        nargs="+",
        default=None,
        help="quality: tinylm recipes, PRESET or PRESET:key=value,... (default: --preset)",
    )
    p.add_argument("--nanogpt", help="quality: a nanoGPT checkout; its CPU recipe runs side by side")
    p.add_argument("--reps", type=int, default=3, help="quality: rounds (the recipes take turns in each)")
    p.add_argument(
        "--threads", type=int, default=0, help="quality: OMP_NUM_THREADS for every recipe (0: own)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="options: training seeds")
    p.add_argument("--steps", type=int, default=0, help="options: optimizer steps (default: the preset's)")
    p.add_argument("--variants", nargs="+", help="options: names from OPTION_VARIANTS or name:key=value,...")
    p.add_argument("--data", help="options: a prepared data directory (default: Tiny Shakespeare characters)")
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
                "options": "cpu-llama",
            }[job]
        )
        sub = argparse.Namespace(**{**vars(args), "preset": preset})
        sub.presets = args.presets or [preset]
        sub.vocab_size = args.vocab_size or (65 if preset in CHAR_PRESETS else 50257)
        if args.quick:
            sub.batch_size = args.batch_size or 8
            sub.block_size = args.block_size or 128
            sub.new_tokens, sub.iters, sub.warmup = min(args.new_tokens, 64), 3, 1
        else:
            sub.batch_size = args.batch_size or 16
        jobs_by_name = {
            "train": bench_train,
            "generate": bench_generate,
            "moe": bench_moe,
            "quality": bench_quality,
            "options": bench_options,
        }
        jobs_by_name[job](sub)


if __name__ == "__main__":
    main()
