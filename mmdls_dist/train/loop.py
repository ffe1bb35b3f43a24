"""The per-worker training loop that Ray Train runs on every rank (launch.py starts it).

Flow: config dict (what Ray carries) -> rebuilt in each worker -> loaders, model, losses,
optimizer -> per step Batch -> ModelOutput -> LossOutput -> per epoch metrics ->
ray.train.report (+ checkpoint from rank 0) -> TensorBoard and the driver.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import tempfile
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

from mmdls_dist import storage
from mmdls_dist.config import Config, OptimConfig, from_dict, to_dict
from mmdls_dist.data.loader import make_loader
from mmdls_dist.data.schema import Batch
from mmdls_dist.data.shards import ShardError, data_manifest, manifest_hash
from mmdls_dist.model.mmdls import MMDLS
from mmdls_dist.model.output import prediction_records
from mmdls_dist.train import checkpoint
from mmdls_dist.train.chaos import Chaos
from mmdls_dist.train.distributed import all_gather_object, gather_with_grad, rank_and_world
from mmdls_dist.train.losses import TaskWeighting, compute_losses
from mmdls_dist.train.validation import summarize

log = logging.getLogger(__name__)


class TrainModule(nn.Module):
    """Model + task weighting in one module, so DDP also syncs learned task weights."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.loss_cfg = cfg.loss
        self.model = MMDLS(cfg.model, static_slices=cfg.run.compile != "off")
        if cfg.run.compile != "off":
            # In place (nn.Module.compile): the state dict keeps its names, so checkpoints
            # load the same with or without compilation.
            self.model.compile(mode=cfg.run.compile)
        self.weighting = TaskWeighting(cfg.loss)
        self.gather = functools.partial(gather_with_grad, capacity=cfg.data.batch_size)

    def forward(self, batch: Batch, gt_mask_weight: float):
        output = self.model(batch, gt_mask_weight)
        losses = compute_losses(output, batch, self.loss_cfg, self.weighting, self.gather)
        return output, losses


def amp_settings(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """-> (autocast dtype or None, use a GradScaler)."""
    if device.type != "cuda":
        return None, False
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[
        precision
    ]


def lr_lambda(cfg: OptimConfig, steps_per_epoch: int):
    """Linear warm-up then cosine decay to min_lr_ratio, per optimizer step."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = max(1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def gt_mask_weight(epoch: int, cfg: OptimConfig) -> float:
    """Ground-truth share of the encoders' views: 1 at epoch 0, linearly to 0 at the end of
    the warm-up (then predicted masks only, as at inference)."""
    if cfg.gt_mask_warmup_epochs == 0:
        return 0.0
    return max(0.0, 1.0 - epoch / cfg.gt_mask_warmup_epochs)


def on_device(batches, device: torch.device):
    """The loader's batches on `device`. On a GPU each host-to-device copy (from pinned
    memory) runs on a side stream, so it overlaps the previous step's kernels, which are
    still running: the host is ahead of the GPU because nothing in a step waits for it.
    The compute stream waits for the copy before the step that reads it, and each tensor
    is marked as used there, so the allocator does not hand its memory out early."""
    if device.type != "cuda":
        for batch in batches:
            yield batch.to(device)
        return
    side, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    for batch in batches:
        with torch.cuda.stream(side):
            moved = batch.to(device, non_blocking=True)
        compute.wait_stream(side)
        for value in moved.tensors().values():
            value.record_stream(compute)
        yield moved


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


class ProgressLine:
    """Rank 0's line inside an epoch, every `every_s` seconds: step / steps, this rank's
    patients/s, the running mean loss and the epoch's ETA. Ray forwards worker output line
    by line to the driver and to `ray job logs`, so a line (not a bar) is what arrives.
    Reading the running loss is the one host synchronisation, and only when a line is due."""

    def __init__(self, label: str, steps: int, every_s: float):
        self.label, self.steps, self.every_s = label, steps, every_s
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, patients: int, loss_sum) -> None:
        now = time.perf_counter()
        if self.every_s <= 0 or now - self.last < self.every_s or done >= self.steps:
            return
        self.last = now
        elapsed = now - self.start
        log.info(
            "%s  step %d/%d  %.1f patients/s  loss %.3f  ETA %s",
            self.label,
            done,
            self.steps,
            patients / elapsed,
            float(loss_sum) / done,
            _clock(elapsed * (self.steps - done) / done),
        )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Trainer:
    """Everything one worker holds for a run. Methods are the steps of the loop."""

    def __init__(self, cfg: Config, device: torch.device, rank: int, world: int, prepare):
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.manifest = data_manifest(cfg.data)
        self.train_loader = make_loader(cfg.data, "train", "train", rank, world, self.manifest)
        self.val_loader = make_loader(cfg.data, "val", "eval", rank, world, self.manifest)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        module = TrainModule(cfg)
        if device.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
        self.module = prepare(module)
        self.core: TrainModule = getattr(self.module, "module", self.module)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.optim.grad_accum)
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(),
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            fused=True,  # one kernel for every parameter's update, no host read of the step count
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.optim, self.steps_per_epoch)
        )
        self.amp_dtype, use_scaler = amp_settings(cfg.optim.precision, device)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.progress = checkpoint.Progress()
        self.step_log: list[tuple[int, dict]] = []  # rank 0: this epoch's per-step scalars
        self.identity = {
            "config": to_dict(cfg),
            "manifest_hash": manifest_hash(self.manifest),
            # What inference on another cohort must z-score its tables with.
            "normalization": self.manifest["normalization"],
            "image_size": self.manifest["image_size"],
        }
        torch.manual_seed(cfg.run.seed + rank)  # dropout differs per rank

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def restore(self, url: str) -> None:
        with storage.local_copy(url) as directory:
            state, identity = checkpoint.load(directory)
        checkpoint.check_compatible(identity, self.identity, f"run {self.cfg.run.name!r}")
        self.core.model.load_state_dict(state["model"])
        self.core.weighting.load_state_dict(state["weighting"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.progress = checkpoint.Progress(**state["progress"])
        # Each rank continues its own random stream (dropout differs per rank), so a
        # resumed run draws what an uninterrupted one would have.
        checkpoint.set_rng_state(state["rng"][self.rank % len(state["rng"])])

    def save(self, directory: str, metrics: dict, rng: list[dict]) -> None:
        checkpoint.save(
            directory,
            modules={
                "model": self.core.model,
                "weighting": self.core.weighting,
                "optimizer": self.optimizer,
                "scheduler": self.scheduler,
                "scaler": self.scaler,
            },
            progress=self.progress,
            identity=self.identity,
            metrics=metrics,
            rng=rng,
        )

    def step(self, batch: Batch, gt_weight: float, last_micro: bool) -> dict[str, torch.Tensor]:
        """One micro-batch; returns the detached loss terms as device tensors (no host sync:
        the epoch sums them and reads them once)."""
        sync = self.world == 1 or last_micro
        no_sync = getattr(self.module, "no_sync", None)
        with contextlib.nullcontext() if sync or no_sync is None else no_sync():
            with self.autocast():
                _, losses = self.module(batch, gt_weight)
            loss = losses.total / self.cfg.optim.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        if last_micro:
            self._optimizer_step()
        return {k: v.detach() for k, v in losses.parts.items()} | {"loss": losses.total.detach()}

    def _optimizer_step(self) -> None:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.global_step += 1

    def _step_scalars(self, parts: dict[str, torch.Tensor]) -> dict:
        """The optimizer step's training scalars (the last micro-batch's loss terms and the
        learning rate), kept as device tensors until the epoch ends."""
        scalars = {f"step/{'loss' if k == 'loss' else 'loss_' + k}": v for k, v in parts.items()}
        return scalars | {"step/lr": self.scheduler.get_last_lr()[0]}

    def train_epoch(self, epoch: int, chaos: Chaos | None = None) -> dict[str, float]:
        self.module.train()
        self.step_log = []
        self.train_loader.dataset.set_epoch(epoch)
        gt_weight = gt_mask_weight(epoch, self.cfg.optim)
        sums: dict[str, torch.Tensor | float] = defaultdict(float)
        n_batches, n_patients, waited = 0, 0, 0.0
        accum = self.cfg.optim.grad_accum
        t0 = tick = time.perf_counter()
        progress = ProgressLine(
            f"epoch {epoch + 1}/{self.cfg.optim.epochs}",
            len(self.train_loader),
            self.cfg.run.progress_every_s,
        )
        for i, batch in enumerate(on_device(self.train_loader, self.device)):
            waited += time.perf_counter() - tick
            last = (i + 1) % accum == 0 or i + 1 == len(self.train_loader)
            parts = self.step(batch, gt_weight, last)
            for key, value in parts.items():
                sums[key] += value
            n_batches += 1
            n_patients += len(batch)
            if last and self.rank == 0:
                self.step_log.append((self.progress.global_step, self._step_scalars(parts)))
            if last and chaos is not None:
                chaos("step", self.progress.global_step)
            if self.rank == 0:
                progress(n_batches, n_patients, sums["loss"])
            tick = time.perf_counter()
        seconds = time.perf_counter() - t0
        keys = sorted(sums)
        totals = _all_reduce_sum(
            [float(sums[k]) for k in keys] + [n_batches, n_patients, waited], self.device
        )
        batches_all, patients_all, waited_all = totals[-3:]
        metrics = {
            f"train/{'loss' if k == 'loss' else 'loss_' + k}": v / batches_all
            for k, v in zip(keys, totals, strict=False)
        }
        metrics["train/patients_per_s"] = patients_all / seconds
        metrics["train/data_wait_fraction"] = waited_all / (self.world * seconds)
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        metrics["train/gt_mask_weight"] = gt_weight
        return metrics

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], list[dict], Batch | None, object]:
        """Every val patient once across ranks; predictions gathered, metrics on all."""
        model = self.core.model.eval()
        records: list[dict] = []
        first = None
        for batch in on_device(self.val_loader, self.device):
            with self.autocast():
                out = model(batch)
            records.extend(prediction_records(batch, out))
            if first is None:
                first = (batch, out)
        merged = [r for part in all_gather_object(records) for r in part]
        return summarize(merged, prefix="val/"), merged, *(first or (None, None))


def score_of(metrics: dict, cfg: Config) -> float:
    """run.metric for ranking checkpoints; NaN (undefined on this split) ranks last."""
    value = metrics.get(cfg.run.metric, float("nan"))
    if value is None or math.isnan(value):
        return -1e9 if cfg.run.mode == "max" else 1e9
    return float(value)


def improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def setup_worker_logging(rank: int) -> None:
    """Our loggers only (Ray's own stay as Ray set them): rank in the format, INFO on rank 0,
    warnings and errors on the others."""
    logger = logging.getLogger("mmdls_dist")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
            )
        )
        logger.addHandler(handler)
        logger.propagate = False
    _quiet_ray_train_reports()


def _quiet_ray_train_reports() -> None:
    """Ray Train's per-report INFO lines off the console. build_trainer sets Ray Train's own
    LoggingConfig(log_level="WARNING"), which covers its `ray.train.*` loggers; Ray 2.60
    names one logger by its file path instead (execution/context.py: a ~900-character
    "Reporting training result" line per rank and epoch), which that setting misses, so
    the same level is given to that logger here."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


# Errors a retry cannot mend: the same data and the same config fail the same way again.
NOT_RETRIED = (
    ShardError,
    checkpoint.IncompatibleCheckpointError,
    checkpoint.RefusedCheckpointError,
)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function: config dict -> training with per-epoch reports.

    A data or config error is written to the run folder's fatal.json before it is raised;
    Ray restarts the worker group on any failure, and the restarted workers find the file
    and stop at once, so only worker and node faults are really retried (launch.fit
    raises the recorded error)."""
    import ray.train

    cfg = from_dict(Config, config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    setup_worker_logging(rank)
    run = storage.join(cfg.run.storage_path, cfg.run.name)
    fatal = storage.join(run, checkpoint.FATAL)
    if storage.exists(fatal):
        log.error("not retried: %s", storage.read_json(fatal)["error"])
        return
    try:
        _train(cfg, rank, world, run)
    except NOT_RETRIED as exn:
        storage.write_json(fatal, {"kind": type(exn).__name__, "error": str(exn)})
        raise


def _train(cfg: Config, rank: int, world: int, run: str) -> None:
    import ray.train.torch

    from mmdls_dist.train.tensorboard import EpochLogger

    device = ray.train.torch.get_device()
    if rank == 0:
        _record_placement_group(run)
    trainer = Trainer(cfg, device, rank, world, ray.train.torch.prepare_model)
    # The newest complete checkpoint on storage, not only the one Ray registered: a worker
    # killed right after a report leaves a checkpoint Ray may never have registered.
    start = checkpoint.newest_complete(run)
    if start is not None:
        trainer.restore(start)
        progress = trainer.progress
        log.info(
            "resumed at epoch %d (step %d) from %s", progress.epoch, progress.global_step, start
        )
    chaos = Chaos(cfg.chaos, rank, run)
    board = EpochLogger(cfg) if rank == 0 else None
    metrics: dict = {}  # the last epoch's
    while trainer.progress.epoch < cfg.optim.epochs:
        epoch = trainer.progress.epoch
        if rank == 0:
            checkpoint.log_execution(run, epoch, trainer.progress.global_step, world)
        started = time.perf_counter()
        metrics = trainer.train_epoch(epoch, chaos)
        chaos("validation", trainer.progress.global_step)
        val, _, first_batch, first_out = trainer.evaluate()
        metrics.update(val)
        metrics["epoch"] = epoch
        stop = _update_progress(trainer, metrics, cfg)
        metrics.update(
            {
                "global_step": trainer.progress.global_step,
                "score": score_of(metrics, cfg),
                "early_stop": stop,
            }
        )
        if board is not None:
            board.log(
                metrics, trainer.progress.global_step, first_batch, first_out, trainer.step_log
            )
        _report(trainer, metrics, rank)
        chaos("after_report", trainer.progress.global_step)
        log.info(
            "epoch %d/%d (%s): %s",
            epoch + 1,
            cfg.optim.epochs,
            _clock(time.perf_counter() - started),
            _brief(metrics),
        )
        if stop:
            break
    if board is not None:
        board.close(metrics)


def _record_placement_group(run: str) -> None:
    """The worker group's placement group id, in the run folder: a sweep releases it
    itself when the trial ends (tune.ReleasePlacementGroups), whatever became of Ray
    Train's own cleaner."""
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    if group is not None:
        storage.write_json(storage.join(run, checkpoint.PLACEMENT_GROUP), {"id": group.id.hex()})


def _update_progress(trainer: Trainer, metrics: dict, cfg: Config) -> bool:
    """Advance epoch / best / patience; True when early stopping triggers (same on all ranks:
    the metric is computed from gathered predictions)."""
    progress = trainer.progress
    value = metrics.get(cfg.run.metric, float("nan"))
    if not math.isnan(value) and improved(value, progress.best, cfg.run.mode):
        progress.best, progress.bad_epochs = value, 0
    else:
        progress.bad_epochs += 1
    progress.epoch += 1
    patience = cfg.optim.early_stopping_patience
    return patience > 0 and progress.bad_epochs >= patience


def _report(trainer: Trainer, metrics: dict, rank: int) -> None:
    import ray.train

    rng = all_gather_object(checkpoint.rng_state())  # every rank's, for an exact resume
    with tempfile.TemporaryDirectory() as directory:
        ckpt = None
        if rank == 0:
            trainer.save(directory, metrics, rng)
            ckpt = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=ckpt)


BRIEF = (  # the epoch line: (label, metric key, format)
    ("loss", "train/loss", ".3f"),
    ("val AUC histology", "val/auc_histology", ".3f"),
    ("stage", "val/auc_stage", ".3f"),
    ("C-index DFS", "val/cindex_dfs", ".3f"),
    ("OS", "val/cindex_os", ".3f"),
    ("Dice lung", "val/dice_lung", ".2f"),
    ("lesion", "val/dice_lesion", ".2f"),
    ("patients/s", "train/patients_per_s", ".1f"),
)


def _brief(metrics: dict) -> str:
    return "  ".join(
        f"{label} {metrics[key]:{spec}}" for label, key, spec in BRIEF if key in metrics
    )
