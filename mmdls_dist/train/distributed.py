"""The one thin adapter over torch.distributed: rank, world size and gathers.

Inside Ray Train the process group already exists (Ray created it); nothing here creates
one. Outside a process group everything degrades to the single-process case.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(*tensors: torch.Tensor, capacity: int) -> tuple[list[torch.Tensor], int]:
    """All-gather 1-D tensors of up to `capacity` rows per rank (the per-GPU batch size),
    each padded with zeros to `capacity`, concatenated in rank order: world x capacity rows,
    a fixed shape, and no exchange of sizes (which would read a count back to the host).
    The padding rows are zeros, so a `known` column marks them unknown. The calling rank's
    own slice is its input tensor itself, so gradients flow into its local graph; the other
    ranks' slices are constants. Returns (tensors, world_size).

    Why not torch.distributed.nn.all_gather: that one sends gradients back to their owners,
    and combined with DDP's own gradient averaging would count every term twice. Here each
    rank differentiates only through its own patients and the caller scales the loss by the
    world size, so DDP's average equals the full-batch gradient exactly.
    """
    rank, world = rank_and_world()
    if world == 1:
        return list(tensors), 1
    rows = tensors[0].shape[0]
    if rows > capacity:
        raise ValueError(f"a batch of {rows} patients on rank {rank}, over capacity {capacity}")
    out = []
    for t in tensors:
        own = torch.cat([t, t.new_zeros((capacity - rows, *t.shape[1:]))])
        parts = [torch.empty_like(own) for _ in range(world)]
        dist.all_gather(parts, own.detach())
        parts[rank] = own
        out.append(torch.cat(parts))
    return out, world


def all_gather_object(value) -> list:
    """Every rank's `value` (any picklable object), in rank order; [value] alone."""
    _, world = rank_and_world()
    if world == 1:
        return [value]
    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out
