"""TensorBoard event files live with the run, also on object storage."""

from __future__ import annotations

import fsspec
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmdls_dist.config import load_config
from mmdls_dist.train.tensorboard import EpochLogger, hparams, tensorboard_dir


def _scalars(folder) -> dict[str, list[float]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_object_store_runs_get_their_event_files_copied_every_epoch(tmp_path):
    cfg = load_config("debug", ["run.storage_path=memory://tb-bucket/runs", "run.name=r"])
    assert tensorboard_dir(cfg) == "memory://tb-bucket/runs/r/tensorboard"
    fs = fsspec.filesystem("memory")
    board = EpochLogger(cfg)
    board.log({"val/cindex_os": 0.61, "epoch": 0}, 10, None, None)
    names = fs.ls("/tb-bucket/runs/r/tensorboard", detail=False)
    assert len(names) == 1 and "events.out.tfevents." in names[0]
    board.log({"val/cindex_os": 0.65, "epoch": 1}, 20, None, None)
    board.close()
    local = tmp_path / "copy"
    local.mkdir()
    fs.get(names[0], str(local / names[0].rsplit("/", 1)[-1]))
    assert _scalars(local)["val/cindex_os"] == pytest.approx([0.61, 0.65])  # both epochs stored
    assert not board.dir.exists()  # the node-local copy is gone after close


def test_local_runs_write_into_the_run_folder(tmp_path):
    cfg = load_config("debug", [f"run.storage_path={tmp_path}", "run.name=r"])
    board = EpochLogger(cfg)
    board.log({"train/loss": 1.5}, 3, None, None)
    board.close()
    assert _scalars(tmp_path / "r" / "tensorboard")["train/loss"] == [1.5]


def test_steps_config_text_and_hparams(tmp_path):
    cfg = load_config("debug", [f"run.storage_path={tmp_path}", "run.name=r", "optim.lr=0.002"])
    board = EpochLogger(cfg)
    steps = [(1, {"step/loss": torch.tensor(2.5)}), (2, {"step/loss": torch.tensor(2.0)})]
    board.log({"train/loss": 2.2, "val/cindex_os": 0.61, "epoch": 0}, 2, None, None, steps)
    board.close({"train/loss": 2.2, "val/cindex_os": 0.61, "val/auc_stage": float("nan")})
    folder = tmp_path / "r" / "tensorboard"
    scalars = _scalars(folder)
    assert scalars["step/loss"] == [2.5, 2.0]  # one point per optimizer step
    acc = EventAccumulator(str(folder))
    acc.Reload()
    (text,) = acc.Tensors("config/text_summary")
    assert "lr: 0.002" in text.tensor_proto.string_val[0].decode()
    session = EventAccumulator(str(folder / "hparams"))
    session.Reload()
    assert session.Scalars("hparam/val/cindex_os")[0].value == pytest.approx(0.61)
    assert "hparam/val/auc_stage" not in session.Tags()["scalars"]  # undefined: left out
    assert session.PluginTagToContent("hparams")  # the HParams plugin's experiment records
    values = hparams(cfg)
    assert values["optim.lr"] == 0.002 and values["model.widths"] == "[8, 16, 32, 48]"
    assert "run.storage_path" not in values  # where a run lives is not an experiment setting
