"""WebDataset shards -> Batch, per rank and per dataloader worker, with equal step counts.

Which patients a (rank, dataloader worker) stream reads is planned up front from the
manifest's per-shard patient counts, as contiguous runs ("segments") of one virtual sequence
of all the split's patients:

* train: the sequence is the split's shards in an order shuffled by (seed, epoch), rotated
  by a random offset and repeated cyclically. Rank r takes the r-th run of
  steps_per_epoch * batch_size patients, and splits it between its dataloader workers. So
  every rank yields exactly steps_per_epoch batches (a rank that runs out early would hang
  DDP), every patient is visited once per epoch when the split divides evenly (otherwise
  fewer than world_size * batch_size are skipped or repeated, different ones each epoch),
  and it works with fewer shards than streams. A shuffle buffer mixes each stream further.
* eval: the sequence in manifest order, cut into world_size near-equal runs: every patient
  exactly once across all ranks; batch counts may differ by rank (evaluation gathers
  predictions once at the end, there is no per-step collective).

This is why WebDataset's own node/worker splitters are not used: they split whole shards,
which cannot give equal step counts nor cover a split with fewer shards than streams.
WebDataset still groups tar members into samples and runs the shuffle buffer.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
import webdataset as wds
from webdataset.tariterators import group_by_keys

from mmdls_dist.config import DataConfig
from mmdls_dist.data.schema import (
    CLINICAL_COLUMNS,
    CLINICAL_FEATURES,
    N_RADIOMICS,
    PET_FEATURES,
    ZSCORE_CLINICAL,
    ZSCORE_CLIP,
    Batch,
    before_zscore,
    unpack_masks,
)
from mmdls_dist.data.shards import ShardError, join_url, load_manifest, verify_shard

log = logging.getLogger(__name__)

MODES = ("train", "eval")


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of the `shard`-th shard of a split (manifest order)."""

    shard: int
    start: int
    stop: int


def _cut(counts: Sequence[int], order: Sequence[int], start: int, length: int) -> list[Segment]:
    """Segments covering `length` samples from position `start` of the cyclic sequence that
    concatenates the shards in `order`."""
    total = sum(counts)
    bounds = np.cumsum([0] + [counts[i] for i in order])
    out: list[Segment] = []
    pos = start % total if total else 0
    remaining = length
    while remaining > 0:
        j = int(np.searchsorted(bounds, pos, side="right") - 1)
        offset = pos - int(bounds[j])
        take = min(remaining, counts[order[j]] - offset)
        out.append(Segment(order[j], offset, offset + take))
        remaining -= take
        pos = (pos + take) % total
    return out


def _share(n: int, parts: int, k: int) -> tuple[int, int]:
    """Start and size of part k when n items are cut into `parts` near-equal runs."""
    start = k * n // parts
    return start, (k + 1) * n // parts - start


def train_steps(n_patients: int, world_size: int, batch_size: int) -> int:
    """Default steps per epoch: one pass over the split, rounded down, at least 1."""
    return max(1, n_patients // (world_size * batch_size))


def train_segments(
    counts: Sequence[int],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    steps: int,
    batch_size: int,
) -> list[Segment]:
    """What one training stream reads this epoch: exactly its share of steps * batch_size."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(counts)).tolist()
    offset = int(rng.integers(sum(counts)))
    first, n_batches = _share(steps, num_workers, worker)
    start = offset + (rank * steps + first) * batch_size
    return _cut(counts, order, start, n_batches * batch_size)


def eval_segments(
    counts: Sequence[int], *, rank: int, world_size: int, worker: int, num_workers: int
) -> list[Segment]:
    """What one evaluation stream reads: its contiguous run; all runs partition the split."""
    rank_start, rank_len = _share(sum(counts), world_size, rank)
    start, length = _share(rank_len, num_workers, worker)
    if length == 0:
        return []
    return _cut(counts, list(range(len(counts))), rank_start + start, length)


def open_url(url: str):
    """Local paths with plain buffered IO; URLs (file://, s3://, gs://, ...) through fsspec
    (s3fs / gcsfs for the clouds). Both give seekable streams."""
    if "://" not in url:
        return open(url, "rb", buffering=1 << 20)  # noqa: SIM115 (closed by the caller)
    return fsspec.open(url, "rb").open()


def tar_members(stream, start: int = 0) -> Iterator[dict]:
    """{"fname", "data", "__url__"} of each member of a seekable tar, in WebDataset's shape
    for group_by_keys. Members of samples before sample index `start` are skipped unread.

    Hand-written over the stdlib's random-access tar mode because WebDataset's reader uses
    the streaming mode, which reassembles every member from 10 KiB records and copies it
    three times; at 1.5 MB of CT per patient that was the loader's largest cost.
    """
    key, index = None, -1
    with tarfile.open(fileobj=stream, mode="r:") as archive:
        while (member := archive.next()) is not None:
            if not member.isreg():
                continue
            member_key = member.name.split(".", 1)[0]
            if member_key != key:
                key, index = member_key, index + 1
            if index < start:
                continue  # next() seeks over the data of a skipped member
            archive.members.clear()  # the index of visited members would grow per shard
            yield {"fname": member.name, "data": archive.extractfile(member).read()}


def read_segments(root: str, entries: Sequence[dict], segments: Sequence[Segment]) -> Iterator:
    """Raw samples of the segments, in order; any shard fault is a ShardError naming it."""
    for seg in segments:
        entry = entries[seg.shard]
        url = join_url(root, entry["name"])
        seen = seg.start
        try:
            with open_url(url) as stream:
                files = ({**f, "__url__": url} for f in tar_members(stream, seg.start))
                for i, sample in enumerate(group_by_keys(files), start=seg.start):
                    if i >= seg.stop:
                        break
                    seen = i + 1
                    if sample["__key__"] != entry["keys"][i]:
                        raise ShardError(
                            f"{url}: sample {i} is {sample['__key__']!r}, manifest says "
                            f"{entry['keys'][i]!r} (shard rewritten after sharding?)"
                        )
                    yield sample
        except ShardError:
            raise
        except FileNotFoundError as exn:
            raise ShardError(f"{url}: shard is missing") from exn
        except (tarfile.TarError, OSError, EOFError, ValueError) as exn:
            raise ShardError(f"{url}: shard is unreadable or truncated ({exn})") from exn
        if seen < seg.stop:
            raise ShardError(
                f"{url}: shard is truncated: {seen} samples, manifest says {entry['n_patients']}"
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
    for endpoint in ("dfs", "os"):
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
    """Raw WebDataset samples -> Batch. Pixels are copied once, straight into the batch;
    masks stay bit-packed (see Batch)."""
    metas = [json.loads(s["meta.json"]) for s in samples]
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


_HASHED: set[tuple[str, str]] = set()


def ensure_verified(root: str, entries: Sequence[dict], check_hash: bool) -> None:
    """Check shards against the manifest; raise naming every bad shard.

    Sizes are checked every time (cheap); the sha256 once per process and shard, since a
    training run builds loaders again (resume, Tune trials) over the same unchanged files.
    """
    problems = []
    for entry in entries:
        key = (join_url(root, entry["name"]), entry["sha256"])
        problem = verify_shard(root, entry, check_hash=check_hash and key not in _HASHED)
        if problem:
            problems.append(problem)
        elif check_hash:
            _HASHED.add(key)
    if problems:
        raise ShardError("shards do not match manifest.json:\n  " + "\n  ".join(problems))


class PatientStream(torch.utils.data.IterableDataset):
    """One rank's stream of Batches over one split. Call set_epoch(e) before each epoch."""

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        mode: str,
        rank: int = 0,
        world_size: int = 1,
        manifest: dict | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if not cfg.shards:
            raise ValueError("data.shards is empty: give the shard folder or URL")
        self.cfg, self.split, self.mode = cfg, split, mode
        self.rank, self.world_size = rank, world_size
        self.manifest = manifest if manifest is not None else load_manifest(cfg.shards)
        self.entries = [e for e in self.manifest["shards"] if e["split"] == split]
        if not self.entries:
            have = sorted(self.manifest["splits"])
            raise ValueError(f"{cfg.shards}: split {split!r} has no shards (splits: {have})")
        self.counts = [e["n_patients"] for e in self.entries]
        self.n_patients = sum(self.counts)
        self.steps = cfg.steps_per_epoch or train_steps(self.n_patients, world_size, cfg.batch_size)
        self.image_size = cfg.image_size or self.manifest["image_size"]
        self.epoch = 0
        ensure_verified(cfg.shards, self.entries, check_hash=cfg.verify == "full")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _workers(self) -> int:
        return max(1, self.cfg.num_workers)

    def segments(self, worker: int) -> list[Segment]:
        if self.mode == "train":
            return train_segments(
                self.counts,
                seed=self.cfg.seed,
                epoch=self.epoch,
                rank=self.rank,
                world_size=self.world_size,
                worker=worker,
                num_workers=self._workers(),
                steps=self.steps,
                batch_size=self.cfg.batch_size,
            )
        return eval_segments(
            self.counts,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=self._workers(),
        )

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank in train mode)."""
        if self.mode == "train":
            return self.steps
        per_worker = (
            sum(s.stop - s.start for s in self.segments(w)) for w in range(self._workers())
        )
        return sum(-(-n // self.cfg.batch_size) for n in per_worker)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        # Streams are planned for data.num_workers workers; any other count would read only
        # part of the plan (or parts twice), so it is refused rather than silently wrong.
        if max(1, info.num_workers if info is not None else 0) != self._workers():
            raise RuntimeError(
                "DataLoader num_workers differs from data.num_workers; build it with make_loader"
            )
        samples = read_segments(self.cfg.shards, self.entries, self.segments(worker))
        if self.mode == "train" and self.cfg.shuffle_buffer > 1:
            rng = random.Random(hash((self.cfg.seed, self.epoch, self.rank, worker)))
            samples = wds.shuffle(self.cfg.shuffle_buffer, self.cfg.shuffle_buffer, rng=rng)(
                samples
            )
        norm = self.manifest["normalization"]
        chunk: list[dict] = []
        for sample in samples:
            chunk.append(sample)
            if len(chunk) == self.cfg.batch_size:
                yield collate(chunk, norm, self.cfg.max_slices, self.image_size)
                chunk = []
        if chunk:
            yield collate(chunk, norm, self.cfg.max_slices, self.image_size)


def make_loader(
    cfg: DataConfig,
    split: str,
    mode: str,
    rank: int = 0,
    world_size: int = 1,
    manifest: dict | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over PatientStream. Not persistent: workers must see set_epoch()."""
    stream = PatientStream(cfg, split, mode, rank, world_size, manifest)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
    )
