"""`tinylm info --preset`: parameter counts for the vocabulary each preset is meant for."""

import json

import pytest

from conftest import tiny_config
from tinylm.cli import main


def info(capsys, *argv: str) -> dict:
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "preset, vocab, parameters",
    [
        ("mini-gpt", 50257, 16_058_112),  # the README's 16.1M, GPT-2's vocabulary, tied embeddings
        ("gpt2-small", 50257, 124_439_808),  # GPT-2 small as Hugging Face counts it
        ("seed-char-moe", 65, 2_248_064),  # the first tutorial's 65 characters
    ],
)
def test_preset_counts_its_own_vocabulary(capsys, preset, vocab, parameters):
    out = info(capsys, "--preset", preset)
    assert out["config"]["vocab_size"] == vocab and out["parameters"] == parameters


def test_set_vocab_size_is_honoured(capsys):
    # Tied embeddings: each vocabulary entry is one row of n_embd (256) parameters.
    out = info(capsys, "--preset", "mini-gpt", "--set", "vocab_size=8192")
    assert out["config"]["vocab_size"] == 8192
    assert out["parameters"] == 16_058_112 - (50257 - 8192) * 256
    assert info(capsys, "--preset", "mini-gpt", "--vocab-size", "8192")["parameters"] == out["parameters"]


@pytest.mark.parametrize("mlp", ["gelu", "swiglu", "relu2"])
def test_train_and_info_describe_every_feed_forward(mlp):
    from tinylm.cli.common import describe_model

    line = describe_model(tiny_config(mlp=mlp, qk_norm=True, value_embeds=1))
    assert {"gelu": "GELU", "swiglu": "SwiGLU", "relu2": "ReLU²"}[mlp] in line
    assert "; qk_norm value_embeds=1)" in line  # every speedrun option on, as --set names it
