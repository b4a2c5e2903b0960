"""int8 weight-only decoding and the bf16 CPU detection."""

import importlib
import json

import pytest
import torch

from conftest import FLAVOURS, tiny_config
from tinylm.checkpoint import load_run
from tinylm.cli import main
from tinylm.data import TokenData
from tinylm.evaluate import evaluate_tokens
from tinylm.generate import decode_dtype, generate
from tinylm.model import Transformer
from tinylm.quantize import Int8Linear, quantize_int8, quantize_per_channel
from tinylm.runtime import cpu_has_bf16

pytestmark = pytest.mark.numerics


def test_per_channel_int8_round_trip_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.linspace(0.01, 3.0, 48)[:, None]  # rows of very different scales
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)


def test_int8_linear_matches_the_dequantized_matmul():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q, scale = quantize_per_channel(linear.weight)
    x = torch.randn(2, 5, 64)
    expected = x @ (q.float() * scale[:, None]).T + linear.bias
    # float32 sums of 64 products of size ~1: rounding far below 1e-4
    torch.testing.assert_close(Int8Linear(linear, torch.float32)(x), expected, atol=1e-4, rtol=1e-4)


def test_int8_linear_in_bf16_rounds_only_its_input_and_output():
    """The default on CPU: bf16 activations inside the kernel (float32 accumulation), float32 outside."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear(linear, torch.bfloat16)
    assert layer(torch.randn(1, 64)).dtype == torch.float32
    q, scale = quantize_per_channel(linear.weight)
    x = torch.randn(2, 5, 64)
    # the input and the scales rounded to bf16 exactly, then float32 sums of 64 products
    expected = (x.bfloat16().float() @ q.float().T) * scale.bfloat16().float()
    # the kernel returns bf16: rounding to nearest is within half a step, 2^-8 of the value
    got = layer(x) - linear.bias.detach()
    torch.testing.assert_close(got, expected, rtol=2**-8, atol=1e-5)


@pytest.mark.parametrize("flavour", ["llama", "llama-moe"])
def test_quantize_replaces_every_linear(flavour):
    model = quantize_int8(Transformer(tiny_config(**FLAVOURS[flavour])))
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert model(torch.randint(0, 65, (1, 8))).shape == (1, 8, 65)


def test_int8_validation_loss_within_one_percent_of_fp32(tiny_run):
    run = load_run(tiny_run)
    tokens = TokenData(run.record.data).split("val")[:4000]
    block = run.model_cfg.block_size
    fp32 = evaluate_tokens(run.model, tokens, block_size=block).loss
    int8 = evaluate_tokens(quantize_int8(run.model), tokens, block_size=block).loss
    assert abs(int8 - fp32) / fp32 < 0.01
    assert generate(run.model, run.tokenizer, "ROMEO:", max_new_tokens=20, seed=0)[0].tokens == 20


def _cli_generation(monkeypatch, capsys, argv):
    """(printed text, model that decoded it) of `tinylm generate ARGV --json`, run in this process."""
    gen = importlib.import_module("tinylm.generate")  # the package's `generate` is the function

    used, real = [], gen.decode_texts
    monkeypatch.setattr(gen, "decode_texts", lambda m, *a, **k: used.append(m) or real(m, *a, **k))
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"], used[0]


def test_generate_quantize_and_dtype_flags(tiny_run, monkeypatch, capsys):
    argv = [
        "generate",
        str(tiny_run),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "30",
        "--no-progress",
        "--greedy",
    ]
    text, model = _cli_generation(monkeypatch, capsys, [*argv, "--quantize", "int8"])
    reference = quantize_int8(load_run(tiny_run).model)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    for got, want in zip(layers, (m for m in reference.modules() if isinstance(m, Int8Linear))):
        assert torch.equal(got.weight_int8, want.weight_int8) and torch.equal(got.scale, want.scale)
    assert (
        text
        == generate(reference, load_run(tiny_run).tokenizer, "ROMEO:", max_new_tokens=30, do_sample=False)[
            0
        ].text
    )
    text, model = _cli_generation(monkeypatch, capsys, [*argv, "--dtype", "bf16"])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    run = load_run(tiny_run)
    expected = generate(
        run.model.to(torch.bfloat16), run.tokenizer, "ROMEO:", max_new_tokens=30, do_sample=False
    )
    assert text == expected[0].text


def test_bf16_detection_drives_dtype_auto():
    expected = torch.bfloat16 if cpu_has_bf16() else torch.float32
    assert decode_dtype("auto", torch.device("cpu")) == expected
    assert decode_dtype("bf16", torch.device("cpu")) == torch.bfloat16
