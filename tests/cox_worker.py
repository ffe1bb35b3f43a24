"""Worker for the 2-process gloo test of the global-batch Cox loss (spawned, so importable)."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmdls_dist.train.distributed import gather_with_grad
from mmdls_dist.train.losses import cox_loss


def run(rank: int, world: int, init_file: str, data: dict, cuts: list[int], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Linear(data["x"].shape[1], 1))
        lo, hi = cuts[rank], cuts[rank + 1]
        log_hz = model(data["x"][lo:hi])[:, 0]
        term = cox_loss(
            log_hz,
            data["time"][lo:hi],
            data["event"][lo:hi],
            data["known"][lo:hi],
            gather=functools.partial(gather_with_grad, capacity=max(np.diff(cuts))),
        )
        term.loss.backward()
        torch.save(
            {
                "loss": term.loss.detach(),
                "events": term.n_events,
                "grads": [p.grad.clone() for p in model.module.parameters()],
            },
            f"{out}.{rank}",
        )
        # Both ranks done with gloo before either tears it down: destroying the group while
        # the peer's connection is still open aborted a process now and then ("terminate
        # called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
