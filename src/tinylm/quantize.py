"""Weight-only int8 quantization for decoding, applied to a model from outside (as gpt-fast does).

`quantize_int8(model)` replaces every nn.Linear (the attention and MLP projections, the router and
the output head) with an `Int8Linear`: symmetric per-output-channel int8 weights and float scales,
multiplied by PyTorch's int8 weight-only kernel (`torch.ops.aten._weight_int8pack_mm`) where it runs,
else by a plain dequantizing matmul. Activations stay in floating point; embeddings, norms and 3-D
Mixture-of-Experts weights are kept as they are. For inference only (the weights are buffers).

On CPU that kernel is vectorized for bf16 activations only: with float32 ones it is about 10x slower than
a float32 matmul (measured in benchmarks/RESULTS.md), so by default a float32 model's int8 layers multiply
in bf16 (`compute_dtype`, cast in and out around the kernel; float32 accumulation inside) and the rest
of the model stays float32. `quantize_int8(model, compute_dtype=torch.float32)` keeps float32 activations.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (N, K), float32 scale (N,)) with weight ~= int8 * scale[:, None], |int8| <= 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


@functools.cache
def _int8pack_works(device: str, dtype: torch.dtype) -> bool:
    """Whether aten._weight_int8pack_mm exists here and agrees with a dequantized matmul."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    try:
        x = torch.randn(3, 64, device=device, dtype=dtype)
        q, scale = quantize_per_channel(torch.randn(32, 64, device=device))
        y = op(x, q, scale.to(dtype))
        ref = F.linear(x.float(), q.float() * scale[:, None])
        return bool(torch.allclose(y.float(), ref, atol=1e-2 if dtype != torch.float32 else 1e-4, rtol=1e-2))
    except (RuntimeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """y = x @ (int8 weight * scale)^T + bias, the weight stored as int8 per output channel."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> None:
        """compute_dtype: the activations' dtype inside the int8 kernel (None: the weight's dtype)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel(linear.weight)
        dtype = linear.weight.dtype
        self.register_buffer("weight_int8", q)  # (N, K)
        self.register_buffer("scale", scale.to(dtype))  # (N,)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        # chosen once, outside any compiled region (quantize after choosing the model's dtype)
        self.compute_dtype = compute_dtype or dtype
        self.int8pack = _int8pack_works(linear.weight.device.type, self.compute_dtype)
        if self.compute_dtype != dtype:
            self.register_buffer("scale_compute", scale.to(self.compute_dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        scale = self.scale.to(x.dtype)
        if self.int8pack and x.dtype == self.scale.dtype != self.compute_dtype:
            xc = x2.to(self.compute_dtype).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(xc, self.weight_int8, self.scale_compute).to(x.dtype)
        elif self.int8pack and x.dtype == self.scale.dtype:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, scale)
        else:
            y = F.linear(x2, self.weight_int8.to(x.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def default_compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """bf16 for float32 weights on CPU where the int8 kernel runs in bf16 (its vectorized path), else their dtype."""
    if (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and _int8pack_works("cpu", torch.bfloat16)
    ):
        return torch.bfloat16
    return weight.dtype


def quantize_int8(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every nn.Linear of `model` in place with an Int8Linear; returns the model (in eval mode).

    compute_dtype: the activations' dtype inside the int8 matmuls (None: default_compute_dtype)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                dtype = compute_dtype or default_compute_dtype(child.weight)
                setattr(parent, name, Int8Linear(child, dtype))
    return model.eval()


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (what decoding reads per token, roughly)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)
