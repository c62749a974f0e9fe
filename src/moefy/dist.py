"""torchrun awareness: one process group per step, or none for a plain single process.

Steps shard work with `shard` (data for finetune/activations/evaluate, layers for split and
router), combine with `all_gather` / `all_reduce_sum`, and let only rank 0 write outputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from moefy.errors import MoefyError

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MoefyError("compute.device is 'cuda' but torch sees no CUDA GPU; set compute.device: cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise MoefyError(
            f"rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
            "set compute.nproc_per_node to at most the number of GPUs"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(device: str = "auto") -> Context:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    dev = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Context(rank=rank, world_size=world_size, device=dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(items: Sequence[T], ctx: Context) -> list[T]:
    """This rank's share: every world_size-th item, starting at its rank."""
    return list(items[ctx.rank :: ctx.world_size])


def all_gather(obj: Any, ctx: Context) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] without a process group)."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum `tensor` over ranks in place (moved to the rank's device for NCCL and back)."""
    if ctx.distributed:
        work = tensor.to(ctx.device) if ctx.device.type == "cuda" else tensor
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work)
    return tensor
