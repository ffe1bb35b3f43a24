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
    """Plain, JSON/YAML-safe dict; from_dict(type(c), to_dict(c)) == c."""
    return dataclasses.asdict(config)


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
        if self.verify not in ("full", "size"):
            raise ValueError("data.verify must be 'full' or 'size'")
