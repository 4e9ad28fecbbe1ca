"""Collectives for the callbacks: exact cross-rank sums and concatenations, no-ops in a single process.

The callbacks reduce *sums* (token counts, sums of values) and gather raw token values, never per-rank means:
the result is the single-process computation on the union of every rank's tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """Item indices of `rank`: rank, rank + W, ... padded with -1 so every rank has ceil(n / W) of them.

    Equal lengths keep the ranks in lockstep (FSDP generation all-gathers weights in every forward pass), and
    no item is dropped: a -1 is generated for (on item 0) but not counted.
    """
    per_rank = -(-n // world_size)
    return [i if (i := rank + world_size * j) < n else -1 for j in range(per_rank)]


def _comm_device(device: torch.device | str | None) -> torch.device:
    # NCCL only moves CUDA tensors; gloo takes CPU ones
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device or "cpu")


def all_reduce(t: torch.Tensor, op: str = "sum", device=None) -> torch.Tensor:
    """A reduced copy of `t` (sum, min or max over ranks), on t's device."""
    if world()[1] == 1:
        return t.clone()
    x = t.to(_comm_device(device)).clone()
    dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return x.to(t.device)


def gather_cat(t: torch.Tensor, device=None) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank, in rank order (pads to the longest, then trims)."""
    if world()[1] == 1:
        return t
    dev = _comm_device(device)
    n = torch.tensor([t.numel()], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world()[1])]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=dev)
    padded[: t.numel()] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(t.device)


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (torch.distributed.all_gather_object)."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out
