"""Per-rank streaming: equal training step counts, exact-once evaluation, slices and sizes."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from mmdls_dist.config import DataConfig
from mmdls_dist.data.collate import npy_view, select_slices
from mmdls_dist.data.loader import make_loader
from mmdls_dist.data.plan import Segment, eval_segments, train_segments
from mmdls_dist.data.schema import unpack_masks
from mmdls_dist.data.shards import ShardError, load_manifest, npy_bytes


def _expand(segments, counts):
    """Global sample ids (shard, index) a list of segments reads."""
    return [(s.shard, i) for s in segments for i in range(s.start, s.stop)]


@pytest.mark.parametrize("counts", [[5, 5, 5, 5], [7, 1, 3], [40], [2, 9, 4, 4, 6]])
@pytest.mark.parametrize(("world", "workers", "batch"), [(2, 1, 4), (2, 3, 2), (4, 2, 3)])
def test_train_plan_gives_equal_quota_and_covers_each_patient_once(counts, world, workers, batch):
    total = sum(counts)
    steps = max(1, total // (world * batch))
    per_rank = []
    for rank in range(world):
        ids = []
        for w in range(workers):
            segs = train_segments(
                counts,
                seed=1,
                epoch=3,
                rank=rank,
                world_size=world,
                worker=w,
                num_workers=workers,
                steps=steps,
                batch_size=batch,
            )
            got = _expand(segs, counts)
            assert len(got) % batch == 0  # only full batches inside a worker
            ids += got
        assert len(ids) == steps * batch  # the same number of batches on every rank
        per_rank.append(ids)
    everything = [i for ids in per_rank for i in ids]
    repeats = Counter(everything)
    if world * steps * batch <= total:
        assert max(repeats.values()) == 1  # nobody twice in an epoch
    assert all(0 <= s < len(counts) and 0 <= i < counts[s] for s, i in everything)


def test_train_plan_changes_with_epoch_and_is_reproducible():
    kw = dict(seed=0, rank=0, world_size=2, worker=0, num_workers=1, steps=5, batch_size=2)
    a = train_segments([6, 6, 6, 6], epoch=0, **kw)
    assert a == train_segments([6, 6, 6, 6], epoch=0, **kw)
    assert a != train_segments([6, 6, 6, 6], epoch=1, **kw)


@pytest.mark.parametrize("counts", [[5, 5, 5], [1, 1], [13], [3, 0, 4]])
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 2), (3, 4), (8, 1)])
def test_eval_plan_partitions_the_split(counts, world, workers):
    ids = []
    for rank in range(world):
        for w in range(workers):
            ids += _expand(
                eval_segments(counts, rank=rank, world_size=world, worker=w, num_workers=workers),
                counts,
            )
    assert sorted(ids) == [(s, i) for s, n in enumerate(counts) for i in range(n)]


def test_segments_cut_across_shard_boundaries():
    segs = eval_segments([3, 3, 3], rank=1, world_size=3, worker=0, num_workers=1)
    assert segs == [Segment(1, 0, 3)]
    segs = eval_segments([4, 4], rank=0, world_size=2, worker=0, num_workers=1)
    assert segs == [Segment(0, 0, 4)]
    segs = eval_segments([3, 5], rank=0, world_size=2, worker=0, num_workers=1)
    assert segs == [Segment(0, 0, 3), Segment(1, 0, 1)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_stream_equal_batches_and_eval_covers_once(shard_dir, num_workers):
    manifest = load_manifest(str(shard_dir))
    cfg = DataConfig(shards=str(shard_dir), batch_size=3, max_slices=6, num_workers=num_workers)
    n_train = manifest["splits"]["train"]["n_patients"]
    counts, train_ids = [], []
    for rank in range(2):
        loader = make_loader(cfg, "train", "train", rank, 2)
        loader.dataset.set_epoch(1)
        batches = list(loader)
        assert all(len(b) == 3 for b in batches)
        counts.append(len(batches))
        assert len(batches) == len(loader.dataset)
        train_ids += [p for b in batches for p in b.patient_id]
    assert counts[0] == counts[1] == n_train // 6
    assert len(set(train_ids)) == len(train_ids)  # one pass: nobody twice

    for split in ("val", "external"):
        ids = []
        for rank in range(2):
            loader = make_loader(cfg, split, "eval", rank, 2)
            batches = list(loader)
            assert len(batches) == len(loader.dataset)
            ids += [p for b in batches for p in b.patient_id]
        expected = [k for e in manifest["shards"] if e["split"] == split for k in e["keys"]]
        assert sorted(ids) == sorted(expected)


def test_epochs_reshuffle(shard_dir):
    cfg = DataConfig(shards=str(shard_dir), batch_size=2, num_workers=0)
    loader = make_loader(cfg, "train", "train")
    orders = []
    for epoch in (0, 1, 0):
        loader.dataset.set_epoch(epoch)
        orders.append([p for b in loader for p in b.patient_id])
    assert orders[0] == orders[2] and orders[0] != orders[1]


def test_fixed_steps_per_epoch_repeats_a_small_split(shard_dir):
    cfg = DataConfig(shards=str(shard_dir), batch_size=4, num_workers=2, steps_per_epoch=7)
    for rank in range(2):
        assert len(list(make_loader(cfg, "val", "train", rank, 2))) == 7


def test_more_slices_than_max_are_subsampled_evenly():
    assert select_slices(5, 8).tolist() == [0, 1, 2, 3, 4]
    assert select_slices(9, 3).tolist() == [0, 4, 8]
    assert select_slices(60, 30)[[0, -1]].tolist() == [0, 59]


def test_slice_subsampling_and_model_size(shard_dir):
    cfg = DataConfig(
        shards=str(shard_dir), batch_size=2, num_workers=0, max_slices=3, image_size=16
    )
    batch = next(iter(make_loader(cfg, "val", "eval")))
    assert batch.ct.shape == (2, 3, 16, 16) and batch.ct.dtype == torch.uint8
    assert batch.lung_mask.shape == (2, 3, 16, 16)
    assert set(batch.lung_mask.unique().tolist()) <= {0, 1}
    assert batch.slice_mask.all()  # every synthetic patient has >= 4 slices
    full = next(
        iter(
            make_loader(
                DataConfig(shards=str(shard_dir), batch_size=2, num_workers=0, max_slices=3),
                "val",
                "eval",
            )
        )
    )
    assert full.ct.shape[-1] == 32
    expected = torch.nn.functional.interpolate(
        full.ct.float(), size=(16, 16), mode="bilinear", antialias=True
    ).round()
    assert torch.equal(batch.ct.float(), expected)
    nearest = torch.nn.functional.interpolate(
        full.lesion_mask.float(), size=(16, 16), mode="nearest"
    )
    assert torch.equal(batch.lesion_mask.float(), nearest)


def test_masks_are_unpacked_once_per_batch_and_again_after_a_move(shard_dir):
    cfg = DataConfig(shards=str(shard_dir), batch_size=2, max_slices=3, num_workers=0)
    batch = next(iter(make_loader(cfg, "train", "eval")))
    lung, lesion = batch.lung_mask, batch.lesion_mask
    assert lung.data_ptr() == batch.lung_mask.data_ptr()  # the model and the losses share it
    assert torch.equal(lung, unpack_masks(batch.masks[:, 0], batch.ct.shape[-2:]))
    assert torch.equal(lesion, unpack_masks(batch.masks[:, 1], batch.ct.shape[-2:]))
    moved = batch.to("cpu")
    assert moved._pixels is None and torch.equal(moved.lesion_mask, lesion)
    cleared = dataclasses.replace(batch, masks=torch.zeros_like(batch.masks))
    assert cleared.lung_mask.sum() == 0  # new masks: unpacked anew, not the cached ones


@pytest.mark.parametrize("hw", [(4, 6), (5, 5), (32, 32)])
def test_unpack_masks_matches_numpy(hw):
    rng = np.random.default_rng(0)
    bits = rng.random((2, 3, hw[0] * hw[1])) < 0.3
    packed = np.packbits(bits, axis=-1)
    out = unpack_masks(torch.from_numpy(packed), hw)
    assert out.shape == (2, 3, *hw) and out.dtype == torch.uint8
    assert np.array_equal(out.numpy(), bits.reshape(2, 3, *hw).astype(np.uint8))


def test_object_store_style_url(shard_dir):
    """Shards addressed by URL go through fsspec, as s3:// and gs:// prefixes do."""
    url = f"file://{shard_dir}"
    cfg = DataConfig(shards=url, batch_size=2, num_workers=0)
    ids = [p for b in make_loader(cfg, "val", "eval") for p in b.patient_id]
    manifest = load_manifest(url)
    assert sorted(ids) == sorted(
        k for e in manifest["shards"] if e["split"] == "val" for k in e["keys"]
    )


def test_any_fsspec_filesystem(shard_dir):
    """An in-memory fsspec filesystem stands in for object storage (s3fs / gcsfs)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in shard_dir.iterdir():
        fs.pipe(f"/bucket/shards/{path.name}", path.read_bytes())
    cfg = DataConfig(shards="memory://bucket/shards", batch_size=2, num_workers=0)
    ids = [p for b in make_loader(cfg, "val", "eval") for p in b.patient_id]
    manifest = load_manifest(str(shard_dir))
    expected = [k for e in manifest["shards"] if e["split"] == "val" for k in e["keys"]]
    assert sorted(ids) == sorted(expected)
    fs.pipe("/bucket/shards/" + manifest["splits"]["val"]["shards"][0], b"oops")
    with pytest.raises(ShardError, match="truncated"):
        make_loader(cfg, "val", "eval")


def test_worker_count_mismatch_is_refused(shard_dir):
    cfg = DataConfig(shards=str(shard_dir), batch_size=2, num_workers=2)
    stream = make_loader(cfg, "val", "eval").dataset
    with pytest.raises(RuntimeError, match="num_workers differs"):
        list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0))


def test_npy_view_is_zero_copy_and_exact():
    array = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    data = npy_bytes(array)
    view = npy_view(data)
    assert np.array_equal(view, array) and not view.flags.owndata


def test_unknown_split_and_bad_rank(shard_dir):
    cfg = DataConfig(shards=str(shard_dir), num_workers=0)
    with pytest.raises(ValueError, match="split 'nope' has no shards"):
        make_loader(cfg, "nope", "eval")
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        make_loader(cfg, "val", "eval", rank=2, world_size=2)
