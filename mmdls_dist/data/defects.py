"""What an import found: each defect (file, patient, field, message: never a cell's value)
and the cohort's report (kept records, defects, notes)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mmdls_dist.data.schema import PatientRecord

Mapper = Callable[[Callable, Sequence], list]

# What a defect of a whole file costs (the file is not read at all).
CONSEQUENCE = {
    "clinical.csv": "no patient can be read",
    "radiomics.csv": "radiomics are missing for every patient",
}


@dataclass(frozen=True)
class Defect:
    """One violation of the raw-layout contract."""

    file: str  # relative to DATA_ROOT
    patient_id: str | None  # None for defects of the whole file (e.g. a missing column)
    field: str
    message: str

    def __str__(self) -> str:
        if self.patient_id is None:
            cost = CONSEQUENCE.get(self.file, "the file is not read")
            return f"{self.file}: (file): {self.field}: {self.message}; so {cost}"
        return f"{self.file}: patient {self.patient_id}: {self.field}: {self.message}"


@dataclass
class IngestReport:
    """What an import found: the kept records, every defect, and notes that are not errors."""

    root: str
    n_read: int = 0
    records: list[PatientRecord] = field(default_factory=list)
    defects: list[Defect] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    radiomics_names: list[str] = field(default_factory=list)  # radiomics.csv order, kept
    # Every usable id clinical.csv names, kept or not (a duplicate, a broken row): other
    # files' rows and folders of these patients are not reported as "no clinical.csv row".
    clinical_ids: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.defects

    @property
    def file_defects(self) -> list[Defect]:
        """Defects of whole files (patient_id None): they reject nobody, so sharding with
        --allow-rejects records them in the manifest's source.defects."""
        return [d for d in self.defects if d.patient_id is None]

    @property
    def rejected(self) -> dict[str, list[Defect]]:
        """patient_id -> its defects, for every patient that is not kept."""
        out: dict[str, list[Defect]] = defaultdict(list)
        for d in self.defects:
            if d.patient_id is not None:
                out[d.patient_id].append(d)
        return dict(out)

    def summary(self, max_defects: int = 200) -> str:
        lines = [
            f"import of {self.root}: {self.n_read} patients read, {len(self.records)} kept, "
            f"{len(self.rejected)} rejected, {len(self.defects)} defects"
        ]
        lines += [f"FILE DEFECT: {d}" for d in self.file_defects]
        reasons = Counter(d.field for d in self.defects)
        if reasons:
            lines.append(
                "defects by field: " + ", ".join(f"{k} x{n}" for k, n in reasons.most_common())
            )
        for d in self.defects[:max_defects]:
            lines.append(f"  {d}")
        if len(self.defects) > max_defects:
            lines.append(f"  ... and {len(self.defects) - max_defects} more (see the JSON report)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "n_read": self.n_read,
            "n_kept": len(self.records),
            "n_rejected": len(self.rejected),
            "kept": [r.patient_id for r in self.records],
            "rejected": {pid: [str(d) for d in ds] for pid, ds in self.rejected.items()},
            "defects": [vars(d) for d in self.defects],
            "notes": self.notes,
        }


class CohortError(ValueError):
    """Raised when a cohort has defects and the caller asked for a clean import."""

    def __init__(self, report: IngestReport):
        super().__init__(report.summary())
        self.report = report


def serial_map(fn: Callable, items: Sequence) -> list:
    return [fn(item) for item in items]
