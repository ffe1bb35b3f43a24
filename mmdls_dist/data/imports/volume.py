"""A 3-D image in patient coordinates and what the import does with it: the geometry that
maps voxels to millimetres (DICOM's patient system, LPS), the slice-position checks, the
in-plane resampling to a fixed spacing and square size, the CT window, the threshold lung
mask, and the choice of slices. Shared by the DICOM and NIfTI importers, so both produce
the same raw layout from the same volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from mmdls_dist.data.imports.mapping import ImportMapping

AIR_HU = -1024.0  # what padding outside the scanned field of view is filled with
GAP_TOLERANCE = 0.1  # a slice step off the median by more than this fraction is a gap


@dataclass
class Volume:
    """voxels [S,R,C] (slices ordered along the slice normal, rows, columns) and where they
    are: the position of each slice's first pixel, the directions of increasing column and
    row index (DICOM ImageOrientationPatient), the spacing between rows and between
    columns (DICOM PixelSpacing order)."""

    voxels: np.ndarray
    origin: np.ndarray  # [S,3] mm
    row_dir: np.ndarray  # [3] unit vector along a row (increasing column index)
    col_dir: np.ndarray  # [3] unit vector down a column (increasing row index)
    spacing: tuple[float, float]  # (between rows, between columns) mm

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    @property
    def positions(self) -> np.ndarray:
        """[S] slice positions along the normal, mm (ascending)."""
        return self.origin @ self.normal

    @property
    def slice_step(self) -> float:
        steps = np.diff(self.positions)
        return float(np.median(steps)) if len(steps) else 1.0

    def pixel_of(self, points: np.ndarray) -> np.ndarray:
        """Patient points [n,3] (mm) -> [n,3] (slice index, row, column) as floats; the
        slice index is where the point's position along the normal falls."""
        along = points @ self.normal
        k = np.interp(along, self.positions, np.arange(len(self.positions)))
        rel = points - self.origin[np.clip(np.round(k).astype(int), 0, len(self.origin) - 1)]
        rows = rel @ self.col_dir / self.spacing[0]
        cols = rel @ self.row_dir / self.spacing[1]
        return np.stack([k, rows, cols], axis=1)

    def points_of(self, k: int) -> np.ndarray:
        """[R,C,3] patient positions (mm) of slice k's pixel centres."""
        rows, cols = np.mgrid[0 : self.voxels.shape[1], 0 : self.voxels.shape[2]]
        return (
            self.origin[k]
            + rows[..., None] * self.spacing[0] * self.col_dir
            + cols[..., None] * self.spacing[1] * self.row_dir
        )


def axial_defect(vol: Volume) -> str | None:
    """Why a series cannot be read as axial slices, or None."""
    if abs(vol.normal[2]) < 1 - 1e-3:
        return "not an axial series (the slice normal is not head-feet)"
    return None


def canonical(vol: Volume, masks: dict[str, np.ndarray | None]):
    """An axial volume (and its masks) laid out as the raw layout expects whatever the
    scanner stored: columns towards the patient's left (+x), rows towards posterior (+y),
    slices from feet to head. -> (volume, masks), voxels transposed / flipped, geometry
    kept consistent."""
    voxels, origin = vol.voxels, vol.origin.copy()
    row_dir, col_dir, spacing = vol.row_dir.copy(), vol.col_dir.copy(), vol.spacing
    masks = dict(masks)

    def apply(fn):
        nonlocal voxels
        voxels = fn(voxels)
        for kind, mask in masks.items():
            if mask is not None:
                masks[kind] = fn(mask)

    if abs(row_dir[1]) > abs(row_dir[0]):  # rows run along y: swap the in-plane axes
        apply(lambda a: a.transpose(0, 2, 1))
        row_dir, col_dir, spacing = col_dir, row_dir, (spacing[1], spacing[0])
    if row_dir[0] < 0:  # columns run to the patient's right
        origin = origin + (voxels.shape[2] - 1) * spacing[1] * row_dir
        row_dir = -row_dir
        apply(lambda a: a[:, :, ::-1])
    if col_dir[1] < 0:  # rows run anterior
        origin = origin + (voxels.shape[1] - 1) * spacing[0] * col_dir
        col_dir = -col_dir
        apply(lambda a: a[:, ::-1, :])
    order = np.argsort(origin @ np.cross(row_dir, col_dir), kind="stable")  # feet to head
    origin = origin[order]
    apply(lambda a: a[order])
    out = Volume(np.ascontiguousarray(voxels), origin, row_dir, col_dir, spacing)
    return out, {k: None if v is None else np.ascontiguousarray(v) for k, v in masks.items()}


def sample_mask(mask: np.ndarray, source: Volume, target: Volume) -> np.ndarray:
    """A mask on `source`'s grid -> `target`'s grid, nearest voxel (e.g. the CT lesion
    contour onto the PET grid); target voxels outside the source volume are False."""
    out = np.zeros(target.voxels.shape, dtype=bool)
    positions = source.positions
    half = abs(source.slice_step) / 2
    for k in range(target.voxels.shape[0]):
        pix = source.pixel_of(target.points_of(k).reshape(-1, 3))
        along = target.points_of(k).reshape(-1, 3) @ source.normal
        idx = np.round(pix).astype(int)
        inside = (
            (along >= positions[0] - half)
            & (along <= positions[-1] + half)
            & (idx[:, 1] >= 0)
            & (idx[:, 1] < mask.shape[1])
            & (idx[:, 2] >= 0)
            & (idx[:, 2] < mask.shape[2])
        )
        values = np.zeros(len(idx), dtype=bool)
        values[inside] = mask[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
        out[k] = values.reshape(out.shape[1:])
    return out


def gap_message(positions: np.ndarray) -> str | None:
    """A description of uneven slice steps or a gap, or None when they are regular."""
    steps = np.diff(np.asarray(positions, dtype=float))
    if len(steps) == 0:
        return None
    if np.any(steps <= 1e-6):
        return "two slices at the same position"
    median = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - median)))
    if abs(steps[worst] - median) > GAP_TOLERANCE * median:
        return (
            f"slice step {steps[worst]:.2f} mm between slices {worst + 1} and {worst + 2}, "
            f"against {median:.2f} mm elsewhere (a gap or inconsistent spacing)"
        )
    return None


def resample_slice(
    image: np.ndarray, spacing: tuple[float, float], m: ImportMapping, nearest: bool
) -> np.ndarray:
    """One slice [R,C] -> [size,size] at m.spacing_mm: resized (bilinear for CT, nearest for
    masks), then centre-padded (CT with air) or centre-cropped to a square."""
    height = max(1, round(image.shape[0] * spacing[0] / m.spacing_mm))
    width = max(1, round(image.shape[1] * spacing[1] / m.spacing_mm))
    if nearest:
        resized = Image.fromarray(image.astype(np.uint8)).resize((width, height), Image.NEAREST)
        fill = 0
    else:
        resized = Image.fromarray(image.astype(np.float32), mode="F").resize(
            (width, height), Image.BILINEAR
        )
        fill = AIR_HU
    array = np.asarray(resized)
    out = np.full((m.size, m.size), fill, dtype=array.dtype)
    src_r, dst_r = _centre(height, m.size)
    src_c, dst_c = _centre(width, m.size)
    out[dst_r, dst_c] = array[src_r, src_c]
    return out


def _centre(n: int, size: int) -> tuple[slice, slice]:
    """Source and destination ranges that centre n pixels in size (pad or crop)."""
    if n >= size:
        start = (n - size) // 2
        return slice(start, start + size), slice(0, size)
    start = (size - n) // 2
    return slice(0, n), slice(start, start + n)


def window(hu: np.ndarray, m: ImportMapping) -> np.ndarray:
    """HU -> uint8 through the mapping's window (level / width)."""
    low = m.window_level - m.window_width / 2
    scaled = (hu - low) / m.window_width * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def threshold_lungs(hu: np.ndarray) -> np.ndarray:
    """A lung mask where no lung ROI exists, per slice: air (HU < -400) inside the body
    (the largest component above -500 HU, holes filled), minus air that touches the image
    border, minus specks under 0.1 % of the slice. It includes the trachea and main
    bronchi, which a drawn lung ROI leaves out; it is a fallback, said in the sidecar."""
    out = np.zeros(hu.shape, dtype=bool)
    for k, image in enumerate(hu):
        labels, n = ndimage.label(image > -500)
        if n == 0:
            continue
        sizes = ndimage.sum(np.ones_like(image), labels, index=range(1, n + 1))
        body = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
        air, n_air = ndimage.label((image < -400) & body)
        keep = np.zeros(n_air + 1, dtype=bool)
        if n_air:
            areas = ndimage.sum(np.ones_like(image), air, index=range(1, n_air + 1))
            keep[1:] = areas >= 0.001 * image.size
            border = np.unique(np.concatenate([air[0], air[-1], air[:, 0], air[:, -1]]))
            keep[border] = False
        out[k] = keep[air]
    return out


def chosen_slices(
    n: int, lesion: np.ndarray | None, lung: np.ndarray | None, m: ImportMapping
) -> np.ndarray:
    """Indices of the slices to write: the extent of the lesion (or of the lungs) plus
    m.slice_margin on each side, or every slice (m.slices, and when the chosen mask is
    empty or absent)."""
    masks = {"lesion": lesion, "lung": lung}
    if m.slices == "lesion" and lesion is None:
        masks["lesion"] = lung  # a CT-only patient: the lungs' extent instead
    mask = masks.get(m.slices)
    if mask is None or not mask.any():
        return np.arange(n)
    present = np.flatnonzero(mask.reshape(n, -1).any(axis=1))
    start = max(0, int(present[0]) - m.slice_margin)
    stop = min(n, int(present[-1]) + m.slice_margin + 1)
    return np.arange(start, stop)
