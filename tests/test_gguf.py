"""GGUF export checked by a real llama.cpp (llama-cpp-python): the same logits, greedy tokens and token ids."""

from __future__ import annotations

from contextlib import closing

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FLAVOURS
from tinylm.checkpoint import RunRecord, load_run, save_checkpoint
from tinylm.config import ModelConfig, SampleConfig, TrainConfig
from tinylm.errors import TinyLMError
from tinylm.export_gguf import export_gguf, gguf_architecture, permute_rope, write_gguf
from tinylm.generate import generate_tokens
from tinylm.model import Transformer
from tinylm.model.layers import apply_rope, rope_tables
from tinylm.tokenizer import CharTokenizer, HFTokenizer

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package (pip install 'tinylm[gguf]')")
pytestmark = pytest.mark.numerics

SAMPLE = "ROMEO: What say you, my lord?\nJULIET: Ay, 'tis so; and so, more!"


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install 'tinylm[llama]')"
    )


@pytest.fixture(scope="module")
def tokenizers(shakespeare_text):
    text = shakespeare_text[:100_000]
    return {"char": CharTokenizer.train(text), "bpe": HFTokenizer.train_bpe([text], vocab_size=400)}


def _random_model(tokenizer, **flavour) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64, **flavour
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so every tensor's mapping is checked
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _load(llama_cpp, path, n_ctx: int = 64):
    # f32 KV cache (llama.cpp defaults to f16), no flash attention; one thread: the results do not depend on it
    return llama_cpp.Llama(
        str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True, type_k=0, type_v=0, verbose=False
    )


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])  # (T, V)


_TORCH_GELU = F.gelu


def ggml_gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """llama.cpp's CPU GELU: the tanh formula read from a table indexed by fp16(x), stored in fp16."""
    table = _TORCH_GELU(x.half().float(), approximate="tanh").half().float()
    return torch.where(x >= 10, x, torch.where(x <= -10, torch.zeros_like(x), table))


CASES = {
    "gpt": FLAVOURS["gpt"],
    "gpt-untied-nobias": {**FLAVOURS["gpt"], "tie_embeddings": False, "bias": False},
    "llama": FLAVOURS["llama"],
    "llama-gqa": FLAVOURS["llama-gqa"],
    "llama-moe": FLAVOURS["llama-moe"],
    "llama-tied-bias": {**FLAVOURS["llama"], "tie_embeddings": True, "bias": True},
    "qwen3-gqa": {**FLAVOURS["llama-gqa"], "qk_norm": True},  # llama.cpp's qwen3: LLaMA + QK-norm (issue 22)
}


@pytest.mark.parametrize("tok", ["char", "bpe"])
@pytest.mark.parametrize("case", CASES)
def test_f32_logits_and_token_ids_match_llama_cpp(case, tok, tokenizers, llama_cpp, tmp_path, monkeypatch):
    tokenizer = tokenizers[tok]
    model = _random_model(tokenizer, **CASES[case])
    path = write_gguf(model.cfg, model.state_dict(), tokenizer, tmp_path / "m.gguf")
    ids = tokenizer.encode(SAMPLE)
    with closing(_load(llama_cpp, path)) as llm:
        assert llm.tokenize(SAMPLE.encode(), add_bos=False, special=False) == ids
        assert llm.detokenize(ids).decode() == SAMPLE
        theirs = torch.from_numpy(_llama_logits(llm, ids))
    if model.cfg.mlp == "gelu":  # llama.cpp rounds GELU through an fp16 table; compare with that arithmetic
        monkeypatch.setattr(F, "gelu", ggml_gelu)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(theirs[-1], ours[-1], atol=1e-4, rtol=0)  # the last position, as promised
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)  # and every other one


def test_rope_permutation_turns_rotate_half_into_adjacent_pairs():
    """permute(rope_halves(x)) == rope_pairs(permute(x)): llama.cpp's rotation of the permuted rows."""
    n_head, hd, T = 3, 8, 5
    x = torch.randn(T, n_head * hd)
    cos, sin = rope_tables(hd, T)
    halves = apply_rope(x.view(T, n_head, hd).transpose(0, 1), cos, sin).transpose(0, 1).reshape(T, -1)
    permuted = permute_rope(x.T, n_head).T.reshape(T, n_head, hd // 2, 2)  # (T, H, hd/2, pair)
    angle = torch.outer(torch.arange(T, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, hd, 2) / hd))
    c, s = angle.cos()[:, None], angle.sin()[:, None]  # (T, 1, hd/2)
    a, b = permuted[..., 0], permuted[..., 1]
    pairs = torch.stack([a * c - b * s, a * s + b * c], dim=-1).reshape(T, -1)
    torch.testing.assert_close(permute_rope(halves.T, n_head).T, pairs)


# ----- trained models: quantized files decode the same greedy text ----------------------------
TRAINED = {"gpt": FLAVOURS["gpt"], "llama": FLAVOURS["llama"], "llama-moe": FLAVOURS["llama-moe"]}


@pytest.fixture(scope="module", params=list(TRAINED))
def trained_run(request, char_data, tmp_path_factory):
    """150 steps of the `tiny` recipe, 64 wide: trained enough that greedy choices are not near-ties."""
    from tinylm.train import train

    out = tmp_path_factory.mktemp("gguf_runs") / request.param
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # matmuls this small gain nothing from a second thread, on a busy machine lose much
    try:
        recipe = {"n_embd": 64, "n_head": 4, "max_steps": 150, "eval_interval": 150}
        train(char_data, out, "tiny", {**TRAINED[request.param], **recipe}, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def _llama_greedy(llm, ids: list[int], steps: int, block_size: int) -> list[int]:
    """Greedy decoding in llama.cpp with tinylm's rule: past the context, re-encode the last block_size tokens."""
    seq, out = list(ids), []
    llm.reset()
    llm.eval(seq)
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        seq.append(out[-1])
        if len(seq) > block_size:
            llm.reset()
            llm.eval(seq[-block_size:])
        else:
            llm.eval(out[-1:])
    return out


@pytest.mark.parametrize("quant", ["q8_0", "f16"])
def test_quantized_greedy_tokens_match_for_50_steps(trained_run, quant, llama_cpp, tmp_path):
    path = export_gguf(trained_run, tmp_path / f"m-{quant}.gguf", quant)
    run = load_run(trained_run)
    ids = run.tokenizer.encode("ROMEO:\nWhat ")
    cfg = SampleConfig(max_new_tokens=50, do_sample=False)
    ours = [int(t) for t in generate_tokens(run.model, torch.tensor([ids]), cfg)]
    with closing(_load(llama_cpp, path)) as llm:  # 50 steps cross the 32-token context
        theirs = _llama_greedy(llm, ids, 50, run.model_cfg.block_size)
    assert theirs == ours, f"{run.tokenizer.decode(theirs)!r} != {run.tokenizer.decode(ours)!r}"


def test_written_file_layout(trained_run, tmp_path):
    """Tensor types per --quant, tied embeddings without output.weight, and the metadata llama.cpp reads."""
    path = export_gguf(trained_run, tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    run = load_run(trained_run)
    arch = gguf_architecture(run.model_cfg)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == arch
    assert field(f"{arch}.context_length") == run.model_cfg.block_size
    assert ("output.weight" in types) == (not run.model_cfg.tie_embeddings)
    assert all(v == "F32" for k, v in types.items() if k.endswith(("norm.weight", "bias", "gate_inp.weight")))
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_output.weight"] == "Q8_0"
    assert field("tokenizer.ggml.tokens") == [c.replace(" ", "\u2581") for c in run.tokenizer.chars]


# ----- what cannot be exported, and never overwriting ----------------------------------------
@pytest.mark.parametrize(
    "flavour",
    [
        FLAVOURS["gpt-moe"],
        {**FLAVOURS["llama"], "norm": "layernorm"},
        {**FLAVOURS["gpt"], "norm": "rmsnorm"},
        {**FLAVOURS["gpt"], "n_kv_head": 2},
    ],
)
def test_unrepresentable_architectures_are_one_clear_error(flavour):
    with pytest.raises(TinyLMError, match="llama.cpp has no architecture for this model"):
        gguf_architecture(
            ModelConfig(vocab_size=65, block_size=32, n_layer=1, n_head=4, n_embd=32, **flavour)
        )


def test_cli_exports_and_never_overwrites(tmp_path, tokenizers):
    from tinylm.cli import main

    tokenizer = tokenizers["char"]
    model = _random_model(tokenizer, **FLAVOURS["llama"])
    run = tmp_path / "run"
    RunRecord(model.cfg, TrainConfig()).write(run, tokenizer)
    save_checkpoint(run, "last", model.state_dict(), None, {"step": 0})
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--format", "gguf", "--quant", "q8_0", "--out", str(out), "--json"]) == 0
    before = out.read_bytes()
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 2
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_tiktoken_tokenizer_is_refused(tmp_path, tokenizers):
    class Tiktokenish:
        kind, vocab_size, eot_id = "gpt2", 65, None

    model = _random_model(tokenizers["char"], **FLAVOURS["llama"])
    with pytest.raises(TinyLMError, match="cannot be written to GGUF"):
        write_gguf(model.cfg, model.state_dict(), Tiktokenish(), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
