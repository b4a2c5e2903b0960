"""Where and how computation runs: device, precision, seeds, and torchrun's process group."""

from __future__ import annotations

import contextlib
import os
import random
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

import numpy as np
import torch

from tinylm.errors import TinyLMError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    """The resolved execution context of one process."""

    device: torch.device
    dtype: torch.dtype  # compute dtype for autocast; float32 means no autocast
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> ContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def resolve_device(name: str = "auto") -> torch.device:
    """Turn "auto" / "cpu" / "cuda[:N]" / "mps" into an available torch.device, or explain why not."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TinyLMError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TinyLMError(
            f"Device {name!r} was requested but no CUDA GPU is available; use --device cpu or auto."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TinyLMError(
            "Device 'mps' was requested but Apple's MPS backend is not available; use --device cpu."
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise TinyLMError(f"Unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise TinyLMError(f"Unknown dtype {name!r}; use auto, fp32, bf16 or fp16.")
    if name == "fp16" and device.type == "cpu":
        raise TinyLMError("fp16 mixed precision needs a GPU; use --dtype bf16 or fp32 on CPU.")
    return _DTYPES[name]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(device: str = "auto", dtype: str = "auto", seed: int | None = None) -> Runtime:
    """Resolve device and precision, join torchrun's process group when launched by it, and seed."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if world_size > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        # TF32 matmuls: ~free speed on Ampere and newer, negligible accuracy cost for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if seed is not None:
        seed_everything(seed)
    return Runtime(dev, resolve_dtype(dtype, dev), rank, world_size, local_rank)


def teardown() -> None:
    """Leave the process group, if any."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic units PyTorch uses (x86 AVX512-BF16 / AMX-BF16, Arm BF16).

    An AVX2-only CPU, or PyTorch capped below AVX-512 (ATEN_CPU_CAPABILITY=avx2), emulates bf16 and
    is slower in bf16 than in fp32.
    """
    import platform

    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read().split()
    except OSError:
        return False
    if platform.machine() in ("x86_64", "AMD64"):
        capped = torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX")
        return not capped and ("avx512_bf16" in flags or "amx_bf16" in flags)
    return "bf16" in flags  # Arm: the BF16 extension
