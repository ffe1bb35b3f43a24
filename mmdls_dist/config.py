"""Typed configuration for every command. Each field has one doc comment (unit, valid
range; it is also the field's --help text) and is validated on creation; unknown keys and
wrong types fail loudly, naming the field.

Blocks: data, model, loss, optim, run (training), synth (a synthetic cohort), prep (raw
export -> shards), eval (evaluation and prediction), chaos (fault drills). YAML presets
live in mmdls_dist/configs/ (debug, default, paper); `load_config(preset, overrides)`
applies repeated `section.key=value` overrides (values parsed as YAML). A command's own
flags (`mmdls shard --val-fraction 0.15`) are such overrides (options.add_flags). What Ray
and Tune carry is `to_dict(cfg)`; workers rebuild the Config with `from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mmdls_dist.options import apply_overrides, choice, flatten, from_dict, to_dict, yaml_value

PRESETS_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "debug"  # what every command loads without --config: CPU-sized, synthetic

# Field metadata: the field (or, on a Config field, the whole block) may differ between a
# run and its resumption: where and how it runs, how long, loader performance knobs.
# Everything else changes the experiment, and resuming with a different value is refused.
RESUMABLE = {"resumable": True}


def resumable(default: Any) -> Any:
    return field(default=default, metadata=RESUMABLE)


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how each training worker streams them."""

    shards: str = resumable("")  # folder or object-store prefix (s3://, gs://) holding
    # manifest.json (a resumed run may read a moved copy: the manifest hash must match)
    batch_size: int = 4  # patients per rank per step, >= 1
    max_slices: int = 30  # slices per patient fed to the model (evenly spaced; padded), >= 1
    image_size: int = 0  # pixels per side fed to the model; 0 = as stored in the shards
    num_workers: int = resumable(2)  # DataLoader worker processes per rank, >= 0
    prefetch_factor: int = resumable(2)  # batches prefetched per DataLoader worker, >= 1
    pin_memory: bool = resumable(False)  # page-locked host batches (set True on GPU)
    shuffle_buffer: int = 16  # patients held in each stream's shuffle buffer; <= 1 = off
    steps_per_epoch: int | None = None  # batches per rank per epoch; None = one pass
    verify: str = resumable("full")  # "full": sha256 of every shard before use; "size": sizes
    seed: int = 0  # shard order / shuffle seed (combined with epoch, rank, worker)
    fold: int = -1  # shards cut into cross-validation folds (prep.folds): fold k validates,
    # the other folds train; -1 = the shards' own train / val split

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("max_slices", 1), ("prefetch_factor", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"data.{name} must be >= {low}")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if self.image_size != 0 and not 16 <= self.image_size <= 1024:
            raise ValueError("data.image_size must be 0 or in 16..1024")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError("data.steps_per_epoch must be >= 1 or None")
        choice("data.verify", self.verify, ("full", "size"))
        if self.fold < -1:
            raise ValueError("data.fold must be -1 (no folds) or a fold index >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and switches of the MM-DLS network; every field is searchable by Tune. The
    defaults are the recommended model; presets set its sizes."""

    widths: tuple[int, ...] = (16, 32, 64, 128)  # ResNet encoder channels per stage (4 stages)
    blocks_per_stage: int = 1  # residual blocks per encoder stage, 1..4
    decoder_width: int = 32  # channels of the lung / lesion decoders, >= 8
    cross_attention_heads: int = 4  # lesion->lung cross-attention heads (divides decoder_width)
    embed_dim: int = 64  # slice-token and patient-vector width, >= 8
    fusion_heads: int = 4  # attention heads over slices / modalities (divides embed_dim)
    fusion_layers: int = 1  # transformer layers over slices, 0..4
    tabular_hidden: int = 64  # hidden width of the clinical / PET / radiomics MLPs
    dropout: float = 0.1  # dropout in fusion and heads, [0, 0.9)
    lesion_reader: int = 48  # side (pixels) of the patient-level lesion crop read by a
    # small CNN into its own fusion token (model/reader.py); 0 = off, else >= 8
    reader_field: float = 5.0  # the crop spans this many equivalent lesion radii, > 1
    lesion_reader_mask: bool = True  # the reader also sees the lesion mask of its slices
    reader_width: int = 16  # channels of the lesion reader's first layers (x2, then x4), >= 4
    lesion_descriptors: bool = True  # measured lesion shape / texture descriptors of the
    # lesion mask as one more fusion token (model/descriptors.py)
    given_lesion_mask: bool = True  # the lesion views read the lesion contour a patient
    # comes with, at training and inference alike, and the segmentor's mask only where
    # there is none (CT-only prediction: always). Off: the given contour only trains the
    # segmentor and blends in during the warm-up
    radiomics_rank: int = 4  # > 0: the radiomics enter through a linear bottleneck of this
    # many dimensions with input dropout 0.5 (128 noisy columns over-fit a full MLP); 0 = MLP
    patient_fusion: str = "attention"  # "attention" over modality tokens, or "concat" + MLP
    survival_sees_classification: bool = True  # survival heads get soft histology/stage
    use_imaging: bool = True  # CT branch (segmentor, views, slice fusion); off = tables only
    use_radiomics: bool = True  # the radiomics token (ablations: single-modality models)
    use_pet: bool = True  # the PET token
    use_clinical: bool = True  # the clinical token

    def __post_init__(self) -> None:
        if len(self.widths) != 4 or min(self.widths) < 4:
            raise ValueError("model.widths must be 4 stage widths, each >= 4")
        if not 1 <= self.blocks_per_stage <= 4:
            raise ValueError("model.blocks_per_stage must be in 1..4")
        if self.decoder_width < 8 or self.decoder_width % self.cross_attention_heads:
            raise ValueError(
                "model.decoder_width must be >= 8 and divisible by model.cross_attention_heads"
            )
        if self.embed_dim < 8 or self.embed_dim % self.fusion_heads:
            raise ValueError("model.embed_dim must be >= 8 and divisible by model.fusion_heads")
        if not 0 <= self.fusion_layers <= 4:
            raise ValueError("model.fusion_layers must be in 0..4")
        if self.lesion_reader != 0 and self.lesion_reader < 8:
            raise ValueError("model.lesion_reader must be 0 (off) or >= 8 pixels")
        if self.reader_field <= 1.0:
            raise ValueError("model.reader_field must be > 1 (equivalent lesion radii)")
        if self.radiomics_rank < 0:
            raise ValueError("model.radiomics_rank must be >= 0")
        if self.tabular_hidden < 4 or self.reader_width < 4:
            raise ValueError("model.tabular_hidden and model.reader_width must be >= 4")
        if not 0.0 <= self.dropout < 0.9:
            raise ValueError("model.dropout must be in [0, 0.9)")
        choice("model.patient_fusion", self.patient_fusion, ("attention", "concat"))
        if not (self.use_imaging or self.use_radiomics or self.use_pet or self.use_clinical):
            raise ValueError(
                "model: at least one of use_imaging / use_radiomics / use_pet / "
                "use_clinical must be on"
            )


@dataclass(frozen=True)
class LossConfig:
    """Task weights and loss options. Weights are multipliers of each task's mean loss."""

    w_seg_lung: float = 0.5  # lung soft-Dice + BCE, >= 0
    w_seg_lesion: float = 1.0  # lesion soft-Dice + BCE (annotated patients only), >= 0
    w_histology: float = 1.0  # LUAD/LUSC BCE, >= 0
    w_stage: float = 1.0  # TNM stage CE, >= 0
    w_dfs: float = 1.0  # DFS Cox partial likelihood (global batch), >= 0
    w_os: float = 1.0  # OS Cox partial likelihood (global batch), >= 0
    weighting: str = "fixed"  # "fixed" or "uncertainty" (learned, Kendall et al. 2018)
    cox_ties: str = "efron"  # "efron" or "breslow"
    dice_smooth: float = 1.0  # soft-Dice smoothing (pixels), > 0

    def __post_init__(self) -> None:
        for name in ("w_seg_lung", "w_seg_lesion", "w_histology", "w_stage", "w_dfs", "w_os"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0")
        choice("loss.weighting", self.weighting, ("fixed", "uncertainty"))
        choice("loss.cox_ties", self.cox_ties, ("efron", "breslow"))
        if self.dice_smooth <= 0:
            raise ValueError("loss.dice_smooth must be > 0")

    def task_weights(self) -> dict[str, float]:
        """Loss-term name -> fixed weight (the names LossOutput.parts uses)."""
        return {
            "seg_lung": self.w_seg_lung,
            "seg_lesion": self.w_seg_lesion,
            "histology": self.w_histology,
            "stage": self.w_stage,
            "cox_dfs": self.w_dfs,
            "cox_os": self.w_os,
        }


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation schedule."""

    epochs: int = resumable(10)  # training epochs, >= 1 (raise it to train a run longer)
    lr: float = 1e-3  # AdamW peak learning rate, > 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay, >= 0
    warmup_epochs: float = 1.0  # linear warm-up length in epochs, >= 0; then cosine decay
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr, [0, 1]
    grad_accum: int = 1  # micro-batches per optimizer step (DDP syncs on the last), >= 1
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    precision: str = "auto"  # "auto" (bf16 on GPUs with it, else fp16 + GradScaler; fp32 on
    # CPU), "fp32", "bf16" or "fp16"
    gt_mask_warmup_epochs: int = 2  # epochs blending ground-truth masks into the views,
    # weight decaying linearly from 1 to 0; 0 = predicted masks from the start
    early_stopping_patience: int = resumable(0)  # epochs without improvement of run.metric;
    # 0 = off

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.grad_accum < 1:
            raise ValueError("optim.epochs and optim.grad_accum must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0 or self.grad_clip < 0:
            raise ValueError("optim.lr must be > 0; weight_decay, warmup_epochs, grad_clip >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("optim.min_lr_ratio must be in [0, 1]")
        choice("optim.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        if self.gt_mask_warmup_epochs < 0 or self.early_stopping_patience < 0:
            raise ValueError("optim.gt_mask_warmup_epochs and early_stopping_patience >= 0")


COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")


@dataclass(frozen=True)
class RunConfig:
    """Where a run lives and what resources it takes (Ray Train's scaling and run config)."""

    name: str = "mmdls"  # run name; starting the same name again resumes it
    storage_path: str = "mmdls-work/runs"  # local folder or s3:// / gs:// URI
    num_workers: int = 2  # DDP ranks (Ray Train workers), >= 1; with min_workers, the most
    min_workers: int = 0  # > 0: elastic (Ray Train's ScalingConfig(num_workers=(min, max))):
    # start with as many workers as the cluster holds, at least this many, and grow towards
    # num_workers as nodes join (each resize resumes from the last checkpoint); 0 = fixed
    resize_interval_s: float = 60.0  # elastic: how often Ray Train considers a resize, > 0
    use_gpu: bool = False  # one GPU per worker when True
    cpus_per_worker: float = 1.0  # CPUs reserved per worker, > 0
    max_failures: int = 2  # worker failures survived by resuming from the last checkpoint
    checkpoints_to_keep: int = 3  # newest + best by run.metric are kept; 0 = keep all
    metric: str = "epoch"  # what ranks checkpoints: "epoch" deploys the last one (measured
    # best on an unseen center: a validation metric on a fold of ~100-300 patients picks an
    # epoch on noise, docs/BENCHMARKS.md), or a reported metric, e.g. val/cindex_os, which
    # early stopping then also watches
    mode: str = "max"  # "max" or "min" for run.metric
    seed: int = 0  # model init and dropout seed (ranks add their rank)
    tensorboard_dir: str = ""  # "" = <storage_path>/<name>/tensorboard (on object storage:
    # written locally and copied there by rank 0 after every epoch)
    overlays: int = 4  # segmentation overlays logged to TensorBoard per epoch, >= 0
    compile: str = resumable("off")  # torch.compile of the network: "off", "default",
    # "max-autotune" or "reduce-overhead" (CUDA graphs); not "off": the imaging branch runs
    # on every slice slot (static shapes, MMDLS static_slices); GPU figures pending
    progress_every_s: float = resumable(30.0)  # rank 0 logs a progress line (step, patients/s,
    # running loss, ETA) this often inside an epoch, in seconds; 0 = only the epoch line

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError("run.name must be non-empty and contain no '/'")
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ValueError("run.num_workers must be >= 1 and run.cpus_per_worker > 0")
        if not 0 <= self.min_workers <= self.num_workers or self.resize_interval_s <= 0:
            raise ValueError(
                "run.min_workers must be in [0, run.num_workers] and run.resize_interval_s > 0"
            )
        if min(self.max_failures, self.checkpoints_to_keep, self.overlays) < 0:
            raise ValueError("run.max_failures, checkpoints_to_keep and overlays must be >= 0")
        if self.progress_every_s < 0:
            raise ValueError("run.progress_every_s must be >= 0")
        choice("run.mode", self.mode, ("max", "min"))
        choice("run.compile", self.compile, COMPILE_MODES)


@dataclass(frozen=True)
class SynthConfig:
    """A synthetic multi-center cohort (data/synth.py): what `mmdls synth` writes, and the
    embedded default's data when a run is given none."""

    style: str = "classic"  # the generator (data/synth/): "classic" (image-only risk in
    # lesion margin and texture) or "findings" (in spicules, satellites, cavitation and
    # pleural contact; another anatomy, lesion shape and scanner model)
    patients: int = 240  # cohort size over all centers, >= 4
    centers: int = 3  # synthetic hospitals, 1..4 (HOSP-A, -B, -C, -D)
    image_size: int = 96  # base slice size in pixels (centers scale it), >= 32
    min_slices: int = 8  # slices per patient, drawn in [min_slices, max_slices], >= 2
    max_slices: int = 16  # see min_slices
    missing_rate: float = 0.03  # share of empty clinical / PET / radiomics cells, [0, 0.5)
    label_missing_rate: float = 0.02  # share of empty label cells per task, [0, 0.5)
    seed: int = 0  # the cohort's seed: same seed, byte-identical files

    def __post_init__(self) -> None:
        choice("synth.style", self.style, ("classic", "findings"))
        if self.patients < 4:
            raise ValueError("synth.patients must be >= 4")
        if not 1 <= self.centers <= 4:
            raise ValueError("synth.centers must be in 1..4")
        if self.image_size < 32:
            raise ValueError("synth.image_size must be >= 32")
        if not 2 <= self.min_slices <= self.max_slices:
            raise ValueError("synth: need 2 <= min_slices <= max_slices")
        for name in ("missing_rate", "label_missing_rate"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise ValueError(f"synth.{name} must be in [0, 0.5)")


STRATA = ("center", "histology", "tnm_stage")


@dataclass(frozen=True)
class PrepConfig:
    """How a raw export becomes shards (`mmdls shard`, and a run given --data): the
    patient-level split and the shard packing. Recorded in the manifest."""

    image_size: int = 128  # stored slice size in pixels (square), 16..1024; shard at the
    # size the model reads (data.image_size) to keep resizing off the training hot path
    val_fraction: float = 0.2  # share of the internal (non-external) patients, [0, 1)
    test_fraction: float = 0.1  # share of the internal patients, [0, 1)
    folds: int = 0  # >= 2: the internal patients outside test are dealt to this many
    # cross-validation folds (fold0, fold1, ...; stratified as the split) instead of train
    # and val, and val_fraction is unused; 0 = one train / val split
    external_centers: tuple[str, ...] = ()  # centers held out whole as the external split
    stratify_by: tuple[str, ...] = STRATA  # keys the split balances: center, histology,
    # tnm_stage (an unknown label is a stratum of its own)
    seed: int = 0  # split seed
    max_patients_per_shard: int = 64  # >= 1
    max_shard_mb: float = 512.0  # target upper bound of a shard in MiB, >= 1
    allow_rejects: bool = False  # shard the valid patients of a cohort with defects; the
    # rejected ones and why are recorded in manifest.json

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ValueError("prep.image_size must be in 16..1024")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"prep.{name} must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("prep.val_fraction + prep.test_fraction must be < 1")
        if self.folds != 0 and not 2 <= self.folds <= 10:
            raise ValueError("prep.folds must be 0 (no folds) or in 2..10")
        unknown = set(self.stratify_by) - set(STRATA)
        if unknown:
            raise ValueError(f"prep.stratify_by: unknown keys {sorted(unknown)}")
        if self.max_patients_per_shard < 1 or self.max_shard_mb < 1:
            raise ValueError("prep.max_patients_per_shard must be >= 1, max_shard_mb >= 1")


@dataclass(frozen=True)
class EvalConfig:
    """How `mmdls evaluate` and `mmdls predict` run inference and score it."""

    parts: int = 2  # inference tasks per split (each patient in exactly one), >= 1
    batch_size: int = 8  # patients per forward pass, >= 1
    gpu: bool = False  # one GPU per inference task
    bootstrap: int = 200  # patient-level bootstrap resamples for 95% CIs; 0 = none
    seed: int = 0  # bootstrap seed
    horizons: tuple[float, ...] = (12.0, 24.0, 36.0)  # months: time-dependent AUC, Brier,
    # survival probabilities (ascending; Uno's C is truncated at the last)
    min_center_patients: int = 10  # a center gets its own report section from this many

    def __post_init__(self) -> None:
        if self.parts < 1 or self.batch_size < 1 or self.bootstrap < 0:
            raise ValueError("eval.parts and eval.batch_size must be >= 1, eval.bootstrap >= 0")
        if not self.horizons or list(self.horizons) != sorted(set(self.horizons)):
            raise ValueError("eval.horizons must be distinct, ascending months")
        if min(self.horizons) <= 0 or self.min_center_patients < 1:
            raise ValueError("eval.horizons must be > 0 and eval.min_center_patients >= 1")


@dataclass(frozen=True)
class ChaosConfig:
    """Fault injection for tests and failure drills: off unless fail_at_step >= 0."""

    fail_at_step: int = -1  # global optimizer step of the failure; -1 = never
    fail_rank: int = 0  # which rank fails
    fail_mode: str = "raise"  # "raise" an exception or "sigkill" the worker process
    fail_point: str = "step"  # "step": right after that step; "validation": in the next
    # validation; "after_report": right after the next report (and its checkpoint)

    def __post_init__(self) -> None:
        choice("chaos.fail_mode", self.fail_mode, ("raise", "sigkill"))
        choice("chaos.fail_point", self.fail_point, ("step", "validation", "after_report"))


@dataclass(frozen=True)
class Config:
    """Everything a run needs; each builder gets only its own block."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig, metadata=RESUMABLE)
    synth: SynthConfig = field(default_factory=SynthConfig, metadata=RESUMABLE)
    prep: PrepConfig = field(default_factory=PrepConfig, metadata=RESUMABLE)
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=RESUMABLE)
    chaos: ChaosConfig = field(default_factory=ChaosConfig, metadata=RESUMABLE)

    def __post_init__(self) -> None:
        if self.optim.early_stopping_patience and self.run.metric == "epoch":
            raise ValueError(
                "optim.early_stopping_patience needs run.metric to be a validation metric "
                "(e.g. val/cindex_os); with run.metric=epoch the last epoch is kept"
            )


def resumable_fields() -> tuple[str, ...]:
    """Dotted names (a block name covers its fields) that may change on resume."""
    out = []
    for block in fields(Config):
        if block.metadata.get("resumable"):
            out.append(block.name)
            continue
        cls = getattr(Config(), block.name)
        out += [f"{block.name}.{f.name}" for f in fields(cls) if f.metadata.get("resumable")]
    return tuple(out)


def preset_path(name_or_path: str) -> Path:
    """A preset name (debug, default, paper) or a path to a YAML file."""
    candidate = PRESETS_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
    raise ValueError(f"config {name_or_path!r} is neither a preset ({', '.join(names)}) nor a file")


def load_config(name_or_path: str = DEFAULT_PRESET, overrides: list[str] | None = None) -> Config:
    """YAML preset or file + overrides -> validated Config."""
    path = preset_path(name_or_path)
    data = yaml_value(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections")
    try:
        return from_dict(Config, apply_overrides(data, overrides or []))
    except (TypeError, ValueError) as exn:
        raise ValueError(f"{path.name}: {exn}") from exn


def dump_yaml(cfg: Config) -> str:
    """The full resolved config as YAML that load_config accepts unchanged."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def changes(base: Config, cfg: Config) -> dict[str, Any]:
    """The dotted fields where cfg differs from base (a preset), with cfg's values."""
    a, b = flatten(to_dict(base)), flatten(to_dict(cfg))
    return {key: value for key, value in b.items() if a.get(key) != value}


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """Set fields by dotted name ({"optim.lr": 3e-4, ...}, as Tune samples them) and
    revalidate; an unknown name fails, naming it."""
    data = to_dict(cfg)
    for dotted, value in values.items():
        keys = dotted.split(".")
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise ValueError(f"{dotted}: no config section {key!r}")
            node = node[key]
        if len(keys) < 2 or keys[-1] not in node:
            raise ValueError(f"{dotted}: no such config field")
        node[keys[-1]] = list(value) if isinstance(value, tuple) else value
    return from_dict(Config, data)
