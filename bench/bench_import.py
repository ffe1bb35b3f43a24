"""DICOM import throughput: CT slices read per second per core.

    python bench/bench_import.py [--patients 4 --slices 120 --size 512]

Writes a synthetic cohort of full-size chest phantoms (the tests' phantom, tests/
dicom_phantom.py: 512 x 512 CT slices at 0.7 mm, 2.5 mm apart, an RTSTRUCT with the lesion
and both lungs) and times `mmdls import-dicom` on it with the serial executor (one core),
with the shipped Lung1 mapping (0.8 mm, 512 px, the lesion's slices) and with every slice
written (slices: all). Under the CLI's default Ray executor the patients run in parallel,
one task each, so a cluster scales this by its cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_phantom import Phantom, phantom_rois, write_ct, write_rtstruct  # noqa: E402

from mmdls_dist.data.imports.importer import run_import  # noqa: E402
from mmdls_dist.data.imports.mapping import load_mapping  # noqa: E402
from mmdls_dist.parallel import serial_mapper  # noqa: E402

HEADER = "PatientID,age,gender,Histology,Overall.Stage,Survival.time,deadstatus.event\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-import-"))
    spacing = 0.7
    half = (args.size - 1) * spacing / 2
    g = Phantom(
        rows=args.size,
        cols=args.size,
        slices=args.slices,
        dr=spacing,
        dc=spacing,
        x0=-half,
        y0=-half,
        z0=-(args.slices - 1) * 2.5 / 2,
        scale=8.5,
        lesion_center=(-75.0, -10.0, 0.0),
        lesion_radii=(18.0, 14.0, 15.0),
    )
    rows = []
    started = time.perf_counter()
    for i in range(args.patients):
        pid = f"B-{i:03d}"
        ct = write_ct(work / "dicom" / pid / "CT", g, pid, seed=i)
        write_rtstruct(work / "dicom" / pid / "RS" / "rs.dcm", ct, pid, phantom_rois(g))
        rows.append(f"{pid},60,male,adenocarcinoma,IIIa,500,1")
    (work / "clinical.csv").write_text(HEADER + "\n".join(rows) + "\n")
    print(
        f"wrote {args.patients} patients x {args.slices} slices of {args.size}^2 in "
        f"{time.perf_counter() - started:.1f} s ({work})"
    )
    total = args.patients * args.slices
    for label, changes in (
        ("lung1 mapping (lesion slices)", {}),
        ("every slice", {"slices": "all"}),
    ):
        mapping = dataclasses.replace(load_mapping("lung1"), **changes)
        out = work / f"out-{len(changes)}"
        t0 = time.perf_counter()
        report = run_import(
            "dicom", work / "dicom", out, work / "clinical.csv", mapping, serial_mapper("")
        )
        seconds = time.perf_counter() - t0
        assert report.ok, report.summary()
        written = sum(1 for _ in (out / "images").rglob("ct/*.png"))
        print(
            f"{label:32s} {seconds:6.1f} s  {total / seconds:6.1f} CT slices read/s/core, "
            f"{written} slices written"
        )


if __name__ == "__main__":
    main()
