"""Raw WebDataset samples -> Batch: zero-copy views of the stored arrays, slice selection,
z-scored tables with missing flags, labels, and a resize when the model's image size
differs from the stored one. Pixels stay uint8 and masks bit-packed (see schema.Batch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from mmdls_dist.data.schema import (
    CLINICAL_COLUMNS,
    CLINICAL_FEATURES,
    ENDPOINTS,
    N_RADIOMICS,
    PET_FEATURES,
    ZSCORE_CLINICAL,
    ZSCORE_CLIP,
    Batch,
    before_zscore,
    unpack_masks,
)


def npy_view(data: bytes) -> np.ndarray:
    """Zero-copy ndarray over .npy bytes (np.load on a BytesIO would copy the payload)."""
    buf = memoryview(data)
    version = np.lib.format.read_magic(_Reader(buf))
    reader = _Reader(buf, 8)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(reader)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(reader)
    if fortran:
        raise ValueError("fortran-ordered arrays are not written by mmdls shards")
    return np.frombuffer(buf, dtype=dtype, offset=reader.pos).reshape(shape)


class _Reader:
    """The minimal file interface numpy's npy header parser needs, over a memoryview."""

    def __init__(self, buf: memoryview, pos: int = 0):
        self.buf, self.pos = buf, pos

    def read(self, n: int) -> bytes:
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out


def select_slices(n_slices: int, max_slices: int) -> np.ndarray:
    """Indices of the slices kept: all if they fit, else max_slices evenly spaced over the
    whole stack (independent of masks, so inference needs none)."""
    if n_slices <= max_slices:
        return np.arange(n_slices)
    return np.round(np.linspace(0, n_slices - 1, max_slices)).astype(np.int64)


def _values(metas: list[dict], group: str, names: Sequence[str]) -> np.ndarray:
    return np.array(
        [[np.nan if m[group][k] is None else m[group][k] for k in names] for m in metas],
        dtype=np.float64,
    )


def _zscore(x: np.ndarray, mean, std) -> np.ndarray:
    return np.clip((x - np.asarray(mean)) / np.asarray(std), -ZSCORE_CLIP, ZSCORE_CLIP)


def _finish(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Missing (NaN) -> 0 (the training mean after z-scoring) plus a True flag."""
    missing = np.isnan(x)
    return torch.from_numpy(np.where(missing, 0.0, x).astype(np.float32)), torch.from_numpy(missing)


def tabular(metas: list[dict], norm: dict) -> dict[str, torch.Tensor]:
    """Model-ready clinical [B,8], pet [B,5], radiomics [B,128] and their missing flags."""
    names = tuple(c.name for c in CLINICAL_COLUMNS)
    cols = dict(zip(names, _values(metas, "clinical", names).T, strict=True))
    feats = {}
    for name in ZSCORE_CLINICAL:
        stats = norm["clinical"][name]
        feats[name] = _zscore(before_zscore(name, cols[name]), stats["mean"], stats["std"])
    feats["sex"] = cols["sex"]
    status = cols["smoking_status"]
    for code, name in enumerate(("smoking_never", "smoking_former", "smoking_current")):
        feats[name] = np.where(np.isnan(status), np.nan, (status == code).astype(float))
    clinical, clinical_missing = _finish(np.stack([feats[k] for k in CLINICAL_FEATURES], axis=1))

    pet_raw = np.stack(
        [
            before_zscore(k, v)
            for k, v in zip(PET_FEATURES, _values(metas, "pet", PET_FEATURES).T, strict=True)
        ],
        axis=1,
    )
    pet_mean = [norm["pet"][k]["mean"] for k in PET_FEATURES]
    pet_std = [norm["pet"][k]["std"] for k in PET_FEATURES]
    pet, pet_missing = _finish(_zscore(pet_raw, pet_mean, pet_std))

    rad = np.array(
        [[np.nan if v is None else v for v in m["radiomics"]] for m in metas], dtype=np.float64
    ).reshape(len(metas), N_RADIOMICS)
    rad_norm = norm["radiomics"]
    radiomics, radiomics_missing = _finish(_zscore(rad, rad_norm["mean"], rad_norm["std"]))
    return {
        "clinical": clinical,
        "clinical_missing": clinical_missing,
        "pet": pet,
        "pet_missing": pet_missing,
        "radiomics": radiomics,
        "radiomics_missing": radiomics_missing,
    }


def labels(metas: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for name, key in (("histology", "histology"), ("stage", "tnm_stage")):
        out[name] = torch.tensor(
            [-1 if m["labels"][key] is None else int(m["labels"][key]) for m in metas],
            dtype=torch.int64,
        )
    for endpoint in ENDPOINTS:
        time = [m["labels"][f"{endpoint}_time"] for m in metas]
        event = [m["labels"][f"{endpoint}_event"] for m in metas]
        known = [t is not None and e is not None for t, e in zip(time, event, strict=True)]
        out[f"{endpoint}_time"] = torch.tensor(
            [t if k else float("nan") for t, k in zip(time, known, strict=True)],
            dtype=torch.float32,
        )
        out[f"{endpoint}_event"] = torch.tensor(
            [bool(e) if k else False for e, k in zip(event, known, strict=True)]
        )
        out[f"{endpoint}_known"] = torch.tensor(known)
    return out


def collate(samples: list[dict], norm: dict, max_slices: int, image_size: int) -> Batch:
    """WebDataset samples (with their checked, parsed "meta": loader.read_segments) ->
    Batch. Pixels are copied once, straight into the batch; masks stay bit-packed."""
    metas = [s["meta"] for s in samples]
    stored = metas[0]["image_size"]
    b = len(samples)
    packed_len = -(-stored * stored // 8)
    ct = np.zeros((b, max_slices, stored, stored), dtype=np.uint8)
    masks = np.zeros((b, 2, max_slices, packed_len), dtype=np.uint8)
    slice_mask = np.zeros((b, max_slices), dtype=bool)
    for i, sample in enumerate(samples):
        volume = npy_view(sample["ct.npy"])
        packed = npy_view(sample["masks.npy"])
        n = volume.shape[0]
        if n <= max_slices:  # the common case: plain slice copies, no gather
            ct[i, :n] = volume
            masks[i, :, :n] = packed
        else:
            idx = select_slices(n, max_slices)
            n = len(idx)
            ct[i] = volume[idx]
            masks[i] = packed[:, idx]
        slice_mask[i, :n] = True
    ct_t, masks_t = torch.from_numpy(ct), torch.from_numpy(masks)
    if image_size != stored:
        ct_t, masks_t = resize(ct_t, masks_t, image_size)
    return Batch(
        ct=ct_t,
        masks=masks_t,
        slice_mask=torch.from_numpy(slice_mask),
        lesion_annotated=torch.tensor([m["lesion_annotated"] for m in metas]),
        **tabular(metas, norm),
        **labels(metas),
        patient_id=[m["patient_id"] for m in metas],
        center=[m["center"] for m in metas],
    )


def resize(ct: torch.Tensor, masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize uint8 CT [B,S,H,W] (bilinear + antialias) and packed masks [B,2,S,P] (nearest)
    to size x size.

    Only runs when the configured image size differs from the shards' stored size; shard at
    the training size to keep this off the hot path.
    """
    b, s, h, w = ct.shape
    flat = ct.reshape(b * s, 1, h, w).float()
    ct_r = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True)
    ct_r = ct_r.round().clamp(0, 255).to(torch.uint8).reshape(b, s, size, size)
    full = unpack_masks(masks, (h, w)).reshape(b * 2 * s, 1, h, w).float()
    small = F.interpolate(full, size=(size, size), mode="nearest").to(torch.uint8)
    repacked = np.packbits(small.reshape(b, 2, s, size * size).numpy(), axis=-1)
    return ct_r, torch.from_numpy(repacked)
