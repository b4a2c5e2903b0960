"""Batch-1 greedy decoding, one process: tinylm variants against llama.cpp (the same weights through the GGUF
export, f32 and q8_0, the same thread count) and Hugging Face transformers' static cache.

    python benchmarks/bench_decode.py --threads 1 --iters 3   # both models, inside the context and 500 tokens
    python benchmarks/bench_decode.py --models cpu-llama --iters 5
    python benchmarks/bench_decode.py --profile               # torch.profiler over tinylm's eager decode step

Past the context (500 new tokens) every tinylm variant uses the rolling KV cache, like llama.cpp here (the
oldest entry is dropped, positions keep growing); tinylm's default rule, re-encoding the last block_size tokens
per step, is timed as "tinylm eager re-encode" once (--reencode-iters) on models with a context of at most
--reencode-max-context tokens (64: `cpu-llama`), since on the 10.6M model one such run takes minutes. Hugging Face's static cache is sized to prompt + new tokens. A variant whose API or package is
missing prints "skipped: <reason>" and the rest runs. Every figure is the median of --iters timed runs (after
one untimed warm-up run, which also compiles), in new tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import torch

from tinylm.config import SampleConfig, build_configs
from tinylm.generate import generate_tokens
from tinylm.model import Transformer
from tinylm.tokenizer import CharTokenizer

MODELS = {  # name -> overrides of the cpu-llama preset (LLaMA-style, tied embeddings)
    "cpu-llama": {},
    "llama-6x384": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
}
PROMPT_LEN = 16
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # its 65 characters


class Skip(Exception):
    """This variant cannot run here; the message says why."""


# ----- the machine --------------------------------------------------------------------------
def cpu_kind() -> str:
    """CPU model and the SIMD features that decide the kernels: AVX2, AVX-512, bf16 and int8 units."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    have = [f for f in wanted if f in flags]
    return f"{model or platform.processor()} x{os.cpu_count()}; " + (", ".join(have) or "no AVX2")


# ----- tinylm -------------------------------------------------------------------------------
def tinylm_variants(
    model: Transformer, prompt: torch.Tensor, n_new: int
) -> dict[str, Callable[[int], object]]:
    """name -> run(n_new) for every tinylm variant; each raises Skip when its API is missing.

    Past the context every variant decodes with the rolling KV cache (one token per step, as llama.cpp);
    the re-encoding rule has its own entry, "tinylm eager re-encode"."""
    past = n_new + prompt.size(1) > model.cfg.block_size
    rolling = {"rolling_cache": True} if past else {}

    def run(m: Transformer, compile: bool = False, rolling_cache: bool = False) -> Callable[[int], object]:
        def go(n: int) -> object:
            cfg = SampleConfig(max_new_tokens=n, do_sample=False, rolling_cache=rolling_cache)
            return list(generate_tokens(m, prompt, cfg, compile=compile))

        return go

    quantized: list[Transformer] = []  # built on first use, shared by both int8 variants

    def int8(**kw) -> Callable[[int], object]:
        def go(n: int) -> object:
            if not quantized:
                try:
                    from tinylm.quantize import quantize_int8
                except ImportError as exc:
                    raise Skip(f"tinylm.quantize.quantize_int8 is missing ({exc})") from None
                quantized.append(quantize_int8(_clone(model)))
            return run(quantized[0], **kw)(n)

        return go

    bf16 = _clone(model).to(torch.bfloat16)
    suffix = " rolling" if past else ""
    variants = {
        f"tinylm eager{suffix}": run(model, **rolling),
        f"tinylm compiled{suffix}": run(model, compile=True, **rolling),
        f"tinylm bf16{suffix}": run(bf16, **rolling),
        f"tinylm int8{suffix}": int8(**rolling),
        f"tinylm int8 compiled{suffix}": int8(compile=True, **rolling),
    }
    if past:
        variants["tinylm eager re-encode"] = run(model)
    return variants


def _clone(model: Transformer) -> Transformer:
    copy = Transformer(model.cfg)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


# ----- llama.cpp ----------------------------------------------------------------------------
def llama_cpp_variant(
    model: Transformer, prompt: list[int], quant: str, threads: int, workdir: Path
) -> Callable[[int], object]:
    """Greedy decoding in llama.cpp on tinylm's weights exported to GGUF at `quant`.

    Past the context the oldest cache entry is dropped each step and positions keep growing: the rolling
    cache, which is what llama.cpp can do without re-encoding."""
    try:
        import llama_cpp
    except ImportError:
        raise Skip("llama-cpp-python is not installed (pip install 'tinylm[llama]')") from None
    from tinylm.export_gguf import write_gguf

    path = workdir / f"{quant}.gguf"
    if not path.exists():
        write_gguf(model.cfg, model.state_dict(), CharTokenizer(SHAKESPEARE_CHARS), path, quant)
    block = model.cfg.block_size
    llm = llama_cpp.Llama(
        str(path), n_ctx=block, n_batch=block, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    ctx, batch, n_vocab = llm._ctx, llm._batch, llm.n_vocab()

    def go(n: int) -> list[int]:
        ctx.kv_cache_clear()
        batch.set_batch(prompt, n_past=0, logits_all=False)
        ctx.decode(batch)
        pos, oldest, out = len(prompt), 0, []
        for _ in range(n):
            logits = np.ctypeslib.as_array(ctx.get_logits_ith(-1), shape=(n_vocab,))
            out.append(int(logits.argmax()))
            if pos - oldest == block:  # full: forget the oldest position
                ctx.kv_cache_seq_rm(0, oldest, oldest + 1)
                oldest += 1
            batch.set_batch(out[-1:], n_past=pos, logits_all=False)
            ctx.decode(batch)
            pos += 1
        return out

    _OPEN.append(llm)
    return go


_OPEN: list = []  # llama.cpp models, closed before the interpreter tears ctypes down


# ----- Hugging Face -------------------------------------------------------------------------
def hf_static_variant(model: Transformer, prompt: torch.Tensor) -> Callable[[int], object]:
    """transformers' generate with its static KV cache of prompt + n positions (past the context RoPE goes on:
    max_position_embeddings is raised to that length, which changes no weights or frequencies)."""
    try:
        from tinylm.export import to_hf_model

        hf = to_hf_model(model.cfg, model.state_dict()).eval()
    except Exception as exc:  # transformers missing or cannot represent it
        raise Skip(f"transformers: {exc}") from None

    def go(n: int) -> object:
        hf.config.max_position_embeddings = max(model.cfg.block_size, prompt.size(1) + n)
        with torch.no_grad():
            return hf.generate(
                prompt,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
            )

    return go


# ----- timing -------------------------------------------------------------------------------
def round_robin(
    fns: dict[str, Callable[[int], object]], n_new: int, iters: int, capped: dict[str, int] | None = None
) -> dict[str, list[float] | str]:
    """name -> tokens/s of each timed run, or the reason it was skipped.

    Each variant first runs once untimed (8 tokens: compiles the step, warms caches); the timed runs then
    go round-robin (A B C A B C ...), so a slow phase of a shared host falls on every variant alike.
    `capped` gives some variants fewer timed runs (name -> runs; 0 skips it)."""
    capped = capped or {}
    results: dict[str, list[float] | str] = {}
    for name, fn in fns.items():
        if capped.get(name) == 0:
            results[name] = "left out (--reencode-iters 0, or a context above --reencode-max-context)"
            continue
        try:
            fn(min(n_new, 8))
            results[name] = []
        except Skip as exc:
            results[name] = str(exc)
    for i in range(iters):
        for name, fn in fns.items():
            if isinstance(results[name], list) and i < capped.get(name, iters):
                t0 = time.perf_counter()
                fn(n_new)
                results[name].append(n_new / (time.perf_counter() - t0))
    return results


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    cfg, _ = build_configs("cpu-llama", {**MODELS[name], "dropout": 0.0}, vocab_size=len(SHAKESPEARE_CHARS))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(1, cfg.vocab_size, (1, PROMPT_LEN))
    rows = []
    for scenario, n_new in (("inside", cfg.block_size - PROMPT_LEN), ("500", 500)):
        if scenario not in args.scenarios:
            continue
        variants: dict[str, Callable[[int], object]] = dict(tinylm_variants(model, prompt, n_new))
        for quant in ("f32", "q8_0"):
            variants[f"llama.cpp {quant}"] = lambda n, q=quant: _lazy_llama(model, prompt, q, args, workdir)(
                n
            )
        variants["hf static"] = lambda n: _lazy_hf(model, prompt)(n)
        if args.variants:
            variants = {k: v for k, v in variants.items() if any(w in k for w in args.variants)}
        reencode = args.reencode_iters if cfg.block_size <= args.reencode_max_context else 0
        capped = {"tinylm eager re-encode": reencode}
        for variant, runs in round_robin(variants, n_new, args.iters, capped).items():
            row = {"model": name, "params_m": round(n_params / 1e6, 2), "context": cfg.block_size}
            row.update(
                {"scenario": scenario, "new_tokens": n_new, "variant": variant, "threads": args.threads}
            )
            if isinstance(runs, str):
                row["skipped"] = runs
                print(f"{name} {scenario} {variant}: skipped: {runs}", flush=True)
            else:
                row.update(tokens_per_s=round(statistics.median(runs), 1), runs=[round(r, 1) for r in runs])
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


_CACHE: dict[tuple, Callable[[int], object]] = {}


def _lazy_llama(model, prompt, quant, args, workdir) -> Callable[[int], object]:
    key = ("llama", id(model), quant)
    if key not in _CACHE:
        _CACHE[key] = llama_cpp_variant(model, prompt[0].tolist(), quant, args.threads, workdir)
    return _CACHE[key]


def _lazy_hf(model, prompt) -> Callable[[int], object]:
    key = ("hf", id(model))
    if key not in _CACHE:
        _CACHE[key] = hf_static_variant(model, prompt)
    return _CACHE[key]


# ----- report -------------------------------------------------------------------------------
def markdown(rows: list[dict]) -> str:
    """One table: tokens/s per variant, and the ratios to llama.cpp f32 and q8_0 measured in the same run."""
    lines = [
        "| model | scenario | variant | tok/s (median) | runs | vs llama.cpp f32 | vs llama.cpp q8_0 |",
        "|---|---|---|---|---|---|---|",
    ]
    ref = {(r["model"], r["scenario"], r["variant"]): r.get("tokens_per_s") for r in rows}
    for r in rows:
        f32 = ref.get((r["model"], r["scenario"], "llama.cpp f32"))
        q8 = ref.get((r["model"], r["scenario"], "llama.cpp q8_0"))
        tps = r.get("tokens_per_s")
        ratio = lambda peer: f"{tps / peer:.2f}x" if tps and peer else "—"  # noqa: E731
        shown = "skipped" if not tps else f"{tps:,.0f}" if tps >= 100 else f"{tps:.1f}"
        where = f"{r['model']} ({r['params_m']}M, ctx {r['context']})"
        scenario = f"{r['new_tokens']} new" + (" (past the context)" if r["scenario"] == "500" else "")
        runs = ", ".join(f"{x:g}" for x in r.get("runs", []))
        lines.append(
            f"| {where} | {scenario} | {r['variant']} | {shown} | {runs} | {ratio(f32)} | {ratio(q8)} |"
        )
    reasons = sorted({f"- {r['variant']}: skipped: {r['skipped']}" for r in rows if "skipped" in r})
    return "\n".join(lines + ([""] if reasons else []) + reasons)


def profile(args: argparse.Namespace) -> None:
    """torch.profiler over tinylm's decode steps (eager and compiled) of each model: where a token's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name in args.models:
        cfg, _ = build_configs("cpu-llama", {**MODELS[name], "dropout": 0.0}, vocab_size=65)
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        prompt = torch.randint(1, 65, (1, PROMPT_LEN))
        n = cfg.block_size - PROMPT_LEN
        for compile in (False, True):
            sample = SampleConfig(max_new_tokens=n, do_sample=False)
            run = lambda k, c=compile: list(
                generate_tokens(model, prompt, replace(sample, max_new_tokens=k), compile=c)
            )  # noqa: E731
            run(8)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                run(n)
                seconds = time.perf_counter() - t0
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm"))
            calls = sum(e.count for e in events if e.key.startswith("aten::"))
            print(
                f"\n## {name}, {'compiled' if compile else 'eager'}: {n} tokens in {seconds * 1e3:.0f} ms (profiled)"
            )
            print(
                f"aten::mm {100 * mm / total:.0f}% of self CPU time; {calls / n:.0f} ATen calls per token (incl. views)"
            )
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to time")
    p.add_argument(
        "--scenarios", nargs="+", default=["inside", "500"], choices=["inside", "500"], help="decode lengths"
    )
    p.add_argument("--iters", type=int, default=3, help="timed runs per variant (median reported)")
    p.add_argument("--variants", nargs="+", help="only variants whose name contains one of these words")
    p.add_argument(
        "--reencode-iters",
        type=int,
        default=1,
        help="timed runs of tinylm's re-encoding rule past the context (minutes on the 10.6M model; 0 leaves it out)",
    )
    p.add_argument(
        "--reencode-max-context",
        type=int,
        default=64,
        help="time the re-encoding rule only for models with at most this context (default 64: cpu-llama)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for tinylm, llama.cpp and HF")
    p.add_argument(
        "--profile", action="store_true", help="profile tinylm's eager and compiled decoding and exit"
    )
    p.add_argument("--profile-rows", type=int, default=12, help="rows of each profile table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {date.today()}  {cpu_kind()}; {args.threads} threads; torch {torch.__version__}; python {sys.version.split()[0]}"
    )
    if args.profile:
        profile(args)
        return
    print(f"# load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in args.models:
            workdir = Path(tmp) / name
            workdir.mkdir()
            rows += bench_model(name, args, workdir)
    for llm in _OPEN:
        llm.close()
    print(
        f"# load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {time.perf_counter() - t0:.0f} s"
    )
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
