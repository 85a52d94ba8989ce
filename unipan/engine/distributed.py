"""Process-group helpers: one code path for 1 process or many under `torchrun`.

`torchrun --nproc_per_node N` sets WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR/PORT);
`init_distributed()` reads them and joins the group with gloo on CPU or nccl on CUDA. Without
those variables everything here degrades to the single-process case, so callers never branch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

_ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def is_dist_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_initialized() else 0


def get_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if is_dist_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return get_rank() == 0


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment variables, if any.

    Args:
        device: "cpu" forces gloo; "cuda" forces nccl; "auto" picks nccl when CUDA is available.
        timeout_s: collective timeout.

    Returns:
        (rank, world_size, local_rank); (0, 1, 0) when not launched by torchrun with WORLD_SIZE > 1.

    Raises:
        ValueError: when the variables are inconsistent (rank outside the world, CUDA requested
            for nccl but fewer GPUs than local ranks).
    """
    if is_dist_initialized():
        return get_rank(), get_world_size(), get_local_rank()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return 0, 1, 0
    rank = _env_int("RANK", -1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size} (launch with torchrun)")
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        # nccl needs the current device set before the first collective
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    logger.info("joined process group: backend %s, rank %d/%d, local rank %d", backend, rank, world_size, local_rank)
    return rank, world_size, local_rank


def cleanup() -> None:
    """Leave the process group (no-op when there is none)."""
    if is_dist_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum a tensor over ranks, in place, and return it (identity in a single process).

    The tensor must live on the device the backend expects (CPU for gloo, the current CUDA
    device for nccl).
    """
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Average a dict of scalars over ranks; every rank must pass the same keys in the same order.

    Args:
        values: name -> scalar.
        device: where the temporary FloatTensor[K] lives (the backend's device).
    """
    world = get_world_size()
    if world == 1 or not values:
        return dict(values)
    keys = list(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return {k: float(v) / world for k, v in zip(keys, stacked.tolist(), strict=True)}


def all_gather_object(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank, in rank order ([obj] in a single process)."""
    world = get_world_size()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank (obj itself in a single process)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (e.g. BatchNorm running statistics) to every rank, in place."""
    if get_world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.device.type == "cpu" and backend_device().type == "cuda":
            staged = buffer.to(backend_device())
            dist.broadcast(staged, src=src)
            buffer.copy_(staged)
        else:
            dist.broadcast(buffer, src=src)


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> Sequence[int]:
    """This rank's share of range(n): indices rank, rank + W, rank + 2W, ... (disjoint, covering)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return range(rank, n, world_size)


def backend_device() -> torch.device:
    """The device collectives of the current backend need (CPU for gloo, current GPU for nccl)."""
    if is_dist_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
