import copy
import math

import pytest
import torch

from conftest import FLAVOURS, tiny_config
from tinylm.config import TrainConfig
from tinylm.errors import TinyLMError
from tinylm.lora import LoRAConfig, apply_lora
from tinylm.model import Transformer
from tinylm.model.layers import HIDDEN_MATRIX, RESIDUAL_OUT, mark, parameters_with_role
from tinylm.optim import Muon, MuonAdamW, build_optimizer, hidden_matrices, lr_at, orthogonalize, param_groups

pytestmark = pytest.mark.numerics


def test_cosine_schedule_is_the_tutorials_rule():
    cfg = TrainConfig(lr=3e-4, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    total = 110
    assert lr_at(0, total, cfg) == pytest.approx(3e-5)
    assert lr_at(9, total, cfg) == pytest.approx(3e-4)  # warmup reaches the peak
    assert lr_at(10, total, cfg) == pytest.approx(3e-4)
    assert lr_at(total - 1, total, cfg) == pytest.approx(3e-5)  # 10% of the peak at the end
    mid = 10 + (total - 1 - 10) / 2
    assert lr_at(int(mid), total, cfg) == pytest.approx(
        3e-5 + 0.5 * 2.7e-4 * (1 + math.cos(math.pi * int(mid - 10) / 99))
    )
    values = [lr_at(s, total, cfg) for s in range(10, total)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_and_wsd_schedules():
    const = TrainConfig(lr=1.0, warmup_steps=4, schedule="constant")
    assert [lr_at(s, 100, const) for s in (0, 3, 50, 99)] == [0.25, 1.0, 1.0, 1.0]
    wsd = TrainConfig(lr=1.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(79, 100, wsd) == 1.0 and lr_at(99, 100, wsd) == pytest.approx(0.0)
    assert 0 < lr_at(90, 100, wsd) < 1


def test_weight_decay_only_on_matrices():
    model = Transformer(tiny_config(n_expert=2, n_expert_active=1))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_optimizer_matches_torch_adamw_reference():
    """build_optimizer's AdamW (fused) == torch.optim.AdamW (foreach) on the same gradients.

    Both see identical gradients each step, so they differ only by the rounding of Adam's arithmetic:
    each step rounds p (|p| <= 1 here) and an update of at most lr / (1 - beta1) = 10 lr a few times in
    float32 (fused and foreach kernels, AVX2 or AVX-512, order the operations differently). A wrong
    hyper-parameter moves weights by about lr * weight_decay * |p| = 1e-3 per step, far outside the bound.
    """
    torch.manual_seed(0)
    a = Transformer(tiny_config())
    b = Transformer(tiny_config())
    b.load_state_dict(a.state_dict())
    lr, steps = 1e-2, 3
    cfg = TrainConfig(lr=lr, weight_decay=0.1, beta1=0.9, beta2=0.95)
    opt = build_optimizer(a, cfg)
    ref = torch.optim.AdamW(param_groups(b, 0.1), lr=lr, betas=(0.9, 0.95))
    x = torch.randint(0, 65, (2, 8))
    for _ in range(steps):
        a(x).logsumexp(-1).mean().backward()
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.grad = pa.grad.clone()
        opt.step(), ref.step()
        opt.zero_grad(), ref.zero_grad()
    eps = torch.finfo(torch.float32).eps
    p_max = max(p.abs().max().item() for p in b.parameters())
    atol = steps * 8 * eps * (p_max + 10 * lr)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=0)


def test_orthogonalize_flattens_the_spectrum_and_batches():
    torch.manual_seed(0)
    g = torch.randn(3, 48, 16) * torch.logspace(-1, 0, 16)  # condition number 10, tall
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.25  # Muon's quintic lands in about [0.7, 1.2], by design
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    d = u.mT @ o @ vh.mT  # diagonal when o keeps g's singular vectors and only remaps its singular values
    torch.testing.assert_close(d, torch.diag_embed(d.diagonal(dim1=-2, dim2=-1)), atol=1e-4, rtol=0)
    torch.testing.assert_close(o[1], orthogonalize(g[1]))  # batched == one by one
    torch.testing.assert_close(orthogonalize(g.mT), o.mT)  # wide == transposed tall


def test_muon_matches_torch_muon_reference():
    torch.manual_seed(0)
    w = [
        torch.randn(32, 16, requires_grad=True),
        torch.randn(16, 16, requires_grad=True),
        torch.randn(32, 16, requires_grad=True),
    ]
    ref = [p.detach().clone().requires_grad_() for p in w]
    ours = Muon(w, lr=0.02, weight_decay=0.1)
    theirs = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="original")
    for _ in range(3):
        grads = [torch.randn_like(p) for p in w]
        for params, opt in ((w, ours), (ref, theirs)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(w, ref):  # torch's Newton-Schulz runs in bf16, ours in float32 on CPU
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


def test_muon_adamw_splits_parameters_and_schedules_both():
    model = Transformer(tiny_config())
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02))
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names and all(n.startswith("blocks.") and model.get_parameter(n).dim() == 2 for n in names)
    assert "tok_emb.weight" not in names and not any("norm" in n for n in names)
    assert len(muon) + sum(len(g["params"]) for g in opt.adamw.param_groups) == len(list(model.parameters()))
    assert [g.get("lr_scale", 1.0) for g in opt.param_groups] == [20.0, 1.0, 1.0]
    state = opt.state_dict()
    opt.load_state_dict(state)
    with pytest.raises(TinyLMError, match="not from optimizer muon"):
        opt.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("flavour", ["gpt", "llama-moe"])
def test_marks_name_the_hidden_matrices_and_residual_outputs(flavour):
    """The optimizer split and the init read marks on the modules; the names are only the expected result."""
    model = Transformer(tiny_config(n_layer=4, **FLAVOURS[flavour]))
    hidden = _names(model, hidden_matrices(model))
    residual = _names(model, parameters_with_role(model, RESIDUAL_OUT))
    if flavour == "gpt":
        per_block = {"attn.wq", "attn.wk", "attn.wv", "attn.wo", "ff.fc", "ff.proj"}
        assert residual == {f"blocks.{i}.{m}.weight" for i in range(4) for m in ("attn.wo", "ff.proj")}
    else:
        per_block = {"attn.wq", "attn.wk", "attn.wv", "attn.wo", "ff.gate"}  # experts are 3-D: AdamW
        assert residual == {f"blocks.{i}.{m}" for i in range(4) for m in ("attn.wo.weight", "ff.w2")}
    assert hidden == {f"blocks.{i}.{m}.weight" for i in range(4) for m in per_block}
    std = {n: model.get_parameter(n).std().item() for n in residual}
    assert all(s < 0.02 * 0.6 for s in std.values())  # 0.02 / sqrt(2 * 4) = 0.007
    assert 0.015 < model.blocks[0].attn.wq.weight.std().item() < 0.025


def test_a_marked_module_anywhere_is_orthogonalized_and_an_unmarked_one_is_not():
    model = Transformer(tiny_config())
    extra = mark(torch.nn.Linear(32, 32, bias=False), HIDDEN_MATRIX)
    model.blocks[0].extra = extra  # a new layer: only its mark matters, not its name
    assert any(p is extra.weight for p in hidden_matrices(model))
    model.blocks[0].extra = torch.nn.Linear(32, 32, bias=False)
    assert not any(p is model.blocks[0].extra.weight for p in hidden_matrices(model))


def test_lora_adapters_are_trained_by_adamw_under_muon():
    """Issue 10 item 6: LoRA factors are small low-rank matrices; Muon would orthogonalize them."""
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02)
    model = apply_lora(Transformer(tiny_config()), LoRAConfig(rank=4))
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and hidden_matrices(model) == []  # the base matrices are frozen, the adapters unmarked
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in adapters}
    # partly trainable: unfreeze one base block, its matrices go to Muon, the adapters stay with AdamW
    for n, p in model.blocks[1].named_parameters():
        if "lora_" not in n:
            p.requires_grad_(p.dim() == 2)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert muon and not muon & {id(p) for p in adapters}
    assert {id(p) for g in opt.adamw.param_groups for p in g["params"]} >= {id(p) for p in adapters}


# ----- issue 22: Polar Express, NorMuon, batch-size / sequence-length ramps ------------------------------
def _polar_reference(g: torch.Tensor, coefficients) -> torch.Tensor:
    """Amsel et al.'s Polar Express written out for one matrix in float64: X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    x = g.double()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / (x.norm() * 1.02 + 1e-6)
    for a, b, c in coefficients:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return (x.T if tall else x).float()


def test_polar_express_matches_the_published_iteration_and_beats_newton_schulz():
    from tinylm.optim import POLAR_EXPRESS

    torch.manual_seed(0)
    g = torch.randn(3, 48, 16) * torch.logspace(-2, 0, 16)  # condition number 100, tall
    ours = orthogonalize(g, 5, "polar-express")
    for i in range(3):
        torch.testing.assert_close(
            ours[i], _polar_reference(g[i], PUBLISHED_POLAR_EXPRESS), atol=1e-4, rtol=0
        )
    # the published coefficients bring every singular value within 0.15 of 1 (Muon's quintic: within ~0.32)
    polar = (torch.linalg.svdvals(ours) - 1).abs().max()
    newton = (torch.linalg.svdvals(orthogonalize(g, 5)) - 1).abs().max()
    assert polar < 0.15 < 0.3 < newton
    assert POLAR_EXPRESS == PUBLISHED_POLAR_EXPRESS


# Amsel, Persson, Musco & Gower, "The Polar Express" (arXiv:2505.16932): 5 iterations, safety factor 2e-2
PUBLISHED_POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def _normuon_reference(params, grads_per_step, lr, momentum, beta2, weight_decay):
    """NorMuon (Li et al., 2025, Algorithm 1 / the authors' normuon_update) one matrix at a time."""
    params = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros(p.size(0), 1) for p in params]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            m[i] = momentum * m[i] + (1 - momentum) * g
            o = orthogonalize((1 - momentum) * g + momentum * m[i])  # Nesterov; Newton-Schulz tested above
            v[i] = beta2 * v[i] + (1 - beta2) * (o * o).mean(dim=1, keepdim=True)
            scaled = o / (v[i].sqrt() + 1e-10)
            update = scaled * o.norm() / (scaled.norm() + 1e-10)
            p.mul_(1 - lr * weight_decay)
            p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
    return params


def test_normuon_matches_the_papers_algorithm():
    torch.manual_seed(0)
    w = [torch.randn(32, 16), torch.randn(32, 16), torch.randn(16, 24)]
    steps = [[torch.randn_like(p) for p in w] for _ in range(3)]
    ours = [p.clone().requires_grad_() for p in w]
    opt = Muon(ours, lr=0.02, weight_decay=0.1, normuon=True, beta2=0.9)
    for grads in steps:
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
    ref = _normuon_reference(w, steps, lr=0.02, momentum=0.95, beta2=0.9, weight_decay=0.1)
    for a, b in zip(ours, ref):  # float32 both ways; the same orthogonalizer: rounding only
        torch.testing.assert_close(a.detach(), b, atol=1e-5, rtol=0)
    plain = [p.clone().requires_grad_() for p in w]
    opt = Muon(plain, lr=0.02, weight_decay=0.1)
    for grads in steps:
        for p, g in zip(plain, grads):
            p.grad = g.clone()
        opt.step()
    assert not torch.allclose(plain[0], ours[0], atol=1e-4)  # the normalisation does change the update


def test_muon_adamw_takes_the_orthogonalizer_and_normuon_from_the_config(tmp_path):
    model = Transformer(tiny_config())
    cfg = TrainConfig(optimizer="muon", orthogonalizer="polar-express", ns_steps=4, normuon=True)
    opt = build_optimizer(model, cfg)
    group = opt.muon.param_groups[0]
    assert (group["method"], group["ns_steps"], group["normuon"]) == ("polar-express", 4, True)
    x = torch.randint(0, 65, (2, 8))
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    state = opt.state_dict()  # the per-neuron second moments are optimizer state: saved and restored
    assert any("second_moment" in s for s in state["muon"]["state"].values())
    opt.load_state_dict(state)


def test_a_muon_state_saved_before_the_speedrun_settings_resumes_with_the_configs():
    """A checkpoint written before orthogonalizer / normuon existed has no such keys in its groups: it loads,
    takes them from this run's config, and steps exactly as a state that had them."""
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    opt = build_optimizer(model, TrainConfig(optimizer="muon"))
    x = torch.randint(0, 65, (2, 8))
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    state = opt.state_dict()
    old = copy.deepcopy(state)
    for group in old["muon"]["param_groups"]:
        for key in ("method", "normuon", "beta2"):
            del group[key]
    twins = []
    for saved in (state, old):
        twin = copy.deepcopy(model)
        twin_opt = build_optimizer(twin, TrainConfig(optimizer="muon"))
        twin_opt.load_state_dict(copy.deepcopy(saved))
        twin(x).logsumexp(-1).mean().backward()
        twin_opt.step()
        twins.append(twin.state_dict())
    for name, value in twins[0].items():
        assert torch.equal(value, twins[1][name]), name
    resumed = build_optimizer(copy.deepcopy(model), TrainConfig(optimizer="muon", normuon=True))
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.muon.param_groups[0]["normuon"] is True  # the resumed run's config, not the saved group


def test_batch_and_sequence_ramps():
    from tinylm.optim import batch_shape_at

    off = TrainConfig(batch_size=24)
    assert {batch_shape_at(s, off, 24, 64) for s in (0, 50, 500)} == {(24, 64)}
    ramp = TrainConfig(batch_size=24, batch_size_start=8, block_size_start=16, ramp_steps=100)
    assert batch_shape_at(0, ramp, 24, 64) == (8, 16)
    assert batch_shape_at(50, ramp, 24, 64) == (16, 40)
    assert batch_shape_at(100, ramp, 24, 64) == batch_shape_at(10**6, ramp, 24, 64) == (24, 64)
    shapes = [batch_shape_at(s, ramp, 24, 64) for s in range(101)]
    assert all(a <= b for (a, _), (b, _) in zip(shapes, shapes[1:]))  # never shrinks
    assert all(length % 8 == 0 for _, length in shapes)
