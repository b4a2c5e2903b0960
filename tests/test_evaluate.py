import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from tinylm.checkpoint import load_run
from tinylm.data import TokenData
from tinylm.evaluate import evaluate_tokens, plan_windows


class Uniform(nn.Module):
    """Predicts every token with equal probability."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab) + self.dummy


def test_uniform_model_perplexity_equals_vocab_size():
    tokens = np.random.default_rng(0).integers(0, 50, 1000)
    result = evaluate_tokens(Uniform(50), tokens, block_size=64, chars=1000, n_bytes=1000)
    assert result.tokens == 999
    assert result.perplexity == pytest.approx(50.0)
    assert result.bits_per_token == pytest.approx(math.log2(50))


def test_plan_windows_scores_each_target_once():
    for n, block, stride in [(100, 16, None), (100, 16, 4), (17, 16, None), (50, 16, 16)]:
        covered = []
        for start, length, skip in plan_windows(n, block, stride):
            assert length <= block
            covered += list(range(start + skip + 1, start + length + 1))
        assert covered == list(range(1, n))


def test_perplexity_is_exp_loss_and_stride_helps(tiny_run):
    run = load_run(tiny_run)
    tokens = TokenData(run.record.data).split("val")[:2000]
    plain = evaluate_tokens(run.model, tokens, block_size=32, chars=2000, n_bytes=2000)
    assert plain.perplexity == pytest.approx(math.exp(plain.loss))
    assert plain.bits_per_char == pytest.approx(
        plain.loss / math.log(2), rel=1e-3
    )  # char-level: 1 token = 1 char
    # a direct cross-entropy over the same non-overlapping windows gives the same mean loss
    head = np.asarray(tokens[: 10 * 32 + 1], dtype=np.int64)
    x, y = torch.from_numpy(head[:-1]).view(10, 32), torch.from_numpy(head[1:]).view(10, 32)
    with torch.no_grad():
        direct = torch.nn.functional.cross_entropy(run.model(x).flatten(0, 1), y.flatten()).item()
    assert evaluate_tokens(run.model, head, block_size=32).loss == pytest.approx(direct, rel=1e-5)
    strided = evaluate_tokens(run.model, tokens, block_size=32, stride=8)
    assert strided.tokens == plain.tokens

    def mean_context(stride):  # tokens of context each scored target sees
        plan = plan_windows(len(tokens), 32, stride)
        return np.mean([j + 1 for _, length, skip in plan for j in range(skip, length)])

    assert mean_context(8) > 1.5 * mean_context(None)  # more context per prediction
    # each target scored once, given exactly the window's tokens before it (a naive reference, one at a time)
    few = np.asarray(tokens[:120], dtype=np.int64)
    naive = 0.0
    with torch.no_grad():
        for start, length, skip in plan_windows(len(few), 32, 8):
            for j in range(skip, length):
                context = torch.from_numpy(few[start : start + j + 1])[None]
                target = torch.tensor([int(few[start + j + 1])])
                naive += torch.nn.functional.cross_entropy(run.model(context)[0, -1:], target).item()
    assert evaluate_tokens(run.model, few, block_size=32, stride=8).nll == pytest.approx(naive, rel=1e-5)


def test_a_token_budget_scores_the_first_tokens(tiny_run, capsys):
    import json

    from tinylm.cli import main

    run = load_run(tiny_run)
    tokens = TokenData(run.record.data).split("val")
    head = evaluate_tokens(run.model, tokens[:601], block_size=32)
    capped = evaluate_tokens(run.model, tokens, block_size=32, max_tokens=600, chars=10_000, n_bytes=10_000)
    assert capped.tokens == 600 and capped.nll == head.nll and capped.max_tokens == 600
    assert capped.chars == round(10_000 * 600 / (len(tokens) - 1))  # the share of the split it covers
    assert main(["eval", str(tiny_run), "--max-tokens", "600", "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "over 600 tokens (budget 600 of 9,999)" in out
    summary = json.loads(out.splitlines()[-1])
    assert summary["tokens"] == 600 and summary["max_tokens"] == 600 and summary["loss"] == capped.loss
