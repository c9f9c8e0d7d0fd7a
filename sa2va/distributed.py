"""torchrun plumbing: process group, rank helpers, metric reduction, wrapping.

The same code runs one process, two gloo processes on a laptop, or nccl on many GPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Initialise from torchrun's environment; a plain `python` run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(chosen, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average a dict of floats over ranks (each rank must pass the same keys)."""
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_policy(policy: nn.Module, strategy: str, info: DistInfo, shard_layers: list[nn.Module],
                fsdp_gather: str = "per_use") -> nn.Module:
    """DDP (frozen parameters stay out of the gradient buckets) or FSDP2 (`fully_shard`, each
    layer's weights gathered as `fsdp_gather` says: see set_fsdp_gather)."""
    if not info.enabled:
        return policy
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Every rank loaded the same weights; skip broadcasting the frozen (possibly huge) ones.
        frozen = [n for n, p in policy.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in policy.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(policy, frozen)
        ids = [info.local_rank] if info.device.type == "cuda" else None
        return DDP(policy, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in shard_layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    set_fsdp_gather(policy, shard_layers, fsdp_gather)
    return policy


def set_fsdp_gather(wrapped: nn.Module, shard_layers: list[nn.Module], mode: str) -> None:
    """When an FSDP2-sharded layer's weights are all-gathered. "per_use": before each forward and
    again before each backward, resharded after each (the least memory). "per_step": gathered at
    the step's first forward and kept (no reshard after forward; no reshard after backward on the
    accumulation micro-steps, see no_grad_sync) until the step's last backward: one all-gather per
    layer per optimizer step instead of two per micro-batch, for the memory of the whole unsharded
    LLM during the step. Gradients and optimizer states stay sharded either way."""
    if mode not in ("per_use", "per_step"):
        raise ValueError(f"fsdp gather mode {mode!r}: per_use or per_step")
    for layer in shard_layers:
        layer.set_reshard_after_forward(mode == "per_use")
    wrapped._sa2va_gather_per_step = mode == "per_step"


@contextlib.contextmanager
def no_grad_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync / FSDP2 flag)."""
    if not enabled:
        yield
        return
    if hasattr(wrapped, "no_sync"):
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):
        keep = getattr(wrapped, "_sa2va_gather_per_step", False)
        wrapped.set_requires_gradient_sync(False)
        if keep:  # the next micro-batch reuses the gathered weights
            wrapped.set_reshard_after_backward(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
            if keep:  # the step's last backward reshards
                wrapped.set_reshard_after_backward(True)
    else:
        yield
