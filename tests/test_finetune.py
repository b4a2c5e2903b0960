"""Fine-tuning: response-only loss, LoRA leaves base weights untouched, adapters save alone, merge is exact."""

import json

import pytest
import torch

from conftest import FLAVOURS, tiny_config
from tinylm.checkpoint import load_run
from tinylm.errors import TinyLMError
from tinylm.evaluate import IGNORE
from tinylm.finetune import encode_pair, finetune, merge_run, pair_batches, read_pairs
from tinylm.lora import LoRAConfig, LoRALinear, apply_lora, lora_state_dict, merge_lora, trainable_parameters
from tinylm.model import Transformer
from tinylm.tokenizer import CharTokenizer

PAIRS = [
    {"prompt": f"Q: Who is {n}?\nA:", "response": f" {r}.\n"}
    for n, r in [
        ("Romeo", "a Montague"),
        ("Juliet", "a Capulet"),
        ("Lear", "a king"),
        ("Puck", "a sprite"),
        ("Hal", "a prince"),
    ]
]


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def test_validation_pairs_follow_the_budget_and_are_shared_out_among_processes(tmp_path):
    from tinylm.config import TrainConfig
    from tinylm.evaluate import scored_tokens

    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz:? .\nQA0123456789")
    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Q: {i}?\nA:", "response": f" {i}.\n"}) + "\n" for i in range(400))
    )
    cfg = TrainConfig(batch_size=4, eval_batches=100)
    _, whole = pair_batches(path, tok, 32, cfg)
    assert len(whole) == 10  # the last 40 pairs validate, 4 per batch
    _, budget = pair_batches(path, tok, 32, TrainConfig(batch_size=4, eval_tokens=300))
    assert len(budget) == 3  # ceil(300 / (4 x 32)) whole batches
    halves = [pair_batches(path, tok, 32, cfg, rank, 2)[1] for rank in (0, 1)]
    assert [len(h) for h in halves] == [5, 5]  # each process scores its own half, none twice
    assert sum(scored_tokens(h) for h in halves) == scored_tokens(whole)
    # 40 pairs over 3 processes: 13 each (one left out), so every process evaluates as many batches (each
    # batch is a collective step: unequal counts would leave one process waiting for the others forever)
    thirds = [pair_batches(path, tok, 32, cfg, rank, 3)[1] for rank in (0, 1, 2)]
    assert [sum(len(x) for x, _ in t) for t in thirds] == [13, 13, 13] and len({len(t) for t in thirds}) == 1


def test_only_response_tokens_carry_loss():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz:? .\nQA")
    ids, labels = encode_pair(tok, "Q: hi?\nA:", " yes.\n", block_size=64)
    prompt_len = len("Q: hi?\nA:")
    assert len(ids) == len(labels) == prompt_len + len(" yes.\n") - 1
    assert labels[: prompt_len - 1] == [IGNORE] * (prompt_len - 1)
    assert tok.decode(labels[prompt_len - 1 :]) == " yes.\n"  # every response token is a target
    assert (
        ids[prompt_len - 1] == tok.encode(":")[0]
    )  # the last prompt token predicts the first response token


def test_bad_jsonl_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "only"}\n')
    with pytest.raises(TinyLMError, match='line 2 needs string fields "prompt" and "response"'):
        read_pairs(path)
    path.write_text("not json\n")
    with pytest.raises(TinyLMError, match="line 1 is not valid JSON"):
        read_pairs(path)


def test_lora_targets_and_trainable_count():
    model = Transformer(tiny_config(**FLAVOURS["llama"]))
    with pytest.raises(TinyLMError, match="No linear layer named nope"):
        apply_lora(model, LoRAConfig(targets=("nope",)))
    apply_lora(model, LoRAConfig(rank=4))
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 7  # wq wk wv wo w1 w2 w3 per layer
    trainable, total = trainable_parameters(model)
    assert (
        trainable == sum(p.numel() for m in wrapped for p in (m.lora_a, m.lora_b)) and trainable < total / 5
    )


def test_merge_gives_the_same_logits():
    torch.manual_seed(0)
    model = apply_lora(Transformer(tiny_config(**FLAVOURS["gpt"])).eval(), LoRAConfig(rank=4))
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.1)  # a trained-looking adapter
    idx = torch.randint(0, 65, (2, 16))
    before = model(idx)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(idx), before, atol=1e-5, rtol=1e-5)


def test_lora_finetune_keeps_base_bitwise_and_saves_small_adapter(tiny_run, pairs_file, tmp_path):
    base = load_run(tiny_run).model.state_dict()
    result = finetune(
        tiny_run,
        pairs_file,
        tmp_path / "ft",
        lora=LoRAConfig(rank=4),
        overrides={"max_steps": 15, "eval_interval": 15, "lr": 1e-2},
        progress=False,
    )
    assert result.steps == 15
    tuned = load_run(tmp_path / "ft")
    for name, tensor in tuned.model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, base[name.replace(".base.", ".")]), name
    adapter = tmp_path / "ft" / "adapter.safetensors"
    weights = next((tmp_path / "ft" / "checkpoints" / "last").glob("model.safetensors"))
    assert adapter.stat().st_size < weights.stat().st_size / 2
    merged = load_run(merge_run(tmp_path / "ft", tmp_path / "merged"))
    idx = torch.randint(0, tuned.model_cfg.vocab_size, (1, 20))
    torch.testing.assert_close(merged.model(idx), tuned.model(idx), atol=1e-5, rtol=1e-5)
    with pytest.raises(TinyLMError, match="no LoRA adapters"):
        merge_run(tmp_path / "merged")


def test_full_finetune_on_text_and_resume(tiny_run, shakespeare_text, tmp_path):
    text = tmp_path / "more.txt"
    text.write_text(shakespeare_text[40_000:100_000])  # within the base run's character vocabulary
    finetune(
        tiny_run, text, tmp_path / "ft", overrides={"max_steps": 20, "eval_interval": 10}, progress=False
    )
    with pytest.raises(TinyLMError, match="tinylm finetune --resume"):
        from tinylm.train import train

        train(out=tmp_path / "ft", resume=True, overrides={"max_steps": 30}, progress=False)
    result = finetune(None, None, tmp_path / "ft", resume=True, overrides={"max_steps": 30}, progress=False)
    assert result.steps == 30 and result.val_loss < 3.5


def test_lora_on_moe_experts_trains_only_adapters_and_merges_exactly():
    torch.manual_seed(0)
    model = Transformer(tiny_config(**FLAVOURS["llama-moe"]))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=2, experts=True))
    assert any("ff.parametrizations.w1" in k and "lora_a" in k for k in lora_state_dict(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 65, (2, 16))
    for _ in range(3):
        model(idx).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    originals = {
        k.replace(".parametrizations", "").replace(".original", ""): v
        for k, v in model.state_dict().items()
        if "lora_" not in k
    }
    for name, tensor in base.items():
        key = (
            name if name in originals else name.replace("weight", "base.weight").replace("bias", "base.bias")
        )
        assert torch.equal(originals[key], tensor), name
    model.eval()
    before = model(idx)
    torch.testing.assert_close(merge_lora(model)(idx), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(TinyLMError, match="no Mixture-of-Experts"):
        apply_lora(Transformer(tiny_config()), LoRAConfig(experts=True))


def test_muon_lr_scales_with_lr_when_fine_tuning():
    from tinylm.config import TrainConfig, finetune_config

    base = TrainConfig(optimizer="muon", lr=6e-3, muon_lr=0.04)
    assert finetune_config(base).lr == pytest.approx(2e-3)
    assert finetune_config(base).muon_lr == pytest.approx(0.04 / 3)
    assert finetune_config(base, {"lr": 3e-3}).muon_lr == pytest.approx(0.02)
    assert finetune_config(base, {"lr": 3e-3, "muon_lr": 0.01}).muon_lr == 0.01
    assert finetune_config(base).max_steps == 200 and finetune_config(base).warmup_steps == 20


def test_chat_examples_use_the_shared_template(tmp_path):
    from tinylm.chat import split_chat

    chat = [{"role": "user", "content": "Who loves Juliet?"}, {"role": "assistant", "content": "Romeo."}]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps(PAIRS[0]) + "\n")
    rows = read_pairs(path)
    assert (rows[0]["prompt"], rows[0]["response"]) == split_chat(chat) and rows[1] == PAIRS[0]
    path.write_text(json.dumps({"messages": chat[:1]}) + "\n")
    with pytest.raises(TinyLMError, match='line 1: a chat example must end with an "assistant" message'):
        read_pairs(path)


def test_a_prompt_longer_than_the_context_keeps_the_response_labels():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz:? .\nQA")
    ids, labels = encode_pair(tok, "Q: " + "a" * 100 + "?\nA:", " yes.\n", block_size=16)
    assert len(ids) == len(labels) == 16
    assert tok.decode([t for t in labels if t != IGNORE]) == " yes.\n"


def test_short_text_gives_advice_finetune_accepts(tiny_run, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("ROMEO: I love her.\n" * 3)
    with pytest.raises(TinyLMError, match="give `tinylm finetune` a longer text") as info:
        finetune(tiny_run, text, tmp_path / "ft", overrides={"max_steps": 2}, progress=False)
    assert "--val-fraction" not in str(info.value) and "block_size" not in str(info.value)


def test_finetune_never_overwrites_a_run(tiny_run, pairs_file, tmp_path):
    with pytest.raises(TinyLMError, match="already holds a run"):
        finetune(tiny_run, pairs_file, tiny_run, overrides={"max_steps": 2}, progress=False)


def test_lora_on_the_tied_head_loads_and_merges_into_an_untied_model(tiny_run, pairs_file, tmp_path):
    """The tiny preset ties lm_head to the embedding; an adapter on lm_head changes the head only."""
    base = load_run(tiny_run)
    assert base.model_cfg.tie_embeddings
    finetune(
        tiny_run,
        pairs_file,
        tmp_path / "ft",
        lora=LoRAConfig(rank=4, targets=("lm_head", "wq")),
        overrides={"max_steps": 10, "eval_interval": 10, "lr": 3e-2},
        progress=False,
    )
    tuned = load_run(tmp_path / "ft")  # the tied base weight is saved once, under tok_emb.weight
    assert not torch.equal(tuned.model.lm_head.lora_b, torch.zeros_like(tuned.model.lm_head.lora_b))
    merged = load_run(merge_run(tmp_path / "ft", tmp_path / "merged"))
    assert not merged.model_cfg.tie_embeddings
    assert torch.equal(merged.model.tok_emb.weight, base.model.tok_emb.weight)  # the embedding is untouched
    idx = torch.randint(0, base.model_cfg.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged.model(idx), tuned.model(idx), atol=1e-5, rtol=1e-5)


def test_a_fine_tune_does_not_inherit_the_base_runs_ramps():
    """Ramps crop each batch to a few tokens: on prompt/response pairs every target would be masked (NaN loss)."""
    from tinylm.config import TrainConfig, finetune_config

    base = TrainConfig(batch_size=8, batch_size_start=2, block_size_start=8, ramp_steps=100)
    tuned = finetune_config(base)
    assert (tuned.batch_size_start, tuned.block_size_start, tuned.ramp_steps) == (0, 0, 0)
