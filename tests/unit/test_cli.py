"""The command line as a data manager uses it: exit codes and what it prints."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from helpers import good_patient, row, volume, write_clinical, write_images

from mmdls_dist.cli import main


def test_ingest_reports_defects_and_exit_code(tmp_path, capsys):
    root = tmp_path / "raw"
    write_clinical(root, [row("P1"), row("P2", tnm_stage="4")])
    good_patient(root, "P1", seed=0)
    ct, lung, lesion = volume(1)
    write_images(root, "P2", ct, lung, (lesion // 255).astype(np.uint8))  # 0/1-coded mask
    report = tmp_path / "report.json"
    rc = main(["ingest", str(root), "--executor", "serial", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "2 patients read, 1 kept, 1 rejected" in out
    assert "clinical.csv: patient P2: tnm_stage: code outside the table" in out
    assert "images/P2/lesion/s00.png: patient P2: lesion: mask is not binary" in out
    assert "looks 0/1-coded" in out
    saved = json.loads(report.read_text())
    assert saved["kept"] == ["P1"] and list(saved["rejected"]) == ["P2"]

    shutil.rmtree(root / "images" / "P2")
    write_clinical(root, [row("P1")])
    assert main(["ingest", str(root), "--executor", "serial"]) == 0


def test_shard_verify_and_stream(tmp_path, capsys, synth_cohort):
    raw, _ = synth_cohort
    out = tmp_path / "shards"
    args = ["shard", str(raw), str(out), "--executor", "serial", "--image-size", "32"]
    assert main(args + ["--external-centers", "HOSP-A"]) == 0
    assert main(["verify", str(out)]) == 0
    assert "shards match manifest.json" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["splits"]["external"]["centers"]) == {"HOSP-A"}

    victim = out / manifest["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[:-1024])
    assert main(["verify", str(out)]) == 1
    assert f"{victim} : shard is truncated".replace(" :", ":") in capsys.readouterr().out

    assert main(args) == 2  # the folder already holds shards: refused, not overwritten
    n_val = manifest["splits"]["val"]["n_patients"]
    assert main(["stream", str(out), "--split", "val", "--mode", "eval", "--num-workers", "0"]) == 0
    assert f"all ranks: {n_val} patients read, {n_val} distinct" in capsys.readouterr().out


def test_help_explains_every_command(capsys):
    from mmdls_dist.cli import COMMANDS

    assert len(COMMANDS.commands) == 11  # with import-dicom and import-nifti
    for command in COMMANDS.commands:
        try:
            main([command, "--help"])
        except SystemExit as done:
            assert done.code == 0
        text = capsys.readouterr().out
        assert f"usage: mmdls {command}" in text and "--" in text


def _parse(argv):
    from mmdls_dist.cli import COMMANDS

    return COMMANDS.parser("mmdls", "").parse_args(argv)


def test_a_command_flag_is_the_config_field_it_names():
    from mmdls_dist.commands import run
    from mmdls_dist.config import load_config

    seen = {}
    args = _parse(["shard", "raw", "out", "--val-fraction", "0.15", "--external-centers", "A,B",
                   "--allow-rejects", "--set", "prep.seed=4"])  # fmt: skip
    args.command = dataclasses.replace(args.command, fn=lambda a, cfg: seen.setdefault("c", cfg))
    run(args)
    expected = load_config(
        "debug",
        ["prep.seed=4", "prep.val_fraction=0.15", "prep.external_centers=[A,B]",
         "prep.allow_rejects=true"],
    )  # fmt: skip
    assert seen["c"] == expected
    assert seen["c"].prep.external_centers == ("A", "B")


@pytest.mark.parametrize(
    "argv",
    [["synth", "x"], ["shard", "r", "o"], ["stream", "s"], ["evaluate", "m"], ["predict", "c"]],
)
def test_no_flag_shadows_its_config_field(argv):
    """Left out, a generated flag sets nothing: the preset's value stands (the old CLI had
    its own defaults: --image-size 224 against prep's 64, --max-slices 16 against 30)."""
    from mmdls_dist.options import flag_overrides

    args = _parse(argv)
    assert flag_overrides(args) == []
    assert any(dest.startswith("set:") for dest in vars(args))  # the command has flags


def test_flag_help_is_the_field_comment(capsys):
    with pytest.raises(SystemExit):
        main(["shard", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--val-fraction VAL_FRACTION share of the internal (non-external) patients" in text
    assert "[prep.val_fraction; dataclass default 0.2]" in text


def test_ingest_for_prediction_checks_a_folder_as_predict_reads_it(tmp_path, capsys):
    """New patients come without outcomes and lung masks: plain ingest rejects them (a
    missing column is a defect for training), --for-prediction accepts them and still
    reports a real defect."""
    from mmdls_dist.data.schema import CLINICAL_CSV_COLUMNS, LABEL_COLUMNS

    root = tmp_path / "new"
    labels = {c.name for c in LABEL_COLUMNS}
    columns = [c for c in CLINICAL_CSV_COLUMNS if c not in labels]
    write_clinical(root, [row("P1"), row("P2", age="old")], columns)
    for k, pid in enumerate(("P1", "P2")):
        good_patient(root, pid, seed=k)
        shutil.rmtree(root / "images" / pid / "lung")
    assert main(["ingest", str(root), "--executor", "serial"]) == 1
    capsys.readouterr()
    assert main(["ingest", str(root), "--executor", "serial", "--for-prediction"]) == 1
    out = capsys.readouterr().out
    assert "2 patients read, 1 kept, 1 rejected" in out
    assert "patient P2: age" in out and "P1" not in out.split("rejected")[-1]
    write_clinical(root, [row("P1"), row("P2")], columns)
    assert main(["ingest", str(root), "--executor", "serial", "--for-prediction"]) == 0
