"""WebDataset shards -> Batch, per rank and per dataloader worker, with equal step counts.

The stream plan (plan.py) decides which samples each (rank, worker) stream reads; here
they are read from the tars (one seek per segment), verified against the manifest,
shuffled in a buffer (WebDataset's) in training, and collated (collate.py) into Batches.
WebDataset groups tar members into samples and runs the shuffle buffer.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
import time
from collections.abc import Iterator, Sequence

import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys

from mmdls_dist import storage
from mmdls_dist.config import DataConfig
from mmdls_dist.data.collate import collate
from mmdls_dist.data.plan import Segment, eval_segments, train_segments, train_steps
from mmdls_dist.data.schema import Batch, valid_patient_id
from mmdls_dist.data.shards import ShardError, data_manifest
from mmdls_dist.data.verify import ensure_verified

log = logging.getLogger(__name__)

MODES = ("train", "eval")


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


def _checked(sample: dict, url: str, index: int, expected: str) -> dict:
    """The sample with its parsed meta.json, if it is the patient the manifest says: its
    tar key and its meta.json's patient_id both (a shard's own metadata is not trusted)."""
    key = sample["__key__"]
    if key != expected:
        raise ShardError(
            f"{url}: sample {index} is {key!r}, manifest says {expected!r} "
            "(shard rewritten after sharding?)"
        )
    meta = json.loads(sample["meta.json"])
    if meta.get("patient_id") != key or not valid_patient_id(key):
        raise ShardError(f"{url}: sample {index} ({key!r}) names another patient in meta.json")
    return {**sample, "meta": meta}


def read_segments(root: str, entries: Sequence[dict], segments: Sequence[Segment]) -> Iterator:
    """Raw samples of the segments, in order; any shard fault is a ShardError naming it."""
    for seg in segments:
        entry = entries[seg.shard]
        url = storage.join(root, entry["name"])
        seen = seg.start
        try:
            with storage.open_file(url) as stream:
                files = ({**f, "__url__": url} for f in tar_members(stream, seg.start))
                for i, sample in enumerate(group_by_keys(files), start=seg.start):
                    if i >= seg.stop:
                        break
                    seen = i + 1
                    yield _checked(sample, url, i, entry["keys"][i])
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
        self.manifest = manifest if manifest is not None else data_manifest(cfg)
        self.entries = [e for e in self.manifest["shards"] if e["split"] == split]
        if not self.entries:
            have = sorted(self.manifest["splits"])
            raise ValueError(f"{cfg.shards}: split {split!r} has no shards (splits: {have})")
        self.counts = [e["n_patients"] for e in self.entries]
        self.n_patients = sum(self.counts)
        self.steps = cfg.steps_per_epoch or train_steps(self.n_patients, world_size, cfg.batch_size)
        self.image_size = cfg.image_size or self.manifest["image_size"]
        self.epoch = 0
        ensure_verified(cfg.shards, self.manifest, [split], check_hash=cfg.verify == "full")

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


def stream_report(cfg: DataConfig, split: str, mode: str, world_size: int) -> str:
    """Stream epoch 0 of `split` as each of `world_size` ranks would, in turn -> what each
    read (batches, patients, distinct, speed) and the union, as text: `mmdls stream`."""
    lines, everyone = [f"{mode} epoch over split {split!r}:"], []
    for rank in range(world_size):
        loader = make_loader(cfg, split, mode, rank, world_size)
        loader.dataset.set_epoch(0)
        t0, batches, ids, shape = time.perf_counter(), 0, [], None
        for batch in loader:
            batches, shape = batches + 1, tuple(batch.ct.shape)
            ids.extend(batch.patient_id)
        rate = len(ids) / max(time.perf_counter() - t0, 1e-9)
        lines.append(
            f"  rank {rank}: {batches} batches, {len(ids)} patients ({len(set(ids))} "
            f"distinct), batch ct {shape} uint8, {rate:.0f} patients/s"
        )
        everyone += ids
    lines.append(f"  all ranks: {len(everyone)} patients read, {len(set(everyone))} distinct")
    return "\n".join(lines)
