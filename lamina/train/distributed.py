"""Data parallel (DDP) and sharded (FSDP2) training through ``torch.distributed``, launched by ``torchrun``.

Under torchrun (``WORLD_SIZE`` > 1) each process trains on its own slice of every global batch; DDP
all-reduces gradients, FSDP2 (``fully_shard``) shards parameters, gradients and optimizer state. The
backend is gloo on CPU and nccl on CUDA. Outside torchrun everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lamina.errors import ConfigError


@dataclass
class DistInfo:
    """Where this process stands: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and prints."""
        return self.rank == 0


def resolve_device(device: str = "auto") -> str:
    """``TrainConfig.device`` as torch names it: ``auto`` is cuda when available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def keep_freed_memory_on_cpu(device: str = "auto") -> bool:
    """For a training entry point that owns its process (``lamina pretrain``, ``finetune``, ``diffusion
    train``): on CPU, glibc keeps the memory a step frees for the next one (``lamina.malloc``'s
    ``keep_freed``; nothing on CUDA). Returns whether that policy is in force."""
    from lamina.malloc import set_malloc_policy

    return resolve_device(device) == "cpu" and set_malloc_policy("keep_freed")


def setup(device: str = "auto", parallel: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; pick the device (``resolve_device``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device)
    mode = parallel if parallel != "auto" else ("ddp" if world > 1 else "none")
    if world == 1:
        return DistInfo(device=torch.device(device), mode="none")
    if mode == "none":
        raise ConfigError(f"parallel='none' but torchrun started {world} processes: use parallel=ddp or fsdp")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev, mode)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """The model wrapped for the parallel mode (DDP, or FSDP2 sharding of each block then the root)."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    if info.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / torch.compile wrappers."""
    inner: Any = model
    while hasattr(inner, "module") or hasattr(inner, "_orig_mod"):
        inner = getattr(inner, "module", None) or inner._orig_mod
    return inner


def mean_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar over all processes (for logging losses)."""
    if info.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def sum_across(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise sum of a tensor over all processes (token counts, loss sums, stop flags)."""
    if info.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The complete (unsharded) model state dict, on CPU; call on every rank (FSDP gathers)."""
    if info.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state: Any = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return state
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, info: DistInfo) -> dict:
    """The optimizer state as one unsharded dict (FSDP gathers it; call on every rank)."""
    if info.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return opt.state_dict()


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, info: DistInfo) -> None:
    """Restore optimizer state saved by ``full_optimizer_state``."""
    if info.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def barrier(info: DistInfo) -> None:
    """Wait for every process."""
    if info.world_size > 1:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Tear the process group down."""
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
