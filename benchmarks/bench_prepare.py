"""`tinylm prepare` at scale: peak memory, and encoding throughput side by side with the tokenizer's own
batch encoding of the same text.

Corpora are generated from the shared corpora (Tiny Shakespeare and WikiText-2's two local splits):
random runs of whole lines, with 3% of the letters replaced by random letters, so nothing repeats
(a BPE meets new words all the time) while the character set stays that of the sources.

    python benchmarks/bench_prepare.py memory --sizes 5MB,50MB --tokenizer char
    python benchmarks/bench_prepare.py throughput --size 100MB --tokenizer bpe --repeats 3
    python benchmarks/bench_prepare.py scale --size 10GB --files 100 --tokenizer char
    python benchmarks/bench_prepare.py corpus --size 100MB --files 2000 --out /tmp/data-bench/c

`memory` and `scale` run each prepare in a child process and report its peak RSS (getrusage). The
`throughput` rows time, in one process and alternating, (a) `tinylm.data.prepare` with an already
trained tokenizer (reading, cutting, encoding on every core, writing shards) and (b) the tokenizer's
own batch call on the same text already in memory, in the same pieces: `tokenizers`' encode_batch and
encode_batch_fast for BPE, the NumPy lookup (encode_arrays) for characters, also from the UTF-8 bytes
(decode_encode_arrays: decoding included), and the byte lookup prepare itself uses (encode_utf8, one
thread: it holds the GIL) on bytes in memory. Big files go under
--work (default /tmp/data-bench) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("TINYLM_DATA_DIR", ROOT.parent / "shared" / "datasets"))
SOURCES = ["tinyshakespeare/input.txt", "wikitext-2/valid.txt", "wikitext-2/test.txt"]
MUTATE = 0.03  # share of letters replaced


def parse_size(text: str) -> int:
    """'100MB', '1GB', '5000' -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def base_text(sources: list[Path] | None = None) -> np.ndarray:
    """The source corpora's bytes, one array."""
    paths = sources or [DATA_DIR / s for s in SOURCES]
    return np.frombuffer(b"".join(p.read_bytes() for p in paths if p.is_file()), dtype=np.uint8)


def generate(n_bytes: int, seed: int, base: np.ndarray) -> bytes:
    """About n_bytes of text: random runs of 20 to 400 whole lines of `base`, letters mutated."""
    rng = np.random.default_rng(seed)
    starts = np.flatnonzero(base == ord("\n")) + 1
    parts, size = [], 0
    while size < n_bytes:
        first = int(rng.integers(0, len(starts) - 401))
        run = base[starts[first] : starts[first + int(rng.integers(20, 400))]]
        parts.append(run)
        size += len(run)
    out = np.concatenate(parts)[:n_bytes].copy()
    cut = out.tobytes().rfind(b"\n") + 1  # end on a whole line
    out = out[: cut or len(out)]
    letters = ((out >= ord("a")) & (out <= ord("z"))) & (rng.random(len(out)) < MUTATE)
    out[letters] = rng.integers(ord("a"), ord("z") + 1, size=int(letters.sum()), dtype=np.uint8)
    return out.tobytes()


def make_corpus(
    out: Path, n_bytes: int, seed: int = 0, files: int = 1, base: np.ndarray | None = None
) -> Path:
    """A generated corpus: one text file, or a folder of `files` text files; returns its path."""
    base = base_text() if base is None else base
    if files == 1:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as f:
            for i, start in enumerate(range(0, n_bytes, 64 << 20)):
                f.write(generate(min(64 << 20, n_bytes - start), seed * 100_003 + i, base))
        return out
    out.mkdir(parents=True, exist_ok=True)
    per_file = n_bytes // files
    for i in range(files):
        make_corpus(out / f"part-{i:05d}.txt", per_file, seed * 100_003 + 7 * i + 1, 1, base)
    return out


# A child's ru_maxrss starts at its parent's RSS at the fork (Linux keeps the old address space's peak
# across exec), so prepare runs under a small launcher whose RUSAGE_CHILDREN is the child's own peak.
LAUNCH = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
sys.exit(code)
"""

CHILD = """
import json, resource, sys, time
from tinylm.data import prepare
from tinylm.tokenizer import load_tokenizer
args = json.loads(sys.argv[1])
tokenizer = args.pop("tokenizer")
tokenizer = load_tokenizer(tokenizer) if tokenizer.endswith(".json") else tokenizer
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
start, start_cpu = time.perf_counter(), cpu()
meta = prepare(args.pop("inputs"), args.pop("out"), tokenizer, **args)
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_s": cpu() - start_cpu,
                  "tokens": meta["train_tokens"] + meta["val_tokens"],
                  "documents": meta["documents"], "shards": len(meta["shards"]["train"]) + len(meta["shards"]["val"]),
                  "sample_chars": meta.get("tokenizer_sample", {}).get("chars")}))
"""


def prepare_child(inputs: list[str], out: Path, tokenizer: str, **kwargs: Any) -> dict[str, Any]:
    """Run prepare in a fresh process (`tokenizer`: a kind, or a tokenizer.json to use); its time inside
    prepare (imports excluded), peak RSS and counts."""
    args = {"inputs": inputs, "out": str(out), "tokenizer": tokenizer, **kwargs}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-c", LAUNCH, sys.executable, "-c", CHILD, json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{proc.stderr[-3000:]}")
    *_, result, rss = proc.stdout.strip().splitlines()
    return {**json.loads(result), "peak_rss_mb": round(float(rss), 1)}


def cpu_seconds() -> float:
    """User + system CPU time of this process (every thread)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, Any]:
    """CPU kind, cores, load and date, for RESULTS.md."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")), ""
    )
    have = {f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "sha_ni") if f" {f}" in flags}
    return {
        "cpu": model or platform.processor(),
        "flags": sorted(have),
        "cores": os.cpu_count(),
        "load": [round(x, 2) for x in os.getloadavg()],
        "date": date.today().isoformat(),
    }


# ----- the three measurements --------------------------------------------------------------------
def memory(work: Path, sizes: list[int], tokenizer: str, vocab: int, sample: int) -> list[dict]:
    rows = []
    for size in sizes:
        corpus = make_corpus(work / f"mem-{size}.txt", size, seed=size % 997)
        out = work / f"mem-{size}-out"
        r = prepare_child([str(corpus)], out, tokenizer, vocab_size=vocab, tokenizer_sample=sample)
        rows.append({"corpus_mb": size / 1e6, "tokenizer": tokenizer, **r})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out)
        corpus.unlink()
    return rows


def scale(work: Path, size: int, files: int, tokenizer: str, vocab: int, sample: int) -> dict:
    t = time.perf_counter()
    corpus = make_corpus(work / "scale", size, seed=1, files=files)
    made = time.perf_counter() - t
    out = work / "scale-out"
    r = prepare_child([str(corpus)], out, tokenizer, vocab_size=vocab, tokenizer_sample=sample)
    row = {"corpus_gb": size / 1e9, "files": files, "tokenizer": tokenizer, "generate_s": round(made, 1), **r}
    row["mb_per_s"] = size / 1e6 / r["seconds"]
    print(json.dumps(row), flush=True)
    shutil.rmtree(out)
    shutil.rmtree(corpus)
    return row


def throughput(
    work: Path, size: int, tokenizer: str, vocab: int, repeats: int, files: int, baselines: list[str]
) -> dict:
    """Side by side, alternating: prepare with an already trained tokenizer (in a child process: its
    time inside prepare and its peak RSS) against the tokenizer's own batch encoding of the same
    pieces, held in memory in this process."""
    sys.path.insert(0, str(ROOT / "src"))
    from tinylm.data.encoding import CHAR_PIECE_CHARS, PIECE_CHARS, pieces
    from tinylm.data.splits import Part
    from tinylm.tokenizer import CharTokenizer, HFTokenizer, encode_arrays

    corpus = make_corpus(work / "tp", size, seed=3, files=files)
    os.sync()  # the new corpus on disk first, so its writeback does not compete with prepare's
    paths = sorted(corpus.rglob("*.txt")) if corpus.is_dir() else [corpus]
    texts = [p.read_text(encoding="utf-8") for p in paths]
    if tokenizer == "char":
        tok = CharTokenizer(set().union(*(set(t) for t in texts)) | {"\n"})
        piece_size = CHAR_PIECE_CHARS
    else:
        tok = HFTokenizer.train_bpe([texts[0][:10_000_000]], vocab)  # trained once, outside the timings
        piece_size = PIECE_CHARS
    tok.save(work / "tp-tokenizer.json")
    chunks = [
        p.text for t in texts for p in pieces([Part("train", t, True)], tokenizer == "char", piece_size)
    ]
    del texts
    cores = os.cpu_count() or 1
    batch = 2 * cores if tokenizer == "char" else max(16, 4 * cores)
    groups = [chunks[i : i + batch] for i in range(0, len(chunks), batch)]
    raw_groups = (
        {id(g): [c.encode("utf-8") for c in g] for g in groups}
        if {"decode_encode_arrays", "encode_utf8"} & set(baselines)
        else {}
    )
    calls = {
        "encode_arrays": lambda g: encode_arrays(tok, g),
        "decode_encode_arrays": lambda g: encode_arrays(tok, [b.decode("utf-8") for b in raw_groups[id(g)]]),
        "encode_utf8": lambda g: [tok.encode_utf8(b) for b in raw_groups[id(g)]],
        "encode_batch": lambda g: [e.ids for e in tok.tok.encode_batch(g)],
        "encode_batch_fast": lambda g: [e.ids for e in tok.tok.encode_batch_fast(g)],
    }

    def own(name: str) -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), cpu_seconds()
        for group in groups:
            calls[name](group)
        return time.perf_counter() - start, cpu_seconds() - start_cpu

    times: dict[str, list[float]] = {"prepare": [], **{b: [] for b in baselines}}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    rss = []
    for i in range(repeats):
        out = work / f"tp-out-{i}"
        r = prepare_child([str(corpus)], out, str(work / "tp-tokenizer.json"))
        times["prepare"].append(r["seconds"])
        cpu["prepare"].append(r["cpu_s"])
        rss.append(r["peak_rss_mb"])
        shutil.rmtree(out)
        for name in baselines:
            wall, used = own(name)
            times[name].append(wall)
            cpu[name].append(used)
        print(json.dumps({k: round(v[-1], 2) for k, v in times.items()}), flush=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    best = min(v for k, v in medians.items() if k != "prepare")
    row = {
        "corpus_mb": size / 1e6,
        "files": files,
        "tokenizer": tokenizer if tokenizer == "char" else f"bpe {vocab}",
        "median_s": {k: round(v, 2) for k, v in medians.items()},
        "mb_per_s": {k: round(size / 1e6 / v, 2) for k, v in medians.items()},
        "ratio_vs_fastest_own": round(medians["prepare"] / best, 3),
        "ratio_vs": {k: round(medians["prepare"] / v, 3) for k, v in medians.items() if k != "prepare"},
        "median_cpu_s": {k: round(statistics.median(v), 2) for k, v in cpu.items()},
        "prepare_peak_rss_mb": max(rss),
        "runs": times,
    }
    print(json.dumps(row), flush=True)
    shutil.rmtree(corpus) if corpus.is_dir() else corpus.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("memory", "throughput", "scale", "corpus"))
    parser.add_argument("--work", default="/tmp/data-bench", help="where corpora and outputs go (deleted)")
    parser.add_argument("--size", default="100MB", help="corpus size (throughput, scale, corpus)")
    parser.add_argument("--sizes", default="5MB,50MB", help="corpus sizes (memory)")
    parser.add_argument("--files", type=int, default=1, help="split the corpus into this many files")
    parser.add_argument("--tokenizer", default="char", choices=("char", "bpe"))
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokenizer-sample", type=int, default=None, help="BPE sample (default: prepare's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="corpus: where to write it")
    parser.add_argument(
        "--baselines",
        default=None,
        help="throughput: the tokenizer's own calls to compare with, comma-separated (default: "
        "encode_arrays,decode_encode_arrays,encode_utf8 for char; encode_batch,encode_batch_fast for bpe)",
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(json.dumps({"machine": info}), flush=True)
    sample = args.tokenizer_sample
    if args.what == "corpus":
        print(make_corpus(Path(args.out), parse_size(args.size), files=args.files))
        return
    if args.what == "memory":
        result: Any = memory(
            work, [parse_size(s) for s in args.sizes.split(",")], args.tokenizer, args.vocab_size, sample
        )
    elif args.what == "scale":
        result = scale(work, parse_size(args.size), args.files, args.tokenizer, args.vocab_size, sample)
    else:
        char = "encode_arrays,decode_encode_arrays,encode_utf8"
        own = args.baselines or (char if args.tokenizer == "char" else "encode_batch,encode_batch_fast")
        result = throughput(
            work,
            parse_size(args.size),
            args.tokenizer,
            args.vocab_size,
            args.repeats,
            args.files,
            own.split(","),
        )
    print(
        json.dumps(
            {"machine": {**info, "load_after": [round(x, 2) for x in os.getloadavg()]}, "result": result}
        )
    )


if __name__ == "__main__":
    main()
