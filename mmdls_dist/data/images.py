"""The cohort's images: images/<patient>/{ct,lung,lesion}/<slice>.png. The listing checks the
folder layout (which slices, which masks) without reading pixels; the pixel check decodes
every slice (mode, size, binary masks), chunk by chunk, so it can run as parallel tasks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from mmdls_dist.data.defects import Defect, IngestReport
from mmdls_dist.data.schema import PatientRecord

IMAGES = "images"


MASK_VALUES = (0, 255)


def _outside(path: Path, top: Path) -> bool:
    """Whether `path` resolves (through links) to somewhere outside the folder `top`."""
    return not path.resolve().is_relative_to(top)


OUTSIDE = "resolves outside DATA_ROOT (a link); an export's files must lie inside it"


def _png_names(folder: Path, rel: str, pid: str, field_name: str, defects: list[Defect], top: Path):
    """Sorted slice file names of one folder; non-PNG files and files resolving outside
    `top` (DATA_ROOT, resolved) are defects, dotfiles ignored."""
    names = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # .DS_Store and friends from the export machine, never slices
        if _outside(entry, top):
            defects.append(Defect(f"{rel}/{entry.name}", pid, field_name, OUTSIDE))
            continue
        if not entry.is_file() or entry.suffix.lower() != ".png":
            defects.append(Defect(f"{rel}/{entry.name}", pid, field_name, "not a .png slice file"))
            continue
        names.append(entry.name)
    return names


def _compare_names(
    ct: list[str], other: list[str], rel: str, pid: str, field_name: str
) -> list[Defect]:
    out = []
    missing = sorted(set(ct) - set(other))
    extra = sorted(set(other) - set(ct))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        out.append(
            Defect(rel, pid, field_name, f"{len(missing)} slice file(s) of ct/ missing: {shown}")
        )
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        out.append(Defect(rel, pid, field_name, f"{len(extra)} file(s) with no ct/ slice: {shown}"))
    return out


def list_images(
    root: Path, records: dict[str, PatientRecord], report: IngestReport, for_prediction: bool
) -> None:
    """Fill slice_files / lesion_annotated from the folder layout (no pixels read).
    for_prediction: the lung/ folder may be absent (CT alone is enough to predict)."""
    defects = report.defects
    images = root / IMAGES
    top = root.resolve()
    folders = {p.name for p in images.iterdir() if p.is_dir()} if images.is_dir() else set()
    for orphan in sorted(folders - set(records) - report.clinical_ids):
        defects.append(
            Defect(
                f"{IMAGES}/{orphan}", orphan, "patient_id", "image folder has no clinical.csv row"
            )
        )
    for pid, record in records.items():
        base = f"{IMAGES}/{pid}"
        folder = images / pid
        kinds = ("", "ct", "lung", "lesion")
        links = [k for k in kinds if (folder / k).exists() and _outside(folder / k, top)]
        if links:
            where = f"{base}/{links[0]}".rstrip("/")
            defects.append(Defect(where, pid, links[0] or "patient_id", OUTSIDE))
            continue
        ct_dir = folder / "ct"
        if not ct_dir.is_dir():
            defects.append(Defect(f"{base}/ct", pid, "ct", "CT folder is missing"))
            continue
        ct = _png_names(ct_dir, f"{base}/ct", pid, "ct", defects, top)
        if not ct:
            defects.append(Defect(f"{base}/ct", pid, "ct", "no CT slices"))
            continue
        record.slice_files = ct
        lung_dir = images / pid / "lung"
        if not lung_dir.is_dir() and for_prediction:
            record.lung_annotated = False
        elif not lung_dir.is_dir():
            defects.append(Defect(f"{base}/lung", pid, "lung", "lung mask folder is missing"))
        else:
            lung = _png_names(lung_dir, f"{base}/lung", pid, "lung", defects, top)
            defects.extend(_compare_names(ct, lung, f"{base}/lung", pid, "lung"))
        lesion_dir = images / pid / "lesion"
        if lesion_dir.is_dir():
            record.lesion_annotated = True
            lesion = _png_names(lesion_dir, f"{base}/lesion", pid, "lesion", defects, top)
            defects.extend(_compare_names(ct, lesion, f"{base}/lesion", pid, "lesion"))


def open_slice(path: Path) -> Image.Image:
    """Open and fully decode one PNG (PIL is lazy; load() surfaces truncation errors)."""
    image = Image.open(path)
    image.load()
    return image


def check_patient_images(
    root: str, pid: str, slice_files: list[str], annotated: bool, lung: bool = True
) -> tuple[list[Defect], tuple[int, int] | None, str]:
    """Decode every slice of one patient -> (defects, (H, W) of its slices or None, a
    digest of its CT pixels: two patients with the same one are one patient twice)."""
    defects: list[Defect] = []
    size: tuple[int, int] | None = None
    digest = hashlib.sha256()
    folders = ("ct",) + (("lung",) if lung else ()) + (("lesion",) if annotated else ())
    base = Path(root) / IMAGES / pid
    for name in slice_files:
        ct_size = None
        for kind in folders:
            rel = f"{IMAGES}/{pid}/{kind}/{name}"
            path = base / kind / name
            if not path.is_file():
                continue  # reported by the listing step
            try:
                image = open_slice(path)
            except Exception as exn:  # PIL raises many types for broken files
                defects.append(Defect(rel, pid, kind, f"unreadable PNG ({type(exn).__name__})"))
                continue
            hw = (image.height, image.width)
            if kind == "ct":
                if image.mode != "L":
                    defects.append(
                        Defect(rel, pid, kind, f"expected 8-bit grayscale, got mode {image.mode}")
                    )
                ct_size = hw
                digest.update(f"{hw}{image.mode}".encode() + image.tobytes())
                if size is None:
                    size = hw
                elif hw != size:
                    defects.append(
                        Defect(rel, pid, kind, f"slice size {hw} differs from the first {size}")
                    )
                continue
            if ct_size is not None and hw != ct_size:
                defects.append(
                    Defect(rel, pid, kind, f"mask size {hw} differs from its CT slice {ct_size}")
                )
            if image.mode not in ("L", "1"):
                defects.append(
                    Defect(rel, pid, kind, f"expected a grayscale mask, got mode {image.mode}")
                )
                continue
            pixels = np.asarray(image.convert("L"))
            if np.any((pixels != MASK_VALUES[0]) & (pixels != MASK_VALUES[1])):
                hint = "; it looks 0/1-coded" if pixels.max() == 1 else ""
                defects.append(
                    Defect(rel, pid, kind, f"mask is not binary (values other than 0/255{hint})")
                )
    return defects, size, digest.hexdigest()


def check_chunk(args: tuple[str, list[tuple[str, list[str], bool, bool]]]):
    root, patients = args
    return [
        check_patient_images(root, pid, files, lesion, lung)
        for pid, files, lesion, lung in patients
    ]
