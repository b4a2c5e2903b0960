import math

import pytest
import torch

from conftest import FLAVOURS, tiny_config
from tinylm.errors import TinyLMError
from tinylm.model import Transformer, cache_rows, on_meta
from tinylm.model.layers import MoE, RMSNorm, apply_rope, load_balancing_loss, rope_tables

pytestmark = pytest.mark.numerics


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_shapes_and_causality(flavour):
    torch.manual_seed(0)
    model = Transformer(tiny_config(**FLAVOURS[flavour])).eval()
    idx = torch.randint(0, 65, (2, 20))
    logits, aux = model(idx, return_aux=True)
    assert logits.shape == (2, 20, 65) and aux.ndim == 0
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 65, (2, 8))
    # future tokens must not change past logits
    torch.testing.assert_close(model(changed)[:, :12], logits[:, :12])
    assert not torch.allclose(model(changed)[:, 12:], logits[:, 12:])


def test_context_longer_than_block_is_rejected():
    model = Transformer(tiny_config())
    with pytest.raises(Exception, match="longer than the model's context"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_rmsnorm_matches_naive():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.data = torch.randn(16)
    x = torch.randn(3, 5, 16)
    naive = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), naive)


def test_rope_matches_naive_complex_rotation():
    torch.manual_seed(0)
    T, hd = 10, 8
    x = torch.randn(1, 2, T, hd)
    cos, sin = rope_tables(hd, T)
    out = apply_rope(x, cos, sin)
    # naive: pair dimension i with i + hd/2 and rotate by angle pos * theta^(-2i/hd)
    expected = torch.empty_like(x)
    for pos in range(T):
        for i in range(hd // 2):
            angle = pos * 10000 ** (-2 * i / hd)
            a, b = x[..., pos, i], x[..., pos, i + hd // 2]
            expected[..., pos, i] = a * math.cos(angle) - b * math.sin(angle)
            expected[..., pos, i + hd // 2] = b * math.cos(angle) + a * math.sin(angle)
    torch.testing.assert_close(out, expected)
    # relative: <rope(q, m), rope(k, n)> depends only on m - n
    q, k = torch.randn(hd), torch.randn(hd)

    def dot(m, n):
        return (
            apply_rope(q[None, None, None], cos[m : m + 1], sin[m : m + 1])
            * apply_rope(k[None, None, None], cos[n : n + 1], sin[n : n + 1])
        ).sum()

    torch.testing.assert_close(dot(5, 2), dot(7, 4))


@pytest.mark.parametrize("flavour", ["gpt", "llama-gqa"])
def test_attention_matches_naive_softmax_attention(flavour):
    torch.manual_seed(0)
    cfg = tiny_config(**FLAVOURS[flavour])
    model = Transformer(cfg).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 12, cfg.n_embd)
    rope = model.rope(torch.arange(12)) if cfg.position == "rope" else None
    fast = attn(x, rope)
    attn.record_weights = True
    slow = attn(x, rope)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
    w = attn.weights
    assert w.shape == (2, cfg.n_head, 12, 12)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, cfg.n_head, 12))
    assert torch.all(w.triu(diagonal=1) == 0)  # causal


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for n in range(x.size(0)):
        logits = moe.gate(x[n])
        top, experts = logits.topk(moe.top_k)
        weights = top.softmax(-1)
        for w, e in zip(weights, experts):
            out[n] += w * moe.expert_forward(int(e), x[n : n + 1])[0]
    return out


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_moe_output_is_weighted_sum_of_chosen_experts(mlp):
    torch.manual_seed(0)
    moe = MoE(tiny_config(mlp=mlp, n_expert=4, n_expert_active=2))
    for p in (moe.w1, moe.w2) + ((moe.w3,) if moe.w3 is not None else ()):
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 7, 32)
    y, aux = moe(x)
    torch.testing.assert_close(y.view(-1, 32), naive_moe(moe, x.view(-1, 32)), atol=1e-5, rtol=1e-4)
    y.sum().backward()  # every expert that received a token gets a gradient
    assert moe.gate.weight.grad is not None and moe.w1.grad.abs().sum() > 0


def test_load_balancing_loss_is_minimal_for_uniform_routing():
    E, N = 4, 64
    uniform = load_balancing_loss(torch.full((N, E), 1 / E), torch.full((E,), N // E), E)
    assert uniform.item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(N, 1)
    skewed = load_balancing_loss(skewed_probs, torch.tensor([N, 0, 0, 0]), E)
    assert skewed.item() > uniform.item()


def test_tied_embeddings_and_residual_init():
    model = Transformer(tiny_config(n_layer=4))
    assert model.lm_head.weight is model.tok_emb.weight
    std_out = model.blocks[0].attn.wo.weight.std().item()
    std_in = model.blocks[0].attn.wq.weight.std().item()
    assert std_out < std_in * 0.6  # 0.02 / sqrt(2 * n_layer)


# Tolerance: the cached path attends over the whole cache (masked slots add exact zeros) and sums in a
# different order; float32 rounding of a few dozen terms of size ~1 stays far below 1e-5.
CLOSE = dict(atol=1e-5, rtol=1e-4)


def _at(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kv_cache_logits_match_full_forward(flavour):
    torch.manual_seed(0)
    model = Transformer(tiny_config(**FLAVOURS[flavour])).eval()
    idx = torch.randint(0, 65, (2, 16))
    full = model(idx)
    caches = model.make_caches(2)
    parts = [model(idx[:, :10], caches=caches, pos=_at(0, 10))]
    parts += [model(idx[:, t : t + 1], caches=caches, pos=_at(t, t + 1)) for t in range(10, 13)]
    parts.append(model(idx[:, 13:], caches=caches, pos=_at(13, 16)))  # a multi-token chunk after a prefix
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **CLOSE)
    # the caches are reused for a shorter sequence without clearing: the stale slots are ignored
    other = torch.randint(0, 65, (2, 6))
    torch.testing.assert_close(model(other, caches=caches), model(other), **CLOSE)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_per_row_positions_match_each_row_alone(flavour):
    """Rows of one batch at different positions (the server's batched decoding) give each row's logits."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(**FLAVOURS[flavour])).eval()
    lengths = [7, 3, 12]
    seqs = [torch.randint(0, 65, (1, n + 1)) for n in lengths]
    caches = model.make_caches(3)
    for row, (seq, n) in enumerate(zip(seqs, lengths)):  # prefill each row alone through a row view
        model(seq[:, :n], caches=cache_rows(caches, row, row + 1), pos=_at(0, n))
    tokens = torch.cat([seq[:, -1:] for seq in seqs])  # (3, 1): each row's next token
    pos = torch.tensor(lengths)[:, None]  # (3, 1): each row's own position
    batched = model(tokens, caches=caches, pos=pos)[:, -1]
    for row, seq in enumerate(seqs):
        torch.testing.assert_close(batched[row], model(seq)[0, -1], **CLOSE)


@pytest.mark.parametrize("flavour", ["gpt", "llama"])
def test_per_row_positions_without_cache(flavour):
    """(B, T) positions without a cache: a row shifted to later positions matches RoPE's / the table's."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(**FLAVOURS[flavour])).eval()
    idx = torch.randint(0, 65, (1, 8)).repeat(2, 1)  # the same tokens in both rows
    pos = torch.stack([_at(0, 8), _at(5, 13)])
    both = model(idx, pos=pos)
    torch.testing.assert_close(both[0], model(idx[:1])[0], **CLOSE)
    torch.testing.assert_close(both[1], model(idx[1:], pos=_at(5, 13))[0], **CLOSE)
    if flavour == "llama":  # RoPE attention depends only on relative positions
        torch.testing.assert_close(both[1], both[0], **CLOSE)
    else:
        assert not torch.allclose(both[1], both[0])


def test_rolling_cache_needs_rope():
    with pytest.raises(Exception, match="rolling KV cache needs RoPE"):
        Transformer(tiny_config(**FLAVOURS["gpt"])).make_caches(1, rolling=True)


def test_moe_gathered_decode_path_matches_sorted_path():
    torch.manual_seed(0)
    moe = MoE(tiny_config(**FLAVOURS["llama-moe"])).eval()
    for p in (moe.w1, moe.w2, moe.w3):
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 32)  # decode sizes: the forward takes the gathered path
    experts, weights, _ = moe.route(x)
    torch.testing.assert_close(moe._gathered(x, experts, weights), naive_moe(moe, x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(moe(x[None])[0][0], naive_moe(moe, x), atol=1e-5, rtol=1e-4)


def test_moe_training_forward_has_no_host_sync(monkeypatch):
    """No .item() / .tolist() / nonzero on the training path (where PyTorch has grouped matmuls)."""
    from tinylm.model.layers import _grouped_mm_works

    if not _grouped_mm_works("cpu", torch.float32):
        pytest.skip("torch._grouped_mm is not available on this CPU build")
    torch.manual_seed(0)
    model = Transformer(tiny_config(**FLAVOURS["llama-moe"])).train()
    idx = torch.randint(0, 65, (2, 16))

    def sync(*a, **k):
        raise AssertionError("host sync on the MoE training path")

    for name in ("tolist", "item", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch, "nonzero", sync)
    logits, aux = model(idx, return_aux=True)
    (logits.logsumexp(-1).mean() + aux).backward()
    monkeypatch.undo()
    assert model.blocks[0].ff.w1.grad.abs().sum() > 0


def test_a_rolling_chunk_given_tensor_positions_is_refused_too():
    """test_generate's refused rolling chunk, given tensor positions (the batched and compiled decoders' path)."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(position="rope", block_size=32)).eval()
    caches = model.make_caches(1, rolling=True)
    x = torch.randint(0, model.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        model(x[:, :10], caches=caches, pos=torch.arange(0, 10))
        inside = model(x[:, 10:20], caches=caches, pos=torch.arange(10, 20))  # still inside the cache: fine
        torch.testing.assert_close(inside, model(x[:, :20])[:, 10:], atol=1e-5, rtol=1e-5)
        with pytest.raises(TinyLMError, match="does not fit a rolling KV cache of 32"):
            model(x[:, 20:40], caches=caches, pos=torch.arange(20, 40))
        with pytest.raises(TinyLMError, match="does not fit a rolling KV cache of 32"):
            model(x[:, 20:40], caches=caches, pos=torch.arange(20, 40).expand(1, 20))  # per-row positions


# ----- issue 22's speedrun options, each against a naive formula --------------------------------------
def _with_weights_of(cfg_a, cfg_b):
    """Two models, of configs a and b, with every weight they share equal (b's extra parameters as built)."""
    torch.manual_seed(0)
    a, b = Transformer(cfg_a).eval(), Transformer(cfg_b).eval()
    b.load_state_dict(a.state_dict(), strict=False)
    return a, b


def test_relu2_mlp_matches_naive_formula():
    torch.manual_seed(0)
    model = Transformer(tiny_config(mlp="relu2")).eval()
    ff, x = model.blocks[0].ff, torch.randn(2, 5, 32)
    naive = torch.clamp(x @ ff.fc.weight.T + ff.fc.bias, min=0) ** 2 @ ff.proj.weight.T + ff.proj.bias
    torch.testing.assert_close(ff(x)[0], naive)
    assert ff.fc.weight.shape == (128, 32)  # 4 x n_embd, as GELU's


def test_relu2_moe_experts_match_naive_formula():
    torch.manual_seed(0)
    moe = MoE(tiny_config(mlp="relu2", n_expert=4, n_expert_active=2))
    for p in (moe.w1, moe.w2):
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(6, 32)
    torch.testing.assert_close(moe.expert_forward(1, x), torch.relu(x @ moe.w1[1]) ** 2 @ moe.w2[1])
    y, _ = moe(x[None])
    torch.testing.assert_close(y[0], naive_moe(moe, x), atol=1e-5, rtol=1e-4)


def _naive_attention(attn, x, rope=None, ve=None):
    """Softmax attention written out: projections, QK-norm, value mix, RoPE, causal softmax, output."""
    B, T, C = x.shape
    H, hd = attn.n_head, attn.head_dim
    q = (x @ attn.wq.weight.T).view(B, T, H, hd).transpose(1, 2)
    k = (x @ attn.wk.weight.T).view(B, T, H, hd).transpose(1, 2)
    v = (x @ attn.wv.weight.T).view(B, T, H, hd).transpose(1, 2)
    if attn.qk_norm_eps is not None:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + attn.qk_norm_eps)
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + attn.qk_norm_eps)
    if ve is not None:
        v = attn.value_mix[0] * v + attn.value_mix[1] * ve.view(B, T, H, hd).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return y @ attn.wo.weight.T


def test_qk_norm_and_value_embedding_match_naive_attention():
    torch.manual_seed(0)
    model = Transformer(tiny_config(**FLAVOURS["speedrun"])).eval()
    attn = model.blocks[0].attn
    attn.value_mix.data = torch.tensor([0.7, -1.3])
    x, ve = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    rope = model.rope(torch.arange(9))
    torch.testing.assert_close(attn(x, rope, ve=ve), _naive_attention(attn, x, rope, ve), **CLOSE)
    q = attn.wq(x).view(2, 9, 4, 8)  # QK-norm bounds every query to norm sqrt(head_dim)
    assert not torch.allclose(q.norm(dim=-1), torch.full((2, 9, 4), 8**0.5))


def test_value_embedding_tables_go_to_the_first_and_last_layers():
    from tinylm.model.transformer import value_table

    cfg = tiny_config(n_layer=6, value_embeds=2)
    assert [value_table(i, cfg) for i in range(6)] == [0, 1, None, None, 0, 1]
    model = Transformer(cfg)
    assert len(model.value_embeds) == 2
    assert [b.attn.value_mix is not None for b in model.blocks] == [True, True, False, False, True, True]


def test_embed_skip_unet_and_softcap_match_a_naive_forward():
    """The whole forward written out with the blocks' own sublayers: x0 mixing before each block, U-net
    pairs (block i's output into block n-1-i's input), value embeddings, then the soft-capped head."""
    torch.manual_seed(0)
    cfg = tiny_config(**{**FLAVOURS["speedrun"], "n_layer": 5, "value_embeds": 2})
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in [model.skip_weights, *[b.x0_mix for b in model.blocks], *[b.attn.value_mix for b in model.blocks if b.attn.value_mix is not None]]:  # fmt: skip
            p.copy_(torch.randn_like(p))
    idx = torch.randint(0, 65, (2, 11))
    rope = model.rope(torch.arange(11))
    x = x0 = model.tok_emb(idx)
    outputs, tables = {}, {0: 0, 1: 1, 3: 0, 4: 1}  # layer -> value table (first 2 and last 2 layers)
    for i, block in enumerate(model.blocks):
        if i >= 5 - 2:  # U-net: decoder block i takes encoder block (4 - i)'s output
            x = x + model.skip_weights[i - 3] * outputs[4 - i]
        x = block.x0_mix[0] * x + block.x0_mix[1] * x0
        ve = model.value_embeds[tables[i]](idx) if i in tables else None
        x = x + _naive_attention(block.attn, block.norm1(x), rope, ve)
        x = x + block.ff(block.norm2(x))[0]
        outputs[i] = x
    raw = model.norm_f(x) @ model.lm_head.weight.T
    torch.testing.assert_close(model(idx), 15.0 * torch.tanh(raw / 15.0), **CLOSE)


def test_options_at_their_initial_values_change_nothing():
    """embed_skip starts at (1, 0) and a zeroed U-net weight adds nothing: the plain model's logits."""
    plain = tiny_config(**FLAVOURS["llama"], n_layer=4)
    a, b = _with_weights_of(
        plain, tiny_config(**FLAVOURS["llama"], n_layer=4, embed_skip=True, unet_skips=True)
    )
    b.skip_weights.data.zero_()
    idx = torch.randint(0, 65, (2, 12))
    torch.testing.assert_close(b(idx), a(idx))
    a, c = _with_weights_of(plain, tiny_config(**FLAVOURS["llama"], n_layer=4, logit_softcap=30.0))
    torch.testing.assert_close(c(idx), 30.0 * torch.tanh(a(idx) / 30.0))


def test_zero_init_starts_blocks_as_identity_and_the_head_uniform():
    torch.manual_seed(0)
    model = Transformer(tiny_config(**FLAVOURS["llama-moe"], zero_init=True))
    zeroed = [n for n, p in model.named_parameters() if p.dim() >= 2 and not p.any()]
    assert sorted(zeroed) == sorted(
        ["lm_head.weight"] + [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.wo.weight", "ff.w2")]
    )
    idx = torch.randint(0, 65, (2, 8))
    torch.testing.assert_close(model(idx), torch.zeros(2, 8, 65))  # untied head at zero: uniform
    tied = Transformer(tiny_config(zero_init=True))  # a tied head is the embedding: it stays random
    assert tied.lm_head.weight.std() > 0.01


def test_speedrun_parameters_start_by_the_init_rules_on_any_device_and_shard():
    """The learned mixes and zero_init come from init_rules, so a model built on the meta device and drawn
    shard by shard (as sharded training does) starts equal to one built whole, at the documented values."""
    from tinylm.model.transformer import init_parameters

    options = dict(qk_norm=True, zero_init=True, value_embeds=1, embed_skip=True, unet_skips=True)
    cfg = tiny_config(n_layer=4, tie_embeddings=False, **options)
    whole = Transformer(cfg)
    whole.reset_parameters(seed=3)
    with on_meta():
        lazy = Transformer(cfg)
    lazy.to_empty(device="cpu")
    lazy.reset_buffers()
    for first in (True, False):  # two "ranks", each drawing only its half of every parameter
        init_parameters(
            lazy,
            3,
            lambda p, first=first: (
                (p.view(-1)[: p.numel() // 2], 0) if first else (p.view(-1)[p.numel() // 2 :], p.numel() // 2)
            ),
        )
    for name, p in whole.state_dict().items():
        assert torch.equal(p, lazy.state_dict()[name]), name
    assert whole.blocks[0].x0_mix.tolist() == [1.0, 0.0] and whole.skip_weights.tolist() == [1.0, 1.0]
    assert whole.blocks[0].attn.value_mix.tolist() == [0.5, 0.5] and whole.blocks[1].attn.value_mix is None
    assert not whole.blocks[0].attn.wo.weight.any() and not whole.lm_head.weight.any()  # zero_init
    assert whole.blocks[0].attn.wq.weight.std() > 0.01 and whole.tok_emb.weight.std() > 0.01


def test_building_on_meta_draws_nothing_and_imports_no_dynamo():
    """on_meta builds shapes only: no init is drawn (on meta that would import TorchDynamo, about a second of
    every command's start-up), and the model trains after materialise + init as one built whole does."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from tinylm.checkpoint import materialise, tied_aliases\nfrom tinylm.model import on_meta\n"
        "from tinylm.config import ModelConfig\n"
        "from tinylm.model import Transformer\n"
        "from tinylm.model.transformer import init_parameters\n"
        "cfg = ModelConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=32, n_expert=4, n_expert_active=2)\n"
        "with on_meta():\n"
        "    model = Transformer(cfg)\n"
        "assert all(p.is_meta for p in model.parameters())\n"
        "materialise(model, torch.device('cpu'), tied_aliases(model))\n"
        "init_parameters(model, 3)\n"
        "whole = Transformer(cfg)\n"
        "whole.reset_parameters(seed=3)\n"
        "assert all(torch.equal(p, whole.state_dict()[k]) for k, p in model.state_dict().items())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_init_draws_agree_shard_by_shard_across_block_boundaries(monkeypatch):
    """Draws come in seeded blocks of INIT_BLOCK elements; any [start, stop) slice drawn alone, across block
    boundaries, equals that slice of the whole parameter's draws (what each FSDP rank relies on)."""
    from tinylm.model import transformer as T

    monkeypatch.setattr(T, "INIT_BLOCK", 7)
    for init in (T.Init(std=0.02), T.Init(bound=0.5), T.Init(values=tuple(range(50)))):
        whole = T.init_values(init, 50, 0, 50, "3/blocks.0.attn.wq.weight")
        for start, stop in ((0, 7), (3, 11), (6, 50), (13, 14), (20, 49)):
            part = T.init_values(init, 50, start, stop, "3/blocks.0.attn.wq.weight")
            assert torch.equal(part, whole[start:stop]), (init, start, stop)
    seed3, seed4 = (
        T.init_values(T.Init(std=0.02), 50, 0, 50, f"{s}/blocks.0.attn.wq.weight") for s in (3, 4)
    )
    assert not torch.equal(seed3, seed4)  # another seed (or name) draws other values
