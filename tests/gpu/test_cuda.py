"""CUDA checks: run where a GPU is present (skipped elsewhere, e.g. in CI)."""

from __future__ import annotations

import pytest
import torch

from mmdls_dist.config import DataConfig, LossConfig, ModelConfig
from mmdls_dist.data.loader import make_loader
from mmdls_dist.data.schema import unpack_masks
from mmdls_dist.model.mmdls import MMDLS
from mmdls_dist.train.losses import TaskWeighting, compute_losses

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def batch(shard_dir):
    """3 patients of the shared synthetic shards at 64 px (real masks, real tables)."""
    cfg = DataConfig(
        shards=str(shard_dir), batch_size=3, max_slices=7, num_workers=0, image_size=64
    )
    return next(iter(make_loader(cfg, "train", "eval")))


def test_masks_unpack_identically_on_the_gpu(batch):
    cpu = unpack_masks(batch.masks, (64, 64))
    assert torch.equal(unpack_masks(batch.masks.cuda(), (64, 64)).cpu(), cpu)


def test_gpu_fp32_matches_cpu(batch):
    torch.manual_seed(0)
    model = MMDLS(ModelConfig(dropout=0.0)).eval()
    torch.backends.cudnn.allow_tf32 = False  # compare true fp32 with fp32
    with torch.no_grad():
        cpu = model(batch)
        gpu = model.cuda()(batch.to("cuda"))
    torch.backends.cudnn.allow_tf32 = True
    for name in ("histology_logit", "stage_logits", "dfs_log_hazard", "os_log_hazard"):
        assert torch.allclose(getattr(gpu, name).cpu(), getattr(cpu, name), atol=2e-3), name


def test_bf16_training_step_is_finite_and_learns(batch):
    torch.manual_seed(0)
    model = MMDLS(ModelConfig()).cuda().to(memory_format=torch.channels_last)
    loss_cfg = LossConfig()
    weighting = TaskWeighting(loss_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gpu_batch = batch.to("cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            result = compute_losses(model(gpu_batch), gpu_batch, loss_cfg, weighting)
        optimizer.zero_grad()
        result.total.backward()
        optimizer.step()
        losses.append(result.total.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]


def test_a_cuda_training_step_never_waits_for_the_device(shard_dir):
    """tests/unit/test_host_sync.py's check with CUDA's own detector: any synchronising
    call inside the step raises (set_sync_debug_mode("error"))."""
    from helpers import TINY_TRAIN

    from mmdls_dist.config import load_config
    from mmdls_dist.train.loop import Trainer

    overrides = [*TINY_TRAIN, f"data.shards={shard_dir}", "data.num_workers=0"]
    cfg = load_config("debug", [*overrides, "optim.precision=bf16"])
    trainer = Trainer(cfg, torch.device("cuda"), rank=0, world=1, prepare=lambda m: m.cuda())
    trainer.core.model.static_slices = True  # as with run.compile on
    batch = next(iter(trainer.train_loader)).to("cuda")
    trainer.step(batch, 0.5, last_micro=True)  # first step: lazy state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.step(batch, 0.5, last_micro=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_batches_copied_on_the_side_stream_arrive_whole(shard_dir):
    """loop.on_device: every batch's tensors on the GPU equal the host batch, while the
    compute stream is kept busy between the copies."""
    from mmdls_dist.train.loop import on_device

    cfg = DataConfig(shards=str(shard_dir), batch_size=3, max_slices=7, num_workers=0)
    host = [b.pin_memory() for b in make_loader(cfg, "train", "eval")]
    busy = torch.randn(2048, 2048, device="cuda")
    for want, got in zip(host, on_device(host, torch.device("cuda")), strict=True):
        busy = busy @ busy / busy.norm()  # the "previous step", still running
        assert torch.equal(got.ct.cpu(), want.ct) and torch.equal(got.masks.cpu(), want.masks)
        torch.testing.assert_close(got.os_time.cpu(), want.os_time, equal_nan=True)
        assert torch.equal(got.lung_mask.cpu(), want.lung_mask)
