"""Typed configuration. Each field has one doc line (unit, valid range) and is validated on
creation; unknown keys and wrong types fail loudly, naming the field.

YAML presets live in mmdls_dist/configs/ (debug, default, paper); `load_config(preset,
overrides)` applies repeated `section.key=value` overrides (values parsed as YAML). What
Ray and Tune carry is `to_dict(cfg)`; workers rebuild the Config with `from_dict`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESETS_DIR = Path(__file__).parent / "configs"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 3e-4 as a float (YAML 1.1 insists on 3.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _check_type(path: str, value: Any, hint: Any) -> Any:
    """Coerce int->float where a float is wanted; otherwise the type must match exactly."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(path, value, arg)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{path}: expected {hint}, got {type(value).__name__}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_check_type(f"{path}[{i}]", v, item) for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise TypeError(f"{path}: expected int, got bool")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise TypeError(f"{path}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build a config dataclass from a plain dict; unknown keys are an error."""
    if not isinstance(data, dict):
        raise TypeError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{path}." if path else ""
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        field_path = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, field_path)
        else:
            kwargs[name] = _check_type(field_path, value, hint)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """Plain, JSON/YAML-safe dict (tuples become lists); from_dict(type(c), to_dict(c)) == c."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def _choice(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{path} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how each training worker streams them."""

    shards: str = ""  # folder or object-store prefix (s3://, gs://) holding manifest.json
    batch_size: int = 4  # patients per rank per step, >= 1
    max_slices: int = 30  # slices per patient fed to the model (evenly spaced; padded), >= 1
    image_size: int = 0  # pixels per side fed to the model; 0 = as stored in the shards
    num_workers: int = 2  # DataLoader worker processes per rank, >= 0
    prefetch_factor: int = 2  # batches prefetched per DataLoader worker, >= 1
    pin_memory: bool = False  # page-locked host batches (set True on GPU)
    shuffle_buffer: int = 16  # patients held in each stream's shuffle buffer; <= 1 = off
    steps_per_epoch: int | None = None  # batches per rank per epoch; None = one pass
    verify: str = "full"  # "full": sha256 of every shard before use; "size": sizes only
    seed: int = 0  # shard order / shuffle seed (combined with epoch, rank, worker)

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
        _choice("data.verify", self.verify, ("full", "size"))


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
    lesion_reader: int = 48  # side (pixels) of the patient-level full-resolution lesion crop
    # read by a small CNN into its own fusion token (model/reader.py); 0 = off, else >= 8
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
    use_imaging: bool = True  # CT branch (segmentor + encoders + slice fusion)
    use_radiomics: bool = True
    use_pet: bool = True
    use_clinical: bool = True

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
        if self.radiomics_rank < 0:
            raise ValueError("model.radiomics_rank must be >= 0")
        if self.tabular_hidden < 4 or self.reader_width < 4:
            raise ValueError("model.tabular_hidden and model.reader_width must be >= 4")
        if not 0.0 <= self.dropout < 0.9:
            raise ValueError("model.dropout must be in [0, 0.9)")
        _choice("model.patient_fusion", self.patient_fusion, ("attention", "concat"))
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
        _choice("loss.weighting", self.weighting, ("fixed", "uncertainty"))
        _choice("loss.cox_ties", self.cox_ties, ("efron", "breslow"))
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

    epochs: int = 10  # training epochs, >= 1
    lr: float = 1e-3  # AdamW peak learning rate, > 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay, >= 0
    warmup_epochs: float = 1.0  # linear warm-up length in epochs, >= 0; then cosine decay
    min_lr_ratio: float = 0.05  # cosine floor as a fraction of lr, [0, 1]
    grad_accum: int = 1  # micro-batches per optimizer step (DDP syncs on the last), >= 1
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    precision: str = "auto"  # "auto" (bf16 on GPUs with it, else fp16 + GradScaler; fp32 on
    # CPU), "fp32", "bf16" or "fp16"
    gt_mask_warmup_epochs: int = 2  # epochs blending ground-truth masks into the encoders'
    # views, weight decaying linearly from 1 to 0; 0 = predicted masks from the start
    early_stopping_patience: int = 0  # epochs without improvement of run.metric; 0 = off

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.grad_accum < 1:
            raise ValueError("optim.epochs and optim.grad_accum must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0 or self.grad_clip < 0:
            raise ValueError("optim.lr must be > 0; weight_decay, warmup_epochs, grad_clip >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("optim.min_lr_ratio must be in [0, 1]")
        _choice("optim.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        if self.gt_mask_warmup_epochs < 0 or self.early_stopping_patience < 0:
            raise ValueError("optim.gt_mask_warmup_epochs and early_stopping_patience >= 0")


@dataclass(frozen=True)
class RunConfig:
    """Where a run lives and what resources it takes (Ray Train's scaling and run config)."""

    name: str = "mmdls"  # run name; starting the same name again resumes it
    storage_path: str = "mmdls-work/runs"  # local folder or s3:// / gs:// URI
    num_workers: int = 2  # DDP ranks (Ray Train workers), >= 1
    use_gpu: bool = False  # one GPU per worker when True
    cpus_per_worker: float = 1.0  # CPUs reserved per worker, > 0
    max_failures: int = 2  # worker failures survived by resuming from the last checkpoint
    checkpoints_to_keep: int = 3  # newest + best by run.metric are kept; 0 = keep all
    metric: str = "val/cindex_os"  # validation metric for best checkpoint / early stopping
    mode: str = "max"  # "max" or "min" for run.metric
    seed: int = 0  # model init and dropout seed (ranks add their rank)
    tensorboard_dir: str = ""  # "" = <storage_path>/<name>/tensorboard (local storage only)
    overlays: int = 4  # segmentation overlays logged to TensorBoard per epoch, >= 0

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError("run.name must be non-empty and contain no '/'")
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ValueError("run.num_workers must be >= 1 and run.cpus_per_worker > 0")
        if self.max_failures < 0 or self.checkpoints_to_keep < 0 or self.overlays < 0:
            raise ValueError("run.max_failures, checkpoints_to_keep and overlays must be >= 0")
        _choice("run.mode", self.mode, ("max", "min"))


@dataclass(frozen=True)
class PrepConfig:
    """The embedded default's data: a synthetic cohort, made and sharded when no data is given."""

    patients: int = 240  # synthetic cohort size, >= 20
    centers: int = 3  # synthetic centers, 1..4
    synth_image_size: int = 64  # base slice size of the synthetic PNGs
    min_slices: int = 8  # synthetic slices per patient
    max_slices: int = 16
    shard_image_size: int = 64  # stored slice size in the shards
    val_fraction: float = 0.2
    test_fraction: float = 0.1
    external_centers: tuple[str, ...] = ()  # centers held out as the external split
    seed: int = 0  # cohort and split seed

    def __post_init__(self) -> None:
        if self.patients < 20:
            raise ValueError("prep.patients must be >= 20")


@dataclass(frozen=True)
class ChaosConfig:
    """Fault injection for tests and failure drills: off unless fail_at_step >= 0."""

    fail_at_step: int = -1  # global optimizer step at which to fail once; -1 = never
    fail_rank: int = 0  # which rank fails
    fail_mode: str = "raise"  # "raise" an exception or "sigkill" the worker process

    def __post_init__(self) -> None:
        _choice("chaos.fail_mode", self.fail_mode, ("raise", "sigkill"))


@dataclass(frozen=True)
class Config:
    """Everything a run needs; each builder gets only its own block."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)


def parse_override(text: str) -> tuple[list[str], Any]:
    """ "section.key=value" -> (["section", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form section.key=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ValueError(f"override {text!r}: the key must be section.key (e.g. optim.lr)")
    return keys, _yaml(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply overrides to a nested dict copy; unknown sections/keys are caught by from_dict."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return out


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


def load_config(name_or_path: str = "default", overrides: list[str] | None = None) -> Config:
    """YAML preset or file + overrides -> validated Config."""
    path = preset_path(name_or_path)
    data = _yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections")
    try:
        return from_dict(Config, apply_overrides(data, overrides or []))
    except (TypeError, ValueError) as exn:
        raise ValueError(f"{path.name}: {exn}") from exn


def dump_yaml(cfg: Config) -> str:
    """The full resolved config as YAML that load_config accepts unchanged."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


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
