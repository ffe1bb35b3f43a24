"""Typed configuration blocks. Each field has one doc line (unit, valid range) and is
validated on creation; unknown keys and wrong types fail loudly, naming the field.

Issue #4 adds the model / optimisation / run blocks and YAML presets on the same machinery.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any


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
    """Sizes and switches of the MM-DLS network; every field is searchable by Tune."""

    widths: tuple[int, ...] = (16, 32, 64, 128)  # ResNet encoder channels per stage (4 stages)
    blocks_per_stage: int = 1  # residual blocks per encoder stage, 1..4
    decoder_width: int = 32  # channels of the lung / lesion decoders, >= 8
    cross_attention_heads: int = 4  # lesion->lung cross-attention heads (divides decoder_width)
    embed_dim: int = 64  # slice-token and patient-vector width, >= 8
    fusion_heads: int = 4  # attention heads over slices / modalities (divides embed_dim)
    fusion_layers: int = 1  # transformer layers over slices, 0..4
    tabular_hidden: int = 64  # hidden width of the clinical / PET / radiomics MLPs
    dropout: float = 0.1  # dropout in fusion and heads, [0, 0.9)
    encoder_input: str = "features"  # "features": mask-weighted pooling of segmentor maps;
    # "pixels": re-encode the masked CT with conv encoders (the original's LesionEncoder)
    pixel_encoder_width: int = 16  # channels of the "pixels" encoders, >= 4
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
        if self.tabular_hidden < 4 or self.pixel_encoder_width < 4:
            raise ValueError("model.tabular_hidden and model.pixel_encoder_width must be >= 4")
        if not 0.0 <= self.dropout < 0.9:
            raise ValueError("model.dropout must be in [0, 0.9)")
        _choice("model.encoder_input", self.encoder_input, ("features", "pixels"))
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
