"""torch.distributed set-up for `torchrun --nproc_per_node=N -m vlpet.cli train ...` (or `vlpet train` under
torchrun). Single-process runs need no launcher (unlike the official code, spec §8.4).

NCCL on CUDA, gloo on CPU. The process-group timeout is long (``VLPET_DIST_TIMEOUT_MIN``, default 180
minutes) because the other ranks wait in a barrier while rank 0 evaluates (validation every epoch,
test at the end), which can take longer than the 10-minute NCCL default on the paper's splits.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {}
        if device_kind == "cuda":
            torch.cuda.set_device(local)
            # binds the process group to this rank's GPU (barrier() would otherwise guess it and warn)
            kwargs["device_id"] = torch.device("cuda", local)
        minutes = float(os.environ.get("VLPET_DIST_TIMEOUT_MIN", "180"))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes), **kwargs)
    return DistInfo(rank, world, local)


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def needs_unused_parameter_search(model) -> bool:
    """DDP's ``find_unused_parameters``: only where some trainable tensor takes no part in some
    steps. That is HyperFormer (one task embedding per task, a step holds one task); every other
    preset uses all its trainable tensors at every step of every task (tests/test_distributed.py
    checks each preset), so they skip the extra graph traversal."""
    method = getattr(model, "method", None)
    return getattr(method, "hyperformer", None) is not None


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def broadcast_flag(flag: bool, info: DistInfo, device) -> bool:
    """True on every rank if it is True on any rank (e.g. a non-finite loss)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
