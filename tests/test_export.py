"""Hugging Face parity: exported runs load in transformers with the same logits and greedy text; imports round-trip."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import FLAVOURS  # noqa: E402
from tinylm.checkpoint import RunRecord, load_run, save_checkpoint  # noqa: E402
from tinylm.cli import main  # noqa: E402
from tinylm.config import (  # noqa: E402
    ModelConfig,
    SampleConfig,  # noqa: E402
    TrainConfig,
)
from tinylm.errors import TinyLMError  # noqa: E402
from tinylm.export import export_hf, from_hf_state, import_hf, to_hf_state  # noqa: E402
from tinylm.generate import generate_tokens  # noqa: E402
from tinylm.model import Transformer  # noqa: E402
from tinylm.tokenizer import CharTokenizer, HFTokenizer  # noqa: E402

pytestmark = pytest.mark.numerics


def _make_run(path, tokenizer, **flavour):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=32, **flavour
    )
    model = Transformer(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so the mapping of every tensor is checked
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    RunRecord(cfg, TrainConfig()).write(path, tokenizer)
    save_checkpoint(path, "last", model.state_dict(), None, {"step": 0})
    return path


@pytest.fixture(scope="module")
def bpe(shakespeare_text):
    return HFTokenizer.train_bpe([shakespeare_text[:100_000]], vocab_size=400)


CASES = {
    "gpt": FLAVOURS["gpt"],
    "gpt-untied-nobias": {**FLAVOURS["gpt"], "tie_embeddings": False, "bias": False},
    "llama": FLAVOURS["llama"],
    "llama-gqa-tied": {**FLAVOURS["llama-gqa"], "tie_embeddings": True},
    "mixtral": FLAVOURS["llama-moe"],
    "qwen3-gqa": {**FLAVOURS["llama-gqa"], "qk_norm": True},  # LLaMA + QK-norm (issue 22)
}


@pytest.mark.parametrize("case", CASES)
def test_export_parity_logits_and_greedy(case, bpe, tmp_path):
    run_dir = _make_run(tmp_path / "run", bpe, **CASES[case])
    out = export_hf(run_dir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    expected = {
        "gpt": "GPT2LMHeadModel",
        "llama": "LlamaForCausalLM",
        "mixtral": "MixtralForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
    }
    assert type(hf).__name__ == expected[case.split("-")[0]]
    run = load_run(run_dir)
    idx = torch.randint(0, bpe.vocab_size, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, run.model(idx), atol=1e-4, rtol=1e-4)
    prompt = "ROMEO: What say you"
    assert tok(prompt)["input_ids"] == bpe.encode(prompt)
    ids = torch.tensor([bpe.encode(prompt)])
    ours = torch.cat(list(generate_tokens(run.model, ids, SampleConfig(max_new_tokens=15, do_sample=False))))
    theirs = hf.generate(ids, max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None)[
        0, ids.size(1) :
    ]
    assert theirs.tolist() == ours.tolist()


def test_char_tokenizer_exports(tmp_path, shakespeare_text):
    chars = CharTokenizer.train(shakespeare_text[:50_000])
    out = export_hf(_make_run(tmp_path / "run", chars, **FLAVOURS["gpt"]), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "KING RICHARD:\nNow is the winter of our discontent"
    assert tok(text)["input_ids"] == chars.encode(text)
    assert tok.decode(chars.encode(text)) == text


@pytest.mark.parametrize("case", ["gpt", "llama-gqa-tied", "mixtral", "qwen3-gqa"])
def test_import_round_trip(case, bpe, tmp_path):
    run_dir = _make_run(tmp_path / "run", bpe, **CASES[case])
    back = load_run(import_hf(export_hf(run_dir, tmp_path / "hf"), tmp_path / "imported"))
    idx = torch.randint(0, bpe.vocab_size, (2, 30))
    torch.testing.assert_close(back.model(idx), load_run(run_dir).model(idx), atol=1e-5, rtol=1e-5)
    assert back.tokenizer.encode("To be, or not") == bpe.encode("To be, or not")


def test_import_random_transformers_gpt2(tmp_path, bpe):
    config = transformers.GPT2Config(
        vocab_size=bpe.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    bpe.save(tmp_path / "hf" / "tokenizer.json")
    run = load_run(import_hf(tmp_path / "hf", tmp_path / "run"))
    idx = torch.randint(0, bpe.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(run.model(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_unexportable_and_unimportable(tmp_path, bpe):
    run_dir = _make_run(tmp_path / "run", bpe, position="rope", norm="layernorm", mlp="gelu")
    with pytest.raises(TinyLMError, match="not exportable"):
        export_hf(run_dir, tmp_path / "hf")
    speedrun = {k: v for k, v in FLAVOURS["speedrun"].items() if k != "n_layer"}
    speedrun = _make_run(tmp_path / "speedrun", bpe, **speedrun)
    with pytest.raises(TinyLMError, match="uses mlp=relu2, qk_norm, embed_skip, unet_skips, value_embeds=1"):
        export_hf(speedrun, tmp_path / "hf2")
    qwen3 = export_hf(_make_run(tmp_path / "qwen3", bpe, **CASES["qwen3-gqa"]), tmp_path / "hf3")
    from safetensors.torch import load_file, save_file

    weights = load_file(qwen3 / "model.safetensors")
    weights["model.layers.1.self_attn.k_norm.weight"] *= 2  # a trained Qwen3 norm: tinylm has no such weight
    save_file(weights, qwen3 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TinyLMError, match="trained query/key norm weights"):
        import_hf(qwen3, tmp_path / "back")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(TinyLMError, match="cannot be imported"):
        import_hf(tmp_path / "bert", tmp_path / "out")


@pytest.mark.parametrize("case", CASES)
def test_one_mapping_inverts_exactly(case):
    """Each architecture's mapping is written once: import is the same rules inverted, bit for bit."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=70, block_size=16, n_layer=2, n_head=4, n_embd=32, **CASES[case])
    sd = Transformer(cfg).state_dict()
    back = from_hf_state(cfg, to_hf_state(cfg, sd))
    expected = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_import_without_tokenizer_files_is_a_clear_error(tmp_path, bpe, capsys):
    config = transformers.GPT2Config(
        vocab_size=bpe.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(TinyLMError, match="has no tokenizer files"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
    (tmp_path / "tok").mkdir()
    bpe.save(tmp_path / "tok" / "tokenizer.json")
    out = tmp_path / "run2"
    assert (
        main(["import-hf", str(tmp_path / "hf"), "--out", str(out), "--tokenizer", str(tmp_path / "tok")])
        == 0
    )
    assert load_run(out).tokenizer.encode("To be") == bpe.encode("To be")


def test_a_generation_that_decodes_to_nothing_is_an_error(tiny_run, monkeypatch, capsys):
    from tinylm.tokenizer import CharTokenizer

    monkeypatch.setattr(CharTokenizer, "decode", lambda self, ids: "")  # a tokenizer that lost its vocabulary
    code = main(
        ["generate", str(tiny_run), "--prompt", "A", "--max-new-tokens", "5", "--no-progress", "--json"]
    )
    assert code == 2 and "decodes to no text" in capsys.readouterr().err
