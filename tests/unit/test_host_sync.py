"""No host synchronisation inside a training step, checked on the CPU.

On a GPU the host waits for the device whenever a value must come back: `.item()`,
`int()` / `bool()` / `if` on a tensor, boolean-mask indexing and `nonzero` (the output size
depends on the data), `torch.unique`, `masked_select`. Each such read drains the GPU's
queue, and none may sit inside a step that CUDA graphs capture. Every one of them reaches
the dispatcher as one of a few aten operators, on the CPU as on the GPU, so a dispatch mode
that records those operators finds them here without a GPU. The step runs as the compiled
configuration runs it (static slice slots, run.compile on), eagerly: compilation fuses the
same operators, and compiled kernels would bypass a dispatch mode.

tests/gpu/test_cuda.py repeats the check with torch.cuda.set_sync_debug_mode on a GPU."""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch
from helpers import TINY_TRAIN
from torch.utils._python_dispatch import TorchDispatchMode

from mmdls_dist.config import load_config
from mmdls_dist.train.loop import Trainer

SYNCING = {
    "aten._local_scalar_dense.default",  # .item(), int(t), float(t), bool(t), if t
    "aten.is_nonzero.default",
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.equal.default",
}


class HostSyncs(TorchDispatchMode):
    """Records each operator call that would make the host wait for a GPU, with the line of
    our code (or torchsurv's) that made it."""

    def __init__(self):
        super().__init__()
        self.found: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        syncs = name in SYNCING
        if name.startswith(("aten.index.Tensor", "aten.index_put")):  # x[mask], x[mask] = v
            masks = [i for i in args[1] if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
            syncs = bool(masks)
        if syncs:
            ours = [
                f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                for f in traceback.extract_stack()
                if "/mmdls_dist/" in f.filename or "/torchsurv/" in f.filename
            ]
            self.found[(name, ours[-1] if ours else "autograd")] += 1
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def trainer(shard_dir):
    # run.compile on without compiling (the test probes the eager operators): TrainModule
    # compiles in place, so build it with compile off and switch the model to static slots.
    cfg = load_config("debug", [*TINY_TRAIN, f"data.shards={shard_dir}", "data.num_workers=0"])
    t = Trainer(cfg, torch.device("cpu"), rank=0, world=1, prepare=lambda m: m)
    t.core.model.static_slices = True
    return t


def test_the_probe_sees_the_reads_it_looks_for():
    x = torch.tensor([1.0, -2.0, 3.0])
    with HostSyncs() as probe:
        x.sum().item()
        x[x > 0].sum()
        torch.unique(x)
        if (x > 2).any():
            pass
    names = Counter(name for name, _ in probe.found.elements())
    assert names["aten._local_scalar_dense.default"] == 2
    assert names["aten.index.Tensor"] == 1 and names["aten._unique2.default"] == 1


def test_a_training_step_makes_the_host_wait_nowhere(trainer, shard_dir):
    batch = next(iter(trainer.train_loader))
    gt_weight = 0.5  # both mask sources mixed: the ground-truth and the predicted views
    trainer.step(batch, gt_weight, last_micro=True)  # warm-up (lazy state, first step)
    with HostSyncs() as probe:
        parts = trainer.step(batch, gt_weight, last_micro=True)  # forward, losses, backward,
        # gradient clipping, the fused AdamW update and the scheduler
    assert not probe.found, dict(probe.found)
    assert set(parts) >= {"loss", "cox_os", "seg_lesion"} and torch.isfinite(parts["loss"])


def test_the_eager_slice_path_does_sync_so_the_probe_is_not_blind(trainer):
    """The dynamic path (run.compile off) selects real slices with a boolean mask: the
    probe must see that, or the test above proves nothing."""
    batch = next(iter(trainer.train_loader))
    trainer.core.model.static_slices = False
    try:
        with HostSyncs() as probe:
            trainer.step(batch, 0.5, last_micro=False)
    finally:
        trainer.core.model.static_slices = True
    assert any(where.startswith("views.py") for _, where in probe.found)
