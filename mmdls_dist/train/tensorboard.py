"""TensorBoard logging from rank 0: every scalar of an epoch's metrics and a few
segmentation overlays (CT in gray, predicted lesion in red, ground-truth lesion in green)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from mmdls_dist.config import Config

log = logging.getLogger(__name__)


def tensorboard_dir(cfg: Config, run_dir: Path | None) -> Path:
    if cfg.run.tensorboard_dir:
        return Path(cfg.run.tensorboard_dir)
    if run_dir is None:
        # Object-store runs: event files stay on rank 0's node (TensorBoard wants a folder).
        return Path("mmdls-work") / "tensorboard" / cfg.run.name
    return run_dir / "tensorboard"


def overlays(batch, out, count: int) -> torch.Tensor:
    """[n,3,H,W] in [0,1]: per patient the real slice with the largest predicted lesion."""
    n = min(count, len(batch))
    lesion_p = torch.sigmoid(out.lesion_logits[:n].float()) * batch.slice_mask[:n, :, None, None]
    index = lesion_p.sum((2, 3)).argmax(1)
    rows = torch.arange(n, device=index.device)
    ct = batch.ct[rows, index].float() / 255.0
    pred = (lesion_p[rows, index] > 0.5).float()
    truth = batch.lesion_mask[rows, index].float()
    image = torch.stack([ct, ct, ct], dim=1)
    image[:, 0] = torch.maximum(image[:, 0], pred)
    image[:, 1] = torch.maximum(image[:, 1] * (1 - 0.5 * pred), 0.7 * truth)
    return image.clamp(0, 1).cpu()


class EpochLogger:
    def __init__(self, cfg: Config, run_dir: Path | None):
        self.cfg = cfg
        self.dir = tensorboard_dir(cfg, run_dir)
        self.writer = SummaryWriter(log_dir=str(self.dir))
        log.info("TensorBoard logs: %s", self.dir)

    def log(self, metrics: dict, step: int, batch, out) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        has_masks = out is not None and out.lesion_logits is not None
        if batch is not None and has_masks and self.cfg.run.overlays > 0:
            images = overlays(batch, out, self.cfg.run.overlays)
            self.writer.add_images("val/overlay_lesion", images, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
