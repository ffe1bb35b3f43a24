"""TensorBoard logging from rank 0: the training loss terms and learning rate per optimizer
step, every scalar of an epoch's metrics, a few segmentation overlays (CT in gray,
predicted lesion in red, ground-truth lesion in green), the run's config as text, and at
the end of the run its hyperparameters with the final validation metrics (the HParams tab,
to compare runs and sweep trials).

The event files live with the run: <run>/tensorboard. On local or NFS storage the writer
writes there directly; on object storage (s3://, gs://) it writes to a local temporary
folder and rank 0 copies its event files to the run's storage after every epoch, so they
outlive the node (spot preemption, `ray down`, a finished RayJob). A resumed run writes a
new event file beside the old ones; TensorBoard reads them as one run.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from mmdls_dist import storage
from mmdls_dist.config import Config, dump_yaml, to_dict
from mmdls_dist.options import flatten

log = logging.getLogger(__name__)


def tensorboard_dir(cfg: Config) -> str:
    """Where a run's event files are: run.tensorboard_dir, else <run>/tensorboard (a local
    folder or an object-store URL)."""
    if cfg.run.tensorboard_dir:
        return storage.absolute(cfg.run.tensorboard_dir)
    return storage.join(cfg.run.storage_path, cfg.run.name, "tensorboard")


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
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.target = tensorboard_dir(cfg)
        local = storage.local_path(self.target)
        self.remote = local is None  # object storage: write locally, copy each epoch
        self.dir = Path(tempfile.mkdtemp(prefix="mmdls-tb-")) if self.remote else local
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.writer.add_text("config", _as_code(dump_yaml(cfg)))
        log.info("TensorBoard logs: %s", self.target)

    def log(self, metrics: dict, step: int, batch, out, steps=()) -> None:
        """An epoch: `steps` are its optimizer steps as (global step, {tag: 0-d tensor}),
        read here at once, so logging them costs no host synchronisation inside a step."""
        for global_step, values in steps:
            for key, value in values.items():
                self.writer.add_scalar(key, float(value), global_step)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        has_masks = out is not None and out.lesion_logits is not None
        if batch is not None and has_masks and self.cfg.run.overlays > 0:
            images = overlays(batch, out, self.cfg.run.overlays)
            self.writer.add_images("val/overlay_lesion", images, step)
        self.writer.flush()
        self.sync()

    def sync(self) -> None:
        """Copy this writer's event files to the run's storage (object storage only)."""
        if self.remote:
            for path in sorted(self.dir.rglob("events.out.tfevents.*")):
                relative = path.relative_to(self.dir).as_posix()
                storage.upload(path, storage.join(self.target, relative))

    def close(self, metrics: dict | None = None) -> None:
        """End of the run: hyperparameters + the final validation metrics (HParams tab)."""
        if metrics:
            final = {
                f"hparam/{key}": float(value)
                for key, value in metrics.items()
                if key.startswith("val/") and isinstance(value, (int, float)) and value == value
            }
            self.writer.add_hparams(hparams(self.cfg), final, run_name="hparams")
        self.writer.close()
        if self.remote:
            self.sync()
            shutil.rmtree(self.dir, ignore_errors=True)


HPARAM_SECTIONS = ("data", "model", "loss", "optim")


def hparams(cfg: Config) -> dict:
    """The experiment's settings as HParams columns: every field of the data, model, loss
    and optim blocks (lists as text, as the plugin takes scalars and strings only), the
    seed and the worker count."""
    values = flatten({k: v for k, v in to_dict(cfg).items() if k in HPARAM_SECTIONS})
    values |= {"run.seed": cfg.run.seed, "run.num_workers": cfg.run.num_workers}
    return {
        key: value if isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in values.items()
    }


def _as_code(text: str) -> str:
    """TensorBoard renders text as Markdown: indented four spaces, a block of code."""
    return "\n".join("    " + line for line in text.splitlines())
