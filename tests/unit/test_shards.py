"""Raw -> shards -> loader round trip, manifest contents and shard verification."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import TINY_PREP, crafted_shards, good_patient, row, write_clinical
from PIL import Image

from mmdls_dist.config import DataConfig, PrepConfig
from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.loader import make_loader
from mmdls_dist.data.schema import CLINICAL_FEATURES, N_RADIOMICS, PET_FEATURES
from mmdls_dist.data.shards import (
    ShardError,
    build_shards,
    load_manifest,
    normalization_stats,
)
from mmdls_dist.data.verify import verify_shards


@pytest.fixture
def exact_cohort(tmp_path):
    """Four hand-made patients whose slices are already at the stored size (no resampling)."""
    root = tmp_path / "raw"
    rows = [
        row("A1", age="50", histology="0", tnm_stage="0"),
        row("A2", age="70", smoking_status="", os_time="", os_event=""),
        row("A3", age="", suv_max="3.0", sex="0", smoking_status="1"),
        row("A4", age="60", tlg="", histology="", tnm_stage="1"),
    ]
    write_clinical(root, rows)
    arrays = {}
    for i, r in enumerate(rows):
        arrays[r["patient_id"]] = good_patient(
            root, r["patient_id"], seed=i, n_slices=3 + i, size=24, annotated=i != 1
        )
    return root, arrays


def _all_batches(shards, split, **kw):
    cfg = DataConfig(shards=str(shards), batch_size=2, num_workers=0, **kw)
    return list(make_loader(cfg, split, "eval"))


def test_round_trip_gives_back_pixels_masks_and_values(exact_cohort, tmp_path):
    root, arrays = exact_cohort
    report = read_cohort(root)
    assert report.ok
    out = tmp_path / "shards"
    manifest = build_shards(
        report, out, PrepConfig(image_size=24, val_fraction=0.0, test_fraction=0.0)
    )
    batches = _all_batches(out, "train", max_slices=8)
    seen = {}
    for b in batches:
        for i, pid in enumerate(b.patient_id):
            seen[pid] = (b, i)
    assert sorted(seen) == ["A1", "A2", "A3", "A4"]
    for pid, (ct, lung, lesion) in arrays.items():
        b, i = seen[pid]
        s = ct.shape[0]
        assert torch.equal(b.ct[i, :s], torch.from_numpy(ct))
        assert torch.equal(b.lung_mask[i, :s], torch.from_numpy(lung // 255))
        assert b.slice_mask[i].tolist() == [True] * s + [False] * (8 - s)
        assert b.ct[i, s:].sum() == 0 and b.lung_mask[i, s:].sum() == 0
        if pid == "A2":
            assert not b.lesion_annotated[i] and b.lesion_mask[i].sum() == 0
        else:
            assert b.lesion_annotated[i]
            assert torch.equal(b.lesion_mask[i, :s], torch.from_numpy(lesion // 255))

    norm = manifest["normalization"]
    age = norm["clinical"]["age"]
    assert age["mean"] == pytest.approx(60.0) and age["std"] == pytest.approx(np.std([50, 70, 60]))
    col = {name: k for k, name in enumerate(CLINICAL_FEATURES)}
    b, i = seen["A1"]
    assert b.clinical[i, col["age"]].item() == pytest.approx((50 - 60) / np.std([50, 70, 60]))
    assert b.clinical[i, col["smoking_current"]] == 1 and b.clinical[i, col["smoking_never"]] == 0
    assert b.histology[i] == 0 and b.stage[i] == 0
    assert b.dfs_time[i] == pytest.approx(12.5) and b.dfs_event[i] and b.os_known[i]
    b, i = seen["A3"]
    assert b.clinical_missing[i, col["age"]] and b.clinical[i, col["age"]] == 0
    assert b.clinical[i, col["smoking_former"]] == 1 and b.clinical[i, col["sex"]] == 0
    suv = PET_FEATURES.index("suv_max")
    stats = norm["pet"]["suv_max"]
    assert b.pet[i, suv].item() == pytest.approx((np.log1p(3.0) - stats["mean"]) / stats["std"])
    b, i = seen["A2"]
    smoking = [col["smoking_never"], col["smoking_former"], col["smoking_current"]]
    assert b.clinical_missing[i, smoking].all() and not b.os_known[i]
    assert torch.isnan(b.os_time[i]) and not b.os_event[i]
    b, i = seen["A4"]
    assert b.histology[i] == -1 and b.stage[i] == 1
    assert b.pet_missing[i, PET_FEATURES.index("tlg")]
    assert b.radiomics_missing[i].all()  # no radiomics.csv at all


def test_resampling_to_stored_size_matches_pil(synth_cohort, synth_report, shard_dir):
    root, _ = synth_cohort
    rec = synth_report.records[0]
    batches = _all_batches(shard_dir, "train", max_slices=16) + _all_batches(
        shard_dir, "external", max_slices=16
    )
    b, i = next(
        (b, b.patient_id.index(rec.patient_id)) for b in batches if rec.patient_id in b.patient_id
    )
    first = Image.open(root / "images" / rec.patient_id / "ct" / rec.slice_files[0])
    expected = np.asarray(first.resize((32, 32), Image.BILINEAR))
    assert np.array_equal(b.ct[i, 0].numpy(), expected)


def test_manifest_records_splits_centers_and_train_only_stats(synth_report, shard_dir):
    manifest = load_manifest(str(shard_dir))
    splits = manifest["splits"]
    assert set(splits) == {"train", "val", "test", "external"}
    assert set(splits["external"]["centers"]) == {"HOSP-C"}
    assert "HOSP-C" not in splits["train"]["centers"]
    assert sum(s["n_patients"] for s in splits.values()) == 40
    keys = {}
    for entry in manifest["shards"]:
        assert entry["n_patients"] == len(entry["keys"]) <= 5
        assert entry["name"].startswith(entry["split"] + "-")  # a shard never mixes splits
        for key in entry["keys"]:
            assert "." not in key
            assert key not in keys, f"{key} in two shards"
            keys[key] = entry["split"]
    assert len(keys) == 40
    train = [r for r in synth_report.records if keys[r.patient_id] == "train"]
    recorded = _flat(manifest["normalization"])
    assert recorded == pytest.approx(_flat(normalization_stats(train)), rel=1e-12)
    assert recorded != pytest.approx(_flat(normalization_stats(synth_report.records)), rel=1e-3)
    assert manifest["prep"]["external_centers"] == ["HOSP-C"]
    assert manifest["source"] == {"n_read": 40, "n_kept": 40, "n_rejected": 0, "defects": []}


def _flat(stats: dict) -> list[float]:
    out = [v for k in sorted(stats["clinical"]) for v in stats["clinical"][k].values()]
    out += [v for k in sorted(stats["pet"]) for v in stats["pet"][k].values()]
    return out + stats["radiomics"]["mean"] + stats["radiomics"]["std"]


def test_sharding_is_reproducible(synth_report, shard_dir, tmp_path):
    again = build_shards(
        synth_report,
        tmp_path / "again",
        TINY_PREP,
    )
    assert again == load_manifest(str(shard_dir))


def test_byte_limit_splits_shards(synth_report, tmp_path):
    manifest = build_shards(
        synth_report,
        tmp_path / "s",
        PrepConfig(image_size=128, max_shard_mb=1.0, val_fraction=0.15, test_fraction=0.15),
    )
    assert all(e["bytes"] <= 2**20 for e in manifest["shards"])
    train = [e for e in manifest["shards"] if e["split"] == "train"]
    assert sum(e["bytes"] for e in train) > 2 * 2**20 and len(train) >= 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_named(shard_dir, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    manifest = load_manifest(str(copy))
    victim = next(e for e in manifest["shards"] if e["split"] == "train")
    path = copy / victim["name"]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        expected = "corrupted"
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) - 3000]))
        expected = "truncated"
    else:
        path.unlink()
        expected = "missing"
    problems = verify_shards(str(copy), manifest)
    assert len(problems) == 1
    assert victim["name"] in problems[0] and expected in problems[0]
    with pytest.raises(ShardError, match=f"{victim['name']}.*{expected}"):
        make_loader(DataConfig(shards=str(copy), num_workers=0), "train", "train")


def test_truncation_after_verification_is_caught_while_streaming(shard_dir, tmp_path):
    """A shard that changes after the up-front check still fails loudly, never silently short."""
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    cfg = DataConfig(shards=str(copy), num_workers=0, batch_size=1)
    loader = make_loader(cfg, "val", "eval")
    victim = copy / loader.dataset.entries[0]["name"]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=f"{victim.name}.*(truncated|unreadable)"):
        list(loader)


def test_defects_block_sharding_unless_allowed(tmp_path):
    root = tmp_path / "raw"
    write_clinical(root, [row("G1"), row("G2"), row("BAD", histology="7")])
    for i, pid in enumerate(["G1", "G2", "BAD"]):
        good_patient(root, pid, seed=i)
    report = read_cohort(root)
    with pytest.raises(ValueError, match="1 defects.*--allow-rejects"):
        build_shards(report, tmp_path / "s1", PrepConfig(image_size=16))
    assert not (tmp_path / "s1" / "manifest.json").exists()
    manifest = build_shards(
        report,
        tmp_path / "s2",
        PrepConfig(image_size=16, val_fraction=0.0, test_fraction=0.0, allow_rejects=True),
    )
    assert manifest["source"] == {"n_read": 3, "n_kept": 2, "n_rejected": 1, "defects": []}
    assert "histology" in manifest["rejected"]["BAD"][0]
    assert manifest["splits"]["train"]["n_patients"] == 2


def test_existing_shards_are_not_overwritten(synth_report, shard_dir):
    with pytest.raises(FileExistsError, match="already holds shards"):
        build_shards(synth_report, shard_dir, PrepConfig(image_size=32))


@pytest.mark.parametrize("damage", ["column", "encoding"])
def test_file_level_defects_are_recorded_under_allow_rejects(tmp_path, damage):
    """A radiomics.csv that cannot be used rejects nobody, so it must not vanish: the
    manifest's source.defects and the import summary name it and what it costs."""
    root = tmp_path / "raw"
    write_clinical(root, [row("G1"), row("G2")])
    for i, pid in enumerate(["G1", "G2"]):
        good_patient(root, pid, seed=i)
    names = ",".join(f"f{j}" for j in range(N_RADIOMICS - (damage == "column")))
    body = f"patient_id,{names}\nG1," + ",".join(["0.5"] * (N_RADIOMICS - 1)) + "\n"
    data = body.encode() + (b"G2,\xe9\xff\n" if damage == "encoding" else b"")
    (root / "radiomics.csv").write_bytes(data)
    report = read_cohort(root)
    assert "FILE DEFECT: radiomics.csv" in report.summary()
    assert "radiomics are missing for every patient" in report.summary()
    manifest = build_shards(
        report, tmp_path / "s", PrepConfig(image_size=16, val_fraction=0, allow_rejects=True)
    )
    assert manifest["rejected"] == {} and manifest["source"]["n_kept"] == 2
    (defect,) = manifest["source"]["defects"]
    assert defect.startswith("radiomics.csv: (file):")
    assert defect.endswith("so radiomics are missing for every patient")


def test_a_sample_naming_another_patient_is_refused(shard_dir, tmp_path):
    copy, manifest, entry = crafted_shards(shard_dir, tmp_path, "../../evil")
    (problem,) = verify_shards(str(copy), manifest)
    assert entry["name"] in problem and "says it is patient '../../evil'" in problem
    cfg = DataConfig(shards=str(copy), num_workers=0, verify="size")
    with pytest.raises(ShardError, match="names another patient in meta.json"):
        list(make_loader(cfg, "train", "eval"))  # the loader checks every sample it reads


def test_an_inconsistent_manifest_is_named(shard_dir):
    manifest = load_manifest(str(shard_dir))
    broken = json.loads(json.dumps(manifest))
    broken["shards"][1]["keys"] = broken["shards"][0]["keys"]
    broken["shards"][2]["split"] = "holdout"
    broken["splits"]["val"]["n_patients"] += 1
    text = "\n".join(verify_shards(str(shard_dir), broken, check_hash=False))
    assert "patient id(s) in more than one place" in text
    assert "split 'holdout' is not a split of the manifest" in text
    assert "splits.val.n_patients disagrees with its shards' counts" in text


def test_masks_are_never_written_outside_their_folder(tmp_path):
    import torch

    from mmdls_dist.evaluation.inference import write_masks
    from mmdls_dist.model.output import ModelOutput

    logits = torch.zeros(1, 1, 4, 4)
    out = ModelOutput(*(torch.zeros(1),) * 4, lung_logits=logits, lesion_logits=logits)
    batch = type("B", (), {"patient_id": ["../evil"], "slice_mask": torch.ones(1, 1).bool()})
    with pytest.raises(ShardError, match="not a plain name"):
        write_masks(str(tmp_path / "masks"), batch, out, 4, {})
    assert not list(tmp_path.rglob("*.png"))


def test_verified_shards_are_not_read_again_until_they_change(shard_dir, tmp_path, monkeypatch):
    """A restart does not re-read every byte: a file verified once is known by its
    fingerprint; a changed file (new mtime) is read and checked again."""
    from mmdls_dist.data import verify

    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    manifest = load_manifest(str(copy))
    cache = verify.VerifiedCache(tmp_path / "cache.json")
    assert verify_shards(str(copy), manifest, cache=cache) == []
    reads = []
    scan = verify.scan_shard
    monkeypatch.setattr(verify, "scan_shard", lambda url: reads.append(url) or scan(url))
    again = verify.VerifiedCache(tmp_path / "cache.json")  # as a new process reads it
    assert verify_shards(str(copy), manifest, cache=again) == [] and reads == []
    victim = copy / manifest["shards"][0]["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))  # same size, new content and mtime
    (problem,) = verify_shards(str(copy), manifest, cache=again)
    assert "corrupted" in problem and reads == [str(victim)]
