"""NIfTI volumes (nibabel) -> a Volume in DICOM's patient system and slice layout.

nibabel reorients the image to its closest canonical (RAS+) axes; the voxels are then laid
out as a DICOM axial series is (columns towards the patient's left, rows towards
posterior, slices from feet to head) and the affine becomes the same LPS geometry, so one
volume gives the same raw layout whether it came as DICOM or as NIfTI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmdls_dist.data.defects import Defect
from mmdls_dist.data.imports.dicom import PatientDefectsError
from mmdls_dist.data.imports.volume import Volume

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _aligned(v: np.ndarray) -> bool:
    return bool(np.max(np.abs(v)) > 1 - 1e-3)


def nifti_volume(path: Path, rel: str, pid: str) -> Volume:
    """A 3-D NIfTI file -> Volume (float32 voxels)."""
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exn:  # nibabel raises several types for a damaged file
        raise PatientDefectsError(
            [Defect(rel, pid, "(file)", f"unreadable NIfTI ({type(exn).__name__})")]
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise PatientDefectsError([Defect(rel, pid, "dim", f"a {data.ndim}-D image, not 3-D")])
    affine = image.affine
    nx, ny, nz = data.shape
    step_i, step_j, step_k = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    row_dir = RAS_TO_LPS @ -step_i  # increasing column index = decreasing i
    col_dir = RAS_TO_LPS @ -step_j  # increasing row index = decreasing j
    spacing = (float(np.linalg.norm(step_j)), float(np.linalg.norm(step_i)))
    row_dir, col_dir = row_dir / spacing[1], col_dir / spacing[0]
    if not (_aligned(row_dir) and _aligned(col_dir) and _aligned(step_k / np.linalg.norm(step_k))):
        raise PatientDefectsError(
            [Defect(rel, pid, "affine", "oblique orientation (not axis-aligned)")]
        )
    corner = np.array([nx - 1, ny - 1, 0, 1.0])
    origins = np.array(
        [RAS_TO_LPS @ (affine @ (corner + np.array([0, 0, k, 0])))[:3] for k in range(nz)]
    )
    voxels = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))
    return Volume(voxels, origins, row_dir, col_dir, spacing)


def same_grid(a: Volume, b: Volume) -> bool:
    return a.voxels.shape == b.voxels.shape and np.allclose(a.origin, b.origin, atol=1e-3)
