"""Raw hospital export (docs/RAW_LAYOUT.md) -> validated PatientRecords + a defect report.

Every defect names the file (relative to DATA_ROOT), the patient and the field, and the
whole cohort is checked before anything is reported, so a data manager fixes an export in
one round instead of one error at a time. Cell contents are never echoed into messages
(they are patient data); the CSV line number locates the cell instead.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from mmdls_dist.data.defects import Defect, IngestReport, Mapper, serial_map
from mmdls_dist.data.images import check_chunk, list_images
from mmdls_dist.data.tables import clinical_rows, radiomics_rows


def _same_images(stacks: dict[str, list[str]]) -> list[Defect]:
    """Patients whose CT stacks are pixel for pixel the same (a copied or linked folder):
    every one of them is refused, naming the others, so neither lands in two splits."""
    out = []
    for pids in stacks.values():
        for pid in pids if len(pids) > 1 else ():
            others = ", ".join(p for p in pids if p != pid)
            out.append(
                Defect(f"images/{pid}/ct", pid, "ct", f"the same CT images as patient {others}")
            )
    return out


def read_cohort(
    root: str | Path,
    *,
    check_pixels: bool = True,
    mapper: Mapper = serial_map,
    chunk_size: int = 16,
    for_prediction: bool = False,
) -> IngestReport:
    """Read and validate a raw export. Patients with any defect are rejected (not kept).

    for_prediction: new patients: label columns and lung/ folders may be absent (their
    values are unknown / not stored); everything else is checked as for training.

    `mapper(fn, items)` runs the per-chunk pixel checks; the CLI passes a Ray-task mapper so
    a large cohort is checked in parallel, tests pass the serial default.
    """
    root = Path(root)
    report = IngestReport(root=str(root))
    if not root.is_dir():
        report.defects.append(Defect(".", None, "(folder)", f"DATA_ROOT {root} is not a folder"))
        return report
    records = clinical_rows(root, report, for_prediction)
    report.radiomics_names = radiomics_rows(root, records, report)
    list_images(root, records, report, for_prediction)
    if check_pixels:
        todo = [
            (r.patient_id, r.slice_files, r.lesion_annotated, r.lung_annotated)
            for r in records.values()
            if r.slice_files
        ]
        chunks = [(str(root), todo[i : i + chunk_size]) for i in range(0, len(todo), chunk_size)]
        stacks: dict[str, list[str]] = defaultdict(list)
        for chunk, results in zip(chunks, mapper(check_chunk, chunks), strict=True):
            for (pid, *_), (defects, size, digest) in zip(chunk[1], results, strict=True):
                report.defects.extend(defects)
                records[pid].image_size = size
                stacks[digest].append(pid)
        report.defects += _same_images(stacks)
    bad = {d.patient_id for d in report.defects if d.patient_id is not None}
    report.records = [r for pid, r in records.items() if pid not in bad]
    return report
