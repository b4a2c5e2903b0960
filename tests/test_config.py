import pytest

from tinylm.config import PRESETS, ModelConfig, SampleConfig, TrainConfig, build_configs, parse_overrides
from tinylm.errors import TinyLMError
from tinylm.model import Transformer, parameter_summary


def test_presets_build_and_have_expected_sizes():
    sizes = {}
    for name in PRESETS:
        model_cfg, _ = build_configs(name, vocab_size=65)
        if name != "gpt2-small":
            sizes[name] = parameter_summary(Transformer(model_cfg))
    # The first tutorial's reference model: 43 trainable tensors, about 2.24M parameters.
    assert sizes["seed-char-moe"]["tensors"] == 43
    assert 2.2e6 < sizes["seed-char-moe"]["parameters"] < 2.3e6
    assert 10.6e6 < sizes["shakespeare-char"]["parameters"] < 10.8e6


def test_mini_gpt_preset_matches_tutorial_shape():
    m, t = build_configs("mini-gpt", vocab_size=50257)
    assert (m.block_size, m.n_embd, m.n_head, m.n_layer, m.hidden_dim, m.dropout) == (
        128,
        256,
        8,
        4,
        1024,
        0.1,
    )
    assert t.lr == 3e-4 and t.min_lr_ratio == 0.1 and t.max_grad_norm == 1.0


def test_overrides_are_typed_and_routed():
    o = parse_overrides(["n_layer=3", "dropout=0.1", "bias=false", "schedule=wsd"])
    assert o == {"n_layer": 3, "dropout": 0.1, "bias": False, "schedule": "wsd"}
    m, t = build_configs("tiny", o, vocab_size=10)
    assert m.n_layer == 3 and m.bias is False and t.schedule == "wsd"


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["n_layer=abc"], "not a valid int"),
        (["nope=1"], "Unknown config key"),
        (["n_layer"], "key=value"),
    ],
)
def test_bad_overrides(pairs, message):
    with pytest.raises(TinyLMError, match=message):
        parse_overrides(pairs)


def test_validation_messages():
    with pytest.raises(TinyLMError, match=r"n_embd \(250\) must be divisible by n_head \(8\)"):
        ModelConfig(n_embd=250, n_head=8)
    with pytest.raises(TinyLMError, match="Unknown preset"):
        build_configs("nope")
    with pytest.raises(TinyLMError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(TinyLMError, match="optimizer must be one of adamw, muon"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(TinyLMError, match="train it with DDP"):
        TrainConfig(optimizer="muon", fsdp=True)
    with pytest.raises(TinyLMError, match="muon_lr"):
        TrainConfig(muon_lr=0.0)
    with pytest.raises(TinyLMError, match="top_p"):
        SampleConfig(top_p=0.0)
    with pytest.raises(TinyLMError, match="temperature"):
        SampleConfig(temperature=0.0)
    with pytest.raises(TinyLMError, match="top_k"):
        SampleConfig(top_k=-1)
    SampleConfig(temperature=0.0, do_sample=False)  # greedy needs no temperature


@pytest.mark.parametrize(
    "values, message",
    [
        ({"value_embeds": 3}, r"value_embeds \(3\) must be between 0 and n_layer \(2\)"),
        ({"logit_softcap": -1.0}, "logit_softcap"),
        ({"mlp": "relu"}, "mlp must be one of gelu, swiglu, relu2"),
        ({"orthogonalizer": "svd"}, "orthogonalizer must be one of"),
        ({"orthogonalizer": "polar-express", "ns_steps": 6}, "published"),
        ({"ns_steps": 0}, "ns_steps"),
        ({"normuon_beta2": 1.0}, "normuon_beta2"),
        (
            {"batch_size_start": 9, "ramp_steps": 10},
            r"batch_size_start \(9\) must be between 0 \(off\) and batch_size \(8\)",
        ),
        (
            {"block_size_start": 64, "ramp_steps": 10},
            r"block_size_start \(64\) must be between 0 \(off\) and block_size \(32\)",
        ),
        ({"block_size_start": 16}, "ramp_steps > 0"),
    ],
)
def test_speedrun_options_are_validated(values, message):
    with pytest.raises(TinyLMError, match=message):
        build_configs("tiny", values, vocab_size=65)


def test_speedrun_options_are_off_by_default_and_listed_when_on():
    # only cpu-llama and cpu-record, the record recipe (`make demo`), take the options that helped (RESULTS.md, issue 22)
    ramps = {"cpu-llama": (16, 75, 175, 4), "cpu-record": (16, 95, 225, 2)}
    for name in PRESETS:
        model_cfg, train_cfg = build_configs(name, vocab_size=65)
        if name in ramps:
            assert model_cfg.extras() == ["qk_norm"] and train_cfg.normuon
            shape = (train_cfg.block_size_start, train_cfg.ramp_steps, train_cfg.max_steps, model_cfg.n_layer)
            assert shape == ramps[name], name
            continue
        assert train_cfg.batch_size_start == train_cfg.block_size_start == 0 and not train_cfg.normuon
        assert model_cfg.extras() == [] and train_cfg.orthogonalizer == "newton-schulz"
    m, _ = build_configs("tiny", parse_overrides(["qk_norm=true", "value_embeds=1", "logit_softcap=15"]))
    assert m.extras() == ["qk_norm", "value_embeds=1", "logit_softcap=15.0"]
