import math

import pytest
import torch

from conftest import FLAVOURS, tiny_config
from tinylm.errors import TinyLMError
from tinylm.model import Transformer, cache_rows
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
