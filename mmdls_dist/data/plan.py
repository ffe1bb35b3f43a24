"""Which patients each (rank, dataloader worker) stream reads in an epoch, with equal step
counts: planned up front from the manifest's per-shard patient counts, as contiguous runs
("segments") of one virtual sequence of all the split's patients.

* train: the sequence is the split's shards in an order shuffled by (seed, epoch), rotated
  by a random offset and repeated cyclically. Rank r takes the r-th run of
  steps_per_epoch * batch_size patients, and splits it between its dataloader workers. So
  every rank yields exactly steps_per_epoch batches (a rank that runs out early would hang
  DDP), every patient is visited once per epoch when the split divides evenly (otherwise
  fewer than world_size * batch_size are skipped or repeated, different ones each epoch),
  and it works with fewer shards than streams.
* eval: the sequence in manifest order, cut into world_size near-equal runs: every patient
  exactly once across all ranks; batch counts may differ by rank (evaluation gathers
  predictions once at the end, there is no per-step collective).

This is why WebDataset's own node/worker splitters are not used: they split whole shards,
which cannot give equal step counts nor cover a split with fewer shards than streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
