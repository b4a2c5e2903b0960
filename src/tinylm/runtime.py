"""Where and how computation runs: device, precision, seeds, and torchrun's process group."""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import warnings
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

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
    """Resolve device and precision, join torchrun's process group when launched by it, and seed
    (every rank alike, so models build identically; see `seed_rank` for what comes after)."""
    rank, world_size, local_rank = _launch_env()
    dev = resolve_device(device)
    if world_size > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
        join_process_group(dev)
    if dev.type == "cuda":
        # TF32 matmuls: ~free speed on Ampere and newer, negligible accuracy cost for training.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if seed is not None:
        seed_everything(seed)
    return Runtime(dev, resolve_dtype(dtype, dev), rank, world_size, local_rank)


def _launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun), before any process group."""
    return _launch_env()[0]


def join_process_group(device: torch.device | None = None) -> None:
    """Join torchrun's process group once: gloo for CPU tensors, NCCL too where CUDA is (device None:
    not yet known, so both when a GPU is present)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    if cuda:
        torch.cuda.set_device(_launch_env()[2] if device is None or device.index is None else device.index)
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")


def seed_rank(seed: int, runtime: Runtime) -> None:
    """Give each rank its own random stream (seed + rank), e.g. its own dropout masks, once the model is
    built alike everywhere; rank 0 keeps `seed`, so one process matches a single-process run."""
    if runtime.distributed:
        seed_everything(seed + runtime.rank)


@contextlib.contextmanager
def main_process_first() -> Any:
    """Under torchrun, run the body on rank 0 before the others enter it (e.g. to prepare data once); yields
    whether this process is rank 0. When rank 0 fails in it, the other ranks raise too instead of waiting.
    A no-op in a single process."""
    rank, world_size, _ = _launch_env()
    if world_size <= 1:
        yield True
        return
    import torch.distributed as dist

    join_process_group()
    if rank == 0:
        ok = [False]
        try:
            yield True
            ok = [True]
        finally:
            dist.broadcast_object_list(ok, src=0)
    else:
        ok = [None]
        dist.broadcast_object_list(ok, src=0)
        if not ok[0]:
            raise TinyLMError("Rank 0 failed while preparing; see its error above.")
        yield False


def teardown(clean: bool = True) -> None:
    """Leave the process group, if any. After a clean finish (every rank got here the same way) wait for
    all ranks first, so none tears down gloo's connections while another still uses them (which aborts
    it: "terminate called without an active exception"); after an error on some ranks, just leave."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def shard(model: nn.Module) -> None:
    """FSDP2 in place: each block its own group, the rest (embeddings, head, final norm) the root's. On the
    meta device this allocates nothing; `to_empty` then gives each rank only its shards."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


def local_part(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor this process holds of parameter p (its shard under FSDP) and where it starts in p's
    flattened elements."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return p, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if tuple(p.placements) != (Shard(0),):
        raise TinyLMError(f"Cannot initialise a parameter placed as {p.placements}; FSDP shards on dim 0.")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = math.prod(p.shape[1:])
    return p.to_local(), offset[0] * row


def wrap_model(model: nn.Module, runtime: Runtime, *, fsdp: bool = False, compile: bool = False) -> nn.Module:
    """Apply FSDP2 (`shard`, unless done already) or DDP under torchrun, and torch.compile, from outside the
    model, before the optimizer is built."""
    wrapped: nn.Module = model
    if runtime.distributed and fsdp:
        shard(model)
    elif runtime.distributed:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            model,
            device_ids=[runtime.local_rank] if runtime.device.type == "cuda" else None,
            broadcast_buffers=False,  # the model's buffers (RoPE tables, masks) are the same on every rank
        )
    if compile:
        try:
            wrapped = EagerFallback(torch.compile(wrapped), wrapped)
        except Exception as exc:  # e.g. unsupported platform
            warnings.warn(f"torch.compile is not available here ({exc}); training without it.")
    return wrapped


class EagerFallback(nn.Module):
    """A compiled module that falls back to its eager original (with a warning) when compilation fails
    at the first forward pass, e.g. when the backend finds no C compiler."""

    def __init__(self, compiled: nn.Module, eager: nn.Module) -> None:
        super().__init__()
        self.eager = eager
        self.__dict__["compiled"] = compiled  # not a submodule: its parameters are eager's
        self.__dict__["ok"] = None  # None: untried; then True / False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.ok is None:
            try:
                out = self.compiled(*args, **kwargs)
            except Exception as exc:  # the backend's failure, at its first compile
                warnings.warn(
                    f"torch.compile is not available here ({type(exc).__name__}); training without it."
                )
                self.__dict__["ok"] = False
                return self.eager(*args, **kwargs)
            self.__dict__["ok"] = True
            return out
        return (self.compiled if self.ok else self.eager)(*args, **kwargs)

    def no_sync(self) -> ContextManager:
        """The eager module's way to skip gradient synchronisation."""
        return skip_grad_sync(self.eager)


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received` (the first one's number), so a loop can stop at
    the next micro-batch boundary and save. A second signal prints `second` (what is being done and how to
    abort) and restores the default actions, so a third ends the process at once; a checkpoint being
    written is then abandoned, and the previous one stays intact."""

    def __init__(self, second: str = "", announce: bool = True) -> None:
        self.received: int | None = None
        self.second, self.announce = second, announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            return
        if self.announce and self.second:
            print(self.second, file=sys.stderr, flush=True)
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all processes (itself when there is one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def all_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over all processes (itself when there is one)."""
    import torch.distributed as dist

    summed = all_sum(t)
    return t if summed is t else summed / dist.get_world_size()


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """Whether `flag` is set on any process (so every rank takes the same branch). A CPU tensor (gloo), so a
    GPU's queue is not waited for: cheap enough to ask between micro-batches."""
    if not runtime.distributed:
        return flag
    return all_mean(torch.tensor(float(flag))).item() > 0


def broadcast(obj: Any, runtime: Runtime) -> Any:
    """Rank 0's `obj` on every process (`obj` itself in a single process)."""
    if not runtime.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(runtime: Runtime) -> None:
    """Wait for every process (a no-op in a single process)."""
    if runtime.distributed:
        import torch.distributed as dist

        dist.barrier()


def gather_objects(obj: Any, runtime: Runtime) -> list[Any]:
    """`obj` from every process, in rank order (`[obj]` in a single process)."""
    if not runtime.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


def skip_grad_sync(module: nn.Module) -> ContextManager:
    """Accumulate gradients locally for a micro-batch: DDP's no_sync, FSDP2's requires_gradient_sync off."""
    if hasattr(module, "no_sync"):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module) -> Any:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU and every GPU), to continue a run exactly."""
    return {
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


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
