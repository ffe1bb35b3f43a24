"""Loader throughput: shards -> Batch vs a per-patient PNG-folder Dataset, per CPU core.

    python bench/bench_loader.py [--patients 48] [--repeats 3] [--out bench-out/loader]

Both readers run in this one process on one core (torch/BLAS threads = 1, no DataLoader
workers), over the same synthetic cohort at paper resolution (224 x 224, 30 slices, CT +
lung + lesion masks), with a warm page cache. The PNG-folder reader does what the original
MM-DLS code does: open and decode every slice file, convert to float, stack. The shard
loader hands over uint8 CT and bit-packed masks (the model converts on the device); a third
figure shows the shard loader with that conversion done on the CPU as well. Prints
patients/s/core, ratios, and bytes per patient on disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmdls_dist.config import (  # noqa: E402
    DataConfig,  # noqa: E402
    PrepConfig,
    SynthConfig,
)
from mmdls_dist.data.ingest import read_cohort  # noqa: E402
from mmdls_dist.data.loader import make_loader  # noqa: E402
from mmdls_dist.data.shards import build_shards, load_manifest  # noqa: E402
from mmdls_dist.data.synth import generate  # noqa: E402

SIZE, SLICES, BATCH = 224, 30, 4


class PngFolderDataset(torch.utils.data.Dataset):
    """The baseline: one patient = decode every CT / lung / lesion PNG, float32 in [0, 1]."""

    def __init__(self, root: Path, patient_ids: list[str]):
        self.root, self.ids = root, patient_ids

    def __len__(self) -> int:
        return len(self.ids)

    def _stack(self, folder: Path) -> torch.Tensor:
        files = sorted(folder.iterdir())[:SLICES]
        slices = [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in files]
        return torch.from_numpy(np.stack(slices))

    def __getitem__(self, i: int) -> dict:
        base = self.root / "images" / self.ids[i]
        out = {"ct": self._stack(base / "ct"), "lung": self._stack(base / "lung")}
        lesion = base / "lesion"
        out["lesion"] = self._stack(lesion) if lesion.is_dir() else torch.zeros_like(out["ct"])
        return out


def _rate(fn, n_patients: int, repeats: int) -> float:
    fn()  # warm the page cache and any lazy imports
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_patients / best


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench-out/loader")
    args = parser.parse_args()
    torch.set_num_threads(1)

    out = Path(args.out)
    raw, shards = out / "raw", out / "shards"
    if not (shards / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        spec = SynthConfig(
            patients=args.patients,
            centers=1,
            image_size=SIZE,
            min_slices=SLICES,
            max_slices=SLICES,
            seed=0,
        )
        generate(spec, raw, out / "truth.json")
        build_shards(
            read_cohort(raw),
            shards,
            PrepConfig(image_size=SIZE, val_fraction=0.0, test_fraction=0.0),
        )
    manifest = load_manifest(str(shards))
    ids = [k for e in manifest["shards"] for k in e["keys"]]
    n = len(ids)

    cfg = DataConfig(shards=str(shards), batch_size=BATCH, max_slices=SLICES, num_workers=0)
    loader = make_loader(cfg, "train", "eval")

    def shard_epoch() -> None:
        for batch in loader:
            assert batch.ct.shape[1:] == (SLICES, SIZE, SIZE)

    def shard_epoch_cpu_float() -> None:
        # What the device does after batch.to(device), done on this CPU core instead.
        for batch in loader:
            ct = batch.ct.float() / 255.0
            lung, lesion = batch.lung_mask.float(), batch.lesion_mask.float()
            assert ct.shape == lung.shape == lesion.shape

    png = torch.utils.data.DataLoader(PngFolderDataset(raw, ids), batch_size=BATCH, num_workers=0)

    def png_epoch() -> None:
        for batch in png:
            assert batch["ct"].shape[1:] == (SLICES, SIZE, SIZE)

    shard_rate = _rate(shard_epoch, n, args.repeats)
    cpu_float_rate = _rate(shard_epoch_cpu_float, n, args.repeats)
    png_rate = _rate(png_epoch, n, args.repeats)
    raw_bytes = _dir_bytes(raw / "images") / n
    shard_bytes = sum(e["bytes"] for e in manifest["shards"]) / n
    print(f"cohort: {n} patients, {SLICES} slices of {SIZE}x{SIZE}, CT + lung + lesion masks")
    print(f"shard loader      : {shard_rate:8.1f} patients/s/core")
    print(f"PNG-folder loader : {png_rate:8.1f} patients/s/core")
    print(f"speed-up          : {shard_rate / png_rate:8.1f}x")
    print(
        f"shard loader + float/unpack on the CPU (what the GPU does otherwise): "
        f"{cpu_float_rate:.1f} patients/s/core ({cpu_float_rate / png_rate:.1f}x)"
    )
    print(
        f"shard bytes/patient {shard_bytes / 2**20:.2f} MiB vs raw PNG {raw_bytes / 2**20:.2f} "
        f"MiB ({shard_bytes / raw_bytes:.2f}x)"
    )


if __name__ == "__main__":
    main()
