"""Memory and start-up time do not grow with the corpus: prepare, and a training step, on a 5 MB and a
50 MB generated corpus, each in a fresh process measured by its peak RSS (getrusage).

A child's ru_maxrss starts at its parent's RSS at the fork (Linux carries the old address space's peak
across exec), so children are started by a small launcher and measured with its RUSAGE_CHILDREN."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_prepare import base_text, make_corpus  # noqa: E402

LAUNCH = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
sys.exit(code)
"""

PREPARE = """
import json, sys
from tinylm.data import prepare
inputs, out, tokenizer, options = json.loads(sys.argv[1])
meta = prepare(inputs, out, tokenizer, **options)
print(json.dumps({"tokens": meta["train_tokens"] + meta["val_tokens"]}))
"""

TRAIN_STEP = """
import json, sys, time
t0 = time.perf_counter()
import torch
import torch.nn.functional as F
from tinylm.config import ModelConfig, TrainConfig
from tinylm.data import TokenData, token_batches
from tinylm.model import Transformer
imported = time.perf_counter()
data = TokenData(sys.argv[1])
source, val = token_batches(data, 64, TrainConfig(epochs=1, max_steps=0, batch_size=8, eval_batches=4))
x, y = source.batch(source.total_steps // 2)  # mid-epoch: the order of every window is involved
ready = time.perf_counter()
model = Transformer(ModelConfig(vocab_size=data.tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
print(json.dumps({"startup_s": ready - imported, "windows": len(source.dataset)}))
"""


def child(code: str, *args: str) -> dict:
    """Run `code` in a fresh process: its JSON result plus its peak RSS in MB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", LAUNCH, sys.executable, "-c", code, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *_, result, rss = proc.stdout.strip().splitlines()
    return {**json.loads(result), "rss_mb": float(rss)}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory):
    """5 MB and 50 MB of generated text (whole lines of the shared corpora, letters mutated)."""
    tmp = tmp_path_factory.mktemp("scale")
    base = base_text()
    paths = {mb: make_corpus(tmp / f"c{mb}.txt", mb * 10**6, seed=mb, base=base) for mb in (5, 50)}
    yield tmp, paths
    shutil.rmtree(tmp)  # about 300 MB with the prepared tokens


@pytest.fixture(scope="module")
def prepared(corpora):
    tmp, paths = corpora
    runs = {
        mb: child(PREPARE, json.dumps([[str(p)], str(tmp / f"d{mb}"), "char", {"shard_tokens": 20_000_000}]))
        for mb, p in paths.items()
    }
    return tmp, runs


def test_prepare_memory_does_not_grow_with_the_corpus(prepared):
    tmp, runs = prepared
    small, large = runs[5], runs[50]
    assert large["tokens"] > 9 * small["tokens"]
    assert abs(large["rss_mb"] - small["rss_mb"]) < 100, runs  # the old prepare: about 18 bytes a character
    assert large["rss_mb"] < 1500, runs
    assert len(list((tmp / "d50").glob("train-*.bin"))) == 3  # 45M training tokens in 20M-token shards


def test_bpe_prepare_memory_does_not_grow_with_the_corpus(corpora, tmp_path):
    _, paths = corpora
    small, large = tmp_path / "s.txt", tmp_path / "l.txt"
    text = paths[5].read_bytes()
    small.write_bytes(text[:300_000])
    large.write_bytes(text[:3_000_000])
    options = {"vocab_size": 512, "tokenizer_sample": 300_000}
    runs = {n: child(PREPARE, json.dumps([[str(p)], str(tmp_path / n), "bpe", options])) for n, p in
            (("small", small), ("large", large))}  # fmt: skip
    assert runs["large"]["tokens"] > 8 * runs["small"]["tokens"]
    assert abs(runs["large"]["rss_mb"] - runs["small"]["rss_mb"]) < 100, (
        runs
    )  # the old one: 94 B/char (250 MB)


def test_a_training_step_costs_the_same_on_a_ten_times_larger_corpus(prepared):
    tmp, _ = prepared
    small, large = (child(TRAIN_STEP, str(tmp / f"d{mb}")) for mb in (5, 50))
    assert large["windows"] > 9 * small["windows"]
    # the old epoch order was a permutation of every window: +360 MB and seconds at 45M windows
    assert abs(large["rss_mb"] - small["rss_mb"]) < 50, (small, large)
    assert large["startup_s"] < small["startup_s"] + 0.5, (small, large)
